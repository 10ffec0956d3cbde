"""The import graph of pipeline/: no circle, and nothing in it imports the command line.

Every ``import`` and ``from ... import`` of every module is read with :mod:`ast`, at module level and inside
functions alike (a function-local import is still an edge: it only moves the circle to run time). Relative imports
are resolved; ``from pipeline.x import y`` is an edge to ``pipeline.x.y`` when that is a module, else to
``pipeline.x``. Nothing is imported to build the graph, so this test needs neither TensorFlow nor a model.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"


def module_files(root: Path = REPO, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _known(name: str, modules: dict[str, Path]) -> str:
    """``name`` itself when it is a module of ours, else its longest prefix that is ("" when none is)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return ""


def imported_names(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module named by an import in the file ``path`` of module ``name`` (ours or not), relative ones
    resolved; ``from m import x`` names ``m.x`` when that is one of ``modules``, else ``m``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in modules else source)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports."""
    graph = {}
    for name, path in modules.items():
        targets = {_known(n, modules) for n in imported_names(name, path, modules)}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as ``[a, b, ..., a]`` ([] when there is none), by depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return []


def test_the_cycle_finder_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []  # a diamond is no circle


def test_the_graph_sees_module_level_function_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import x\n")
    (pkg / "sub" / "leaf.py").write_text("import os\nx = 1\n\ndef f():\n    from pkg import top\n")
    (pkg / "top.py").write_text("from pkg.sub import leaf\nfrom . import sub\n")
    modules = module_files(tmp_path, "pkg")
    assert set(modules) == {"pkg", "pkg.sub", "pkg.sub.leaf", "pkg.top"}
    graph = import_graph(modules)
    assert graph["pkg.sub"] == {"pkg.sub.leaf"}  # relative, resolved
    assert graph["pkg.sub.leaf"] == {"pkg.top"}  # inside a function; os is not ours
    assert graph["pkg.top"] == {"pkg.sub.leaf", "pkg.sub"}  # "from m import y": m.y when it is a module
    cycle = find_cycle(graph)  # pkg.sub -> pkg.sub.leaf -> (in a function) pkg.top -> pkg.sub
    assert cycle[0] == cycle[-1] and {"pkg.sub.leaf", "pkg.top"} <= set(cycle), cycle


def test_pipeline_has_no_import_circle():
    modules = module_files()
    graph = import_graph(modules)
    assert "pipeline.runtime.factory" in graph["pipeline.extract.local"]  # the scan sees what it should
    assert "pipeline.extract.ray_engine" in graph["pipeline.extract.run"]  # a function-local import counts
    cycle = find_cycle(graph)
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_nothing_in_pipeline_imports_the_command_line():
    modules = module_files()
    offenders = sorted(name for name, path in modules.items()
                       if any(n == "cli" or n.startswith("cli.") for n in imported_names(name, path, modules)))
    assert not offenders, f"pipeline modules importing cli: {', '.join(offenders)}"
