"""Turn one or several run folders (``results.json`` written by ``fit``) into one self-contained HTML page.

The page shows which head (and backbone) to pick and why: provenance of every feature cache, a sortable leaderboard
of all fitted heads, what the feature cache saved in time, per-head confusion matrices, per-class scores, curves,
and the most confident mistakes of the best head as small thumbnails.

This module computes no metric: every number comes from ``results.json`` (read by :mod:`pipeline.results`, see
``docs/results-format.md``). What it does is I/O and rendering: loading and downscaling the
mistaken images (Pillow), drawing the curves (matplotlib, Agg, inline SVG) and filling a jinja2 template
(``pipeline/templates/report.html.j2``) with autoescaping on. The result opens offline anywhere: CSS, the small
sorting script, plots and thumbnails are all inline, and nothing refers to a network address.

Every number printed for a result is wrapped as ``<span class="num" data-run=R data-path=JSON data-fmt=F>``: the
JSON path into that run's ``results.json`` and the format spec it was printed with, so that a test (or a reader
with the JSON beside the page) can check each one.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jinja2
from markupsafe import Markup

from pipeline import __version__
from pipeline.atomic import write_atomically
from pipeline.errors import RunError
from pipeline.results import Run, cache_label, load_run, pick_file_problem, read_audit, slug

THUMB_PX = 96
"""Longest side, in pixels, of an embedded mistake thumbnail."""

THUMB_QUALITY = 78
"""JPEG quality of embedded thumbnails."""

MAX_NAME_CHARS = 80
"""Longest default report file name (without ``.html``) before several run names are shortened."""

MAIN_METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced acc."),
    ("macro_f1", "Macro F1"),
    ("log_loss", "Log loss"),
    ("roc_auc", "ROC AUC"),
    ("top5_accuracy", "Top-5 acc."),
)
"""Scalar metrics shown, in this order, with their column labels; absent ones are left out."""

LOWER_IS_BETTER = frozenset({"log_loss"})

METRIC_FMT = ".3f"
SECONDS_FMT = ".2f"
MS_FMT = ".1f"
COUNT_FMT = "d"
RATIO_FMT = ".2f"

IMBALANCE_WARN = 1.3
"""Largest/smallest class count from which the page warns that accuracy alone can mislead."""

_TEMPLATES = Path(__file__).resolve().parent / "templates"


# ---- where the page goes ---------------------------------------------------------------------------------------


def default_report_path(run_dirs: Sequence[Path | str], out_dir: Path | str = "reports") -> Path:
    """Where :func:`write_report` writes when no output is given.

    Parameters
    ----------
    run_dirs : sequence of Path or str
        The run folders of the report.
    out_dir : Path or str, default "reports"
        Folder of the report.

    Returns
    -------
    Path
        ``<out_dir>/<run name>.html``; several runs join their names with ``+``, shortened to the first name,
        the number of others and a hash of all when longer than :data:`MAX_NAME_CHARS`.
    """
    names = [Path(d).expanduser().resolve().name or "run" for d in run_dirs]
    name = "+".join(names)
    if len(name) > MAX_NAME_CHARS:
        digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:8]
        name = f"{names[0][:40]}+{len(names) - 1}more-{digest}"
    return Path(out_dir) / f"{name}.html"


def write_report(run_dirs: Sequence[Path | str], out_html: Path | str | None = None,
                 compare_href: str | None = None, warn: Callable[[str], None] | None = None) -> Path:
    """Render one self-contained HTML report of one or several run folders.

    Parameters
    ----------
    run_dirs : sequence of Path or str
        Run folders written by ``fit``; several are compared on one page, grouped by run and backbone. A single
        folder may be passed as it is.
    out_html : Path or str, optional
        Output file; default :func:`default_report_path` (``reports/<run name>.html``).
    compare_href : str, optional
        Link to the runs' compare page, shown at the top of the page.
    warn : callable, optional
        Told, one line each, of every run whose pick cannot be used (its saved head is missing, replaced or
        damaged); the page says it in that run's pick box.

    Returns
    -------
    Path
        The written HTML file.

    Raises
    ------
    RunError
        When no run folder is given or one cannot be read (see :func:`load_run`), or the output cannot be written.
    """
    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if not run_dirs:
        raise RunError("no run folder given: pass one or more folders written by `python cli.py fit`")
    runs = [load_run(d) for d in run_dirs]
    out = Path(out_html) if out_html is not None else default_report_path([r.path for r in runs])
    problems = {i: p for i, run in enumerate(runs) if (p := pick_file_problem(run)) is not None}
    for p in problems.values():
        (warn or (lambda _m: None))(f"the pick cannot be used: {p}")
    html = render_report(runs, compare_href, problems)
    return write_atomically(out, lambda tmp: tmp.write_text(html, encoding="utf-8"), "the report")


# ---- numbers as printed ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Num:
    """A value from ``results.json`` as printed on the page, tagged with where it came from.

    Attributes
    ----------
    value : Any
        The value (``None`` when the field is absent; printed as an em dash).
    path : tuple
        JSON path of the value in its run's ``results.json``.
    fmt : str
        Format spec it is printed with (``format(value, fmt)``).
    run : int
        Index of the run (order of the run folders given).
    """

    value: Any
    path: tuple = ()
    fmt: str = METRIC_FMT
    run: int = 0

    @property
    def text(self) -> str:
        """The printed text."""
        if self.value is None:
            return "\u2014"
        try:
            return format(self.value, self.fmt)
        except (TypeError, ValueError):
            return str(self.value)

    @property
    def sort(self) -> str:
        """A sort key for the table script: the raw number, or the text."""
        if isinstance(self.value, (int, float)) and not isinstance(self.value, bool):
            return repr(float(self.value))
        return "" if self.value is None else str(self.value)

    def __str__(self) -> str:
        return self.text

    def __html__(self) -> str:
        if self.value is None or not self.path:
            return str(Markup('<span class="num na">{}</span>').format(self.text))
        return str(
            Markup('<span class="num" data-run="{}" data-path="{}" data-fmt="{}">{}</span>').format(
                self.run, json.dumps(list(self.path)), self.fmt, self.text
            )
        )


def _get(obj: Any, path: Iterable[Any]) -> Any:
    """Value at ``path`` in nested dicts/lists, ``None`` when any step is absent."""
    for step in path:
        if isinstance(obj, dict):
            obj = obj.get(step)
        elif isinstance(obj, list) and isinstance(step, int) and -len(obj) <= step < len(obj):
            obj = obj[step]
        else:
            return None
        if obj is None:
            return None
    return obj


def _num(value: Any) -> float:
    """A number for ordering; absent or non-numeric values order last."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float("-inf")


def _stopping_view(res: dict, base: tuple, run: int) -> dict[str, Any] | None:
    """How the dense head's number of epochs was chosen, as recorded in its params (``stopping*``), or ``None``."""
    params = res.get("params") if isinstance(res.get("params"), dict) else {}
    rule = params.get("stopping")
    if rule not in ("holdout", "cv", "none"):
        return None
    return {"rule": rule,
            "rows": Num(params.get("stopping_rows"), base + ("params", "stopping_rows"), "d", run),
            "folds": Num(params.get("stopping_folds"), base + ("params", "stopping_folds"), "d", run),
            "epochs": Num(params.get("best_epoch"), base + ("params", "best_epoch"), "d", run)}


def _param(value: Any, path: tuple, run: int) -> Num | str:
    """A hyperparameter value as shown: numbers and strings tagged with their path, null as ``none``."""
    if value is None:
        return "none"
    return Num(value, path, _param_fmt(value), run)


def _param_fmt(value: Any) -> str:
    """Format spec of a hyperparameter value: ``g`` for numbers, plain ``str`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    return "g"


def _fields(obj: Any, keys: Iterable[str]) -> dict[str, Any]:
    """The named fields of a dict for display: absent or null ones as empty strings."""
    obj = obj if isinstance(obj, dict) else {}
    return {k: "" if obj.get(k) is None else obj[k] for k in keys}


# ---- images and plots ------------------------------------------------------------------------------------------


def _thumbnail(root: str | None, rel: str, cache: dict[str, str | None]) -> str | None:
    """A small JPEG data URI of ``root/rel``, or ``None`` when the file cannot be read any more."""
    if not root or not rel:
        return None
    path = Path(root) / rel
    key = str(path)
    if key in cache:
        return cache[key]
    from PIL import Image, ImageOps

    uri: str | None = None
    try:
        with Image.open(path) as img:
            img.seek(0)
            img = ImageOps.exif_transpose(img)
            img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR, reducing_gap=2.0)
            if img.mode in ("RGBA", "LA", "P", "PA"):
                img = img.convert("RGBA")
                flat = Image.new("RGB", img.size, (255, 255, 255))
                flat.paste(img, mask=img.getchannel("A"))
                img = flat
            else:
                img = img.convert("RGB")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=THUMB_QUALITY, optimize=True)
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:  # noqa: BLE001 - any unreadable file gets the placeholder, never a broken page
        uri = None
    cache[key] = uri
    return uri


_SVG_PREAMBLE = re.compile(r"^.*?(?=<svg\b)", re.S)
_SVG_DROP = (
    re.compile(r"<metadata>.*?</metadata>", re.S),
    re.compile(r'\s+xmlns(:\w+)?="[^"]*"'),
    re.compile(r'\s+id="(?:[A-Za-z]+|matplotlib\.axis)_\d+"'),
)
_SVG_FONT = re.compile(r"font-family:[^;\"]*")


def _svg(fig: Any, label: str) -> Markup:
    """Inline SVG markup of a matplotlib figure, made compact and safe to place several times in one page."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None},
                bbox_inches="tight", pad_inches=0.04)
    text = _SVG_PREAMBLE.sub("", buf.getvalue(), count=1)
    for pattern in _SVG_DROP:
        text = pattern.sub("", text)
    text = _SVG_FONT.sub("font-family: inherit", text)
    text = re.sub(r"\s*\n\s*", " ", text).strip()
    text = text.replace("<svg ", f'<svg role="img" aria-label="{Markup.escape(label)}" ', 1)
    return Markup(text)


def _rc(salt: str) -> dict[str, Any]:
    """matplotlib settings of every plot: text kept as SVG text, per-figure id salt, quiet styling."""
    return {
        "svg.fonttype": "none",
        "text.parse_math": False,
        "svg.hashsalt": salt,
        "font.size": 8,
        "axes.titlesize": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": "#e5e7eb",
        "grid.linewidth": 0.6,
        "axes.edgecolor": "#9ca3af",
        "axes.linewidth": 0.6,
        "xtick.color": "#4b5563",
        "ytick.color": "#4b5563",
        "legend.frameon": False,
        "legend.fontsize": 7,
        "path.simplify_threshold": 0.5,
    }


_COLORS = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#be123c")


def _plot_curves(result: dict, splits: Sequence[str], salt: str) -> Markup | None:
    """ROC and precision-recall curves of a binary head, one line per final split."""
    import matplotlib
    from matplotlib.figure import Figure

    have = [s for s in splits if _get(result, ("metrics", s, "roc", "fpr")) or _get(result, ("metrics", s, "pr"))]
    if not have:
        return None
    with matplotlib.rc_context(_rc(salt)):
        fig = Figure(figsize=(5.0, 2.3))
        roc_ax, pr_ax = fig.subplots(1, 2)
        for i, split in enumerate(have):
            m = result["metrics"][split]
            colour = _COLORS[i % len(_COLORS)]
            roc = m.get("roc") or {}
            if roc.get("fpr") and roc.get("tpr"):
                roc_ax.plot(roc["fpr"], roc["tpr"], color=colour, lw=1.3, label=split)
            pr = m.get("pr") or {}
            if pr.get("recall") and pr.get("precision"):
                pr_ax.plot(pr["recall"], pr["precision"], color=colour, lw=1.3, label=split)
        roc_ax.plot([0, 1], [0, 1], color="#9ca3af", lw=0.8, ls="--")
        roc_ax.set(title="ROC", xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1),
                   ylim=(0, 1.02))
        pr_ax.set(title="Precision-recall", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        for ax in (roc_ax, pr_ax):
            ax.set_aspect("auto")
            if ax.lines:
                ax.legend(loc="lower right" if ax is roc_ax else "lower left")
        fig.tight_layout(w_pad=2.0)
        return _svg(fig, "ROC and precision-recall curves")


def _plot_history(history: dict, salt: str) -> Markup | None:
    """Training and validation loss/accuracy per epoch of the dense head."""
    import matplotlib
    from matplotlib.figure import Figure

    from matplotlib.ticker import MaxNLocator

    panels = [(name, [k for k in (name, f"val_{name}") if history.get(k)]) for name in ("loss", "accuracy")]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        return None
    with matplotlib.rc_context(_rc(salt)):
        fig = Figure(figsize=(2.5 * len(panels), 2.3))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (name, keys) in zip(axes, panels):
            for i, k in enumerate(keys):
                ys = history[k]
                ax.plot(range(1, len(ys) + 1), ys, color=_COLORS[i], lw=1.3,
                        label="validation" if k.startswith("val_") else "training")
            ax.set(title=name, xlabel="epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
        fig.tight_layout(w_pad=2.0)
        return _svg(fig, "Training and validation curves")


def _plot_times(rows: Sequence[tuple[str, float, bool]], salt: str) -> Markup | None:
    """Horizontal bars (log scale) of one extraction per backbone against each head's fit time."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = [(label, float(sec), ext) for label, sec, ext in rows if isinstance(sec, (int, float)) and sec > 0]
    if not rows:
        return None
    with matplotlib.rc_context(_rc(salt) | {"axes.grid.axis": "x"}):
        fig = Figure(figsize=(6.4, 0.6 + 0.24 * len(rows)))
        ax = fig.subplots()
        ys = list(range(len(rows)))[::-1]
        ax.barh(ys, [r[1] for r in rows], color=["#1f2937" if r[2] else "#60a5fa" for r in rows], height=0.7)
        ax.set_yticks(ys, [r[0] for r in rows])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("seconds (log scale)")
        for y, (_, sec, _) in zip(ys, rows):
            ax.annotate(f"{sec:.2f} s", (sec, y), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=7, color="#374151")
        ax.set_xlim(right=max(r[1] for r in rows) * 6)
        ax.tick_params(axis="y", length=0)
        ax.set_axisbelow(True)
        fig.tight_layout()
        return _svg(fig, "Extraction time against fit time per head")


# ---- view model ------------------------------------------------------------------------------------------------


@dataclass
class Column:
    """One leaderboard column: a metric on a split."""

    split: str
    metric: str
    label: str


@dataclass
class ResultView:
    """What the template shows of one fitted head."""

    run: int
    index: int
    anchor: str
    key: str
    head: str
    backbone: str
    cache_index: int
    is_best: bool
    params: list[tuple[str, Num]]
    selection_split: str
    sel_mean: Num
    sel_std: Num
    cells: dict[tuple[str, str], Num]
    fit: Num
    predict: Num
    splits: list[dict] = field(default_factory=list)
    search: list[dict] = field(default_factory=list)
    curves: Markup | None = None
    history: Markup | None = None
    stopping: dict[str, Any] | None = None
    mistakes: list[dict] = field(default_factory=list)
    model_file: str = ""
    predictions_file: str = ""
    cost: list[str] = field(default_factory=list)
    approximate: bool = False
    views: dict | None = None
    intervals: dict[tuple[str, str], tuple[Num, Num]] = field(default_factory=dict)
    vs: dict | None = None
    sel_is_se: bool = False


def _interval(res: dict, idx: int, split: str, metric: str, run: int) -> tuple[Num, Num] | None:
    """The recorded 95 % interval of one metric, as two tagged numbers (None when not recorded)."""
    iv = _get(res, ("metrics", split, "intervals", metric))
    if not (isinstance(iv, list) and len(iv) == 2):
        return None
    p = ("results", idx, "metrics", split, "intervals", metric)
    return Num(iv[0], p + (0,), METRIC_FMT, run), Num(iv[1], p + (1,), METRIC_FMT, run)


def _vs_view(res: dict, idx: int, run: int) -> dict | None:
    """How a result compares with the pick on the same images (``vs_pick``), as tagged numbers."""
    vs = res.get("vs_pick")
    if not isinstance(vs, dict):
        return None
    p = ("results", idx, "vs_pick")
    iv = vs.get("delta_interval") if isinstance(vs.get("delta_interval"), list) else [None, None]
    sel = vs.get("selection") if isinstance(vs.get("selection"), dict) else None
    return {"tied": bool(vs.get("tied")), "split": str(vs.get("split", "")),
            "delta": Num(vs.get("delta"), p + ("delta",), "+.3f", run),
            "lo": Num(iv[0], p + ("delta_interval", 0), "+.3f", run),
            "hi": Num(iv[1], p + ("delta_interval", 1), "+.3f", run),
            "p": Num(vs.get("p_holm"), p + ("p_holm",), ".3g", run),
            "pick_only": Num(vs.get("pick_only_right"), p + ("pick_only_right",), COUNT_FMT, run),
            "other_only": Num(vs.get("other_only_right"), p + ("other_only_right",), COUNT_FMT, run),
            "sel_tied": None if sel is None else bool(sel.get("tied")),
            "sel_method": "" if sel is None else str(sel.get("method", "")),
            "sel_p": Num(None) if sel is None else Num(sel.get("p_value"), p + ("selection", "p_value"), ".3g", run)}


def _split_view(run: int, idx: int, res: dict, split: str, class_names: list[str]) -> dict:
    """Metrics table, confusion matrix and per-class rows of one head on one split."""
    base = ("results", idx, "metrics", split)
    m = res["metrics"].get(split) or {}
    scalars = [(label, Num(m.get(k), base + (k,), METRIC_FMT, run)) for k, label in MAIN_METRICS if k in m]
    cm = m.get("confusion_matrix") or []
    names = list(class_names) if len(class_names) == len(cm) else [str(i) for i in range(len(cm))]
    matrix = []
    for i, row in enumerate(cm):
        total = sum(v for v in row if isinstance(v, (int, float)))
        cells = []
        for j, v in enumerate(row):
            share = (v / total) if total else 0.0
            cells.append({
                "count": Num(v, base + ("confusion_matrix", i, j), COUNT_FMT, run),
                "share": f"{share:.2f}",
                "alpha": f"{0.08 + 0.82 * share:.2f}" if v else "0",
                "diag": i == j,
            })
        matrix.append({"name": names[i], "cells": cells})
    per_class = []
    for cls, d in (m.get("per_class") or {}).items():
        p = base + ("per_class", cls)
        per_class.append({
            "name": cls,
            "precision": Num(d.get("precision"), p + ("precision",), METRIC_FMT, run),
            "recall": Num(d.get("recall"), p + ("recall",), METRIC_FMT, run),
            "f1": Num(d.get("f1"), p + ("f1",), METRIC_FMT, run),
            "support": Num(d.get("support"), p + ("support",), COUNT_FMT, run),
        })
    return {"split": split, "n": Num(m.get("n"), base + ("n",), COUNT_FMT, run), "scalars": scalars,
            "names": names, "matrix": matrix, "per_class": per_class}


def _selection(res: dict) -> tuple[int | None, dict | None]:
    """The search entry of the chosen candidate, as results.json records it (``selection.index``)."""
    search = res.get("search") or []
    sel = res.get("selection") if isinstance(res.get("selection"), dict) else {}
    j = sel.get("index")
    if isinstance(j, int) and 0 <= j < len(search) and isinstance(search[j], dict):
        return j, search[j]
    return None, None


def _selection_scores(res: dict, entry: dict | None) -> list:
    """The scores behind a selection score: the chosen view mode's, else the chosen candidate's."""
    vsel = _get(res, ("views", "selection", _get(res, ("views", "chosen")) or ""))
    if isinstance(vsel, dict):
        return list(vsel.get("scores") or [])
    return list((entry or {}).get("scores") or [])


def _cost_notes(cost: Any) -> list[str]:
    """What the page says of how a head was fitted: approximation, streamed data, search subsample, index size."""
    if not isinstance(cost, dict):
        return []
    notes = []
    if cost.get("approximation"):
        notes.append(f"approximation ({cost.get('form')}): {cost['approximation']}")
    if cost.get("data") == "streamed":
        notes.append("features streamed from the cache (they exceed the memory budget)")
    if cost.get("subsample"):
        notes.append(f"hyperparameters searched on a stratified subsample of {cost.get('search_rows', 0):,} of "
                     f"{cost.get('train_rows', 0):,} training rows; refitted on all {cost.get('refit_rows', 0):,}")
    if cost.get("index_rows") and cost.get("index_rows") != cost.get("train_rows"):
        notes.append(f"k-NN index of {cost['index_rows']:,} training rows")
    if cost.get("note"):  # e.g. a fine-tuned model's: trained from the image files, not the cached features
        notes.append(str(cost["note"]))
    return notes


FROM_IMAGES = frozenset({"finetune"})
"""Heads trained from the image files (``python cli.py finetune``), not from the cached features: shown beside the
others with their own time, and left out of what the cache saved."""


def _from_images(view: "ResultView") -> bool:
    return view.head in FROM_IMAGES


def _views_view(ri: int, idx: int, res: dict, final_splits: Sequence[str]) -> dict | None:
    """What the page says of a head's augmented views (``results[].views``): the mode chosen, every mode's
    selection score, and the final splits without and with views (None when the caches had no views)."""
    v = res.get("views")
    if not isinstance(v, dict):
        return None
    base = ("results", idx, "views")
    spec = v.get("spec") if isinstance(v.get("spec"), dict) else {}
    sel = v.get("selection") if isinstance(v.get("selection"), dict) else {}
    modes = [{"mode": m, "chosen": m == v.get("chosen"),
              "mean": Num(_get(sel, (m, "mean")), base + ("selection", m, "mean"), METRIC_FMT, ri),
              "std": Num(_get(sel, (m, "std")), base + ("selection", m, "std"), METRIC_FMT, ri)
              if len(_get(sel, (m, "scores")) or []) > 1 else Num(None)}
             for m in (v.get("offered") or []) if m in sel]
    final = []
    for s in final_splits:
        f = _get(v, ("final", s))
        if isinstance(f, dict):
            p = base + ("final", s)
            final.append({"split": s,
                          "without": Num(_get(f, ("without", "accuracy")), p + ("without", "accuracy"), METRIC_FMT, ri),
                          "with": Num(_get(f, ("with", "accuracy")), p + ("with", "accuracy"), METRIC_FMT, ri),
                          "added": Num(_get(f, ("added", "accuracy")), p + ("added", "accuracy"), "+.3f", ri)})
    return {"chosen": str(v.get("chosen") or "none"), "n": spec.get("n") or v.get("available"),
            "kinds": ", ".join(str(k) for k in spec.get("kinds") or []), "modes": modes, "final": final,
            "notes": [str(n) for n in v.get("notes") or []], "used": len(v.get("offered") or []) > 1}


def _final_splits(r: dict[str, Any]) -> list[str]:
    """The splits the run reports on, the pick's split first when the protocol does not list it."""
    protocol = r.get("protocol") if isinstance(r.get("protocol"), dict) else {}
    best = r.get("best") or {}
    final_splits = [s for s in (protocol.get("final_splits") or []) if isinstance(s, str)]
    if best.get("split") and best["split"] not in final_splits:
        final_splits.insert(0, best["split"])
    return final_splits


def _counts_view(ri: int, ds: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """The images per split and class table."""
    counts = ds.get("counts") or {}
    count_splits = [s for s in ("train", "val", "test") if s in counts] + [
        s for s in counts if s not in ("train", "val", "test")]
    count_rows = []
    for cls in class_names or sorted({c for s in counts.values() for c in s}):
        cells = [Num(_get(counts, (s, cls)), ("dataset", "counts", s, cls), COUNT_FMT, ri) for s in count_splits]
        count_rows.append({"name": cls, "cells": cells,
                           "total": sum(c.value for c in cells if isinstance(c.value, int))})
    split_totals = [sum(v for v in (counts.get(s) or {}).values() if isinstance(v, int)) for s in count_splits]
    return {"count_splits": count_splits, "count_rows": count_rows, "split_totals": split_totals}


def _cache_view(ri: int, ci: int, c: dict[str, Any]) -> dict[str, Any]:
    """One cache record of the run."""
    base = ("caches", ci)
    return {
        "index": ci,
        "label": cache_label(c),
        "c": _fields(c, ("backbone_label", "backbone", "weights_source", "weights_sha256", "preprocess", "resize",
                         "feature", "path", "sha256", "created", "command", "weights_path")),
        "weights_file": Path(str(c.get("weights_path") or "")).name,
        "cache_file": Path(str(c.get("path") or "")).name,
        "input_size": Num(c.get("input_size"), base + ("input_size",), COUNT_FMT, ri),
        "n_rows": Num(c.get("n_rows"), base + ("n_rows",), COUNT_FMT, ri),
        "extract": Num(c.get("extract_seconds"), base + ("extract_seconds",), SECONDS_FMT, ri),
        "shape": "\u00d7".join(str(v) for v in (c.get("feature_shape") or [])),
        "versions": c.get("versions") or {},
    }


def _selection_nums(ri: int, idx: int, r: dict[str, Any], res: dict[str, Any]) -> tuple[Num, Num, bool]:
    """A result's selection score and its spread as written (standard error, else the std of its fold scores), and
    whether the spread is a standard error."""
    base = ("results", idx)
    j, entry = _selection(res)
    sel = res.get("selection") if isinstance(res.get("selection"), dict) else {}
    sel_is_se = isinstance(sel.get("se"), (int, float))
    written = int(r.get("schema_version") or 1) >= 2  # version 1 files hold no selection: made up on reading
    if written and isinstance(sel.get("score"), (int, float)):  # the selection score as fit wrote it
        sel_mean = Num(sel["score"], base + ("selection", "score"), METRIC_FMT, ri)
    else:
        sel_mean = Num(entry.get("mean") if entry else None, base + ("search", j, "mean"), METRIC_FMT, ri)
    if sel_is_se:
        sel_std = Num(sel["se"], base + ("selection", "se"), METRIC_FMT, ri)
    elif written and isinstance(sel.get("std"), (int, float)) and len(_selection_scores(res, entry)) > 1:
        sel_std = Num(sel["std"], base + ("selection", "std"), METRIC_FMT, ri)
    elif entry and len(entry.get("scores") or []) > 1:
        sel_std = Num(entry.get("std"), base + ("search", j, "std"), METRIC_FMT, ri)
    else:
        sel_std = Num(None)  # one score (a validation split) and no standard error recorded: no spread
    return sel_mean, sel_std, sel_is_se


def _search_rows(ri: int, idx: int, res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every searched candidate of a result, the chosen one marked."""
    j, _entry = _selection(res)
    rows = []
    for k, e in enumerate(res.get("search") or []):
        if not isinstance(e, dict):
            continue
        sp = ("results", idx, "search", k)
        rows.append({
            "chosen": k == j,
            "params": [(pk, _param(pv, sp + ("params", pk), ri)) for pk, pv in (e.get("params") or {}).items()],
            "mean": Num(e.get("mean"), sp + ("mean",), METRIC_FMT, ri),
            "std": Num(e.get("std"), sp + ("std",), METRIC_FMT, ri) if len(e.get("scores") or []) > 1 else Num(None),
            "n_scores": len(e.get("scores") or []),
        })
    return rows


def _mistake_rows(ri: int, idx: int, res: dict[str, Any], root: Any, thumbs: dict[str, str | None] | None
                  ) -> list[dict[str, Any]]:
    """A result's listed mistakes (with thumbnails when ``thumbs`` is given: the pick's only)."""
    rows = []
    for k, mk in enumerate(res.get("mistakes") or []):
        if not isinstance(mk, dict):
            continue
        rel = str(mk.get("path") or "")
        rows.append({
            "path": rel, "split": mk.get("split", ""), "true": mk.get("true", ""), "pred": mk.get("pred", ""),
            "prob": Num(mk.get("prob"), ("results", idx, "mistakes", k, "prob"), METRIC_FMT, ri),
            "src": _thumbnail(root, rel, thumbs) if thumbs is not None else None,
        })
    return rows


def _result_view(ri: int, idx: int, r: dict[str, Any], columns: list[Column], final_splits: list[str],
                 thumbs: dict[str, str | None]) -> ResultView:
    """Everything the template shows of one result."""
    res = r["results"][idx]
    base = ("results", idx)
    ds = r.get("dataset") if isinstance(r.get("dataset"), dict) else {}
    protocol = r.get("protocol") if isinstance(r.get("protocol"), dict) else {}
    class_names = list(ds.get("class_names") or [])
    sel_mean, sel_std, sel_is_se = _selection_nums(ri, idx, r, res)
    cells = {(col.split, col.metric): Num(_get(res, ("metrics", col.split, col.metric)),
                                          base + ("metrics", col.split, col.metric), METRIC_FMT, ri)
             for col in columns}
    params = [(k, _param(v, base + ("params", k), ri)) for k, v in (res.get("params") or {}).items()]
    cache = (r.get("caches") or [{}])[int(res["cache_index"])]
    key = str(res["key"])
    is_best = key == (r.get("best") or {}).get("key")
    view = ResultView(
        run=ri, index=idx, anchor=f"r{ri}-{slug(key)}", key=key, head=str(res["head"]),
        backbone=str(res.get("backbone_label") or cache_label(cache)),
        cache_index=int(res["cache_index"]), is_best=is_best, params=params,
        selection_split=str(res.get("selection_split") or protocol.get("selection") or ""),
        sel_mean=sel_mean, sel_std=sel_std, cells=cells,
        fit=Num(res.get("fit_seconds"), base + ("fit_seconds",), SECONDS_FMT, ri),
        predict=Num(res.get("predict_ms_per_1000"), base + ("predict_ms_per_1000",), MS_FMT, ri),
        model_file=str(res.get("model_file") or ""), predictions_file=str(res.get("predictions_file") or ""),
        cost=_cost_notes(res.get("cost")),
        approximate=bool(isinstance(res.get("cost"), dict) and res["cost"].get("approximation")),
        intervals={(c.split, c.metric): iv for c in columns
                   if (iv := _interval(res, idx, c.split, c.metric, ri)) is not None},
        vs=_vs_view(res, idx, ri), sel_is_se=sel_is_se,
    )
    view.splits = [_split_view(ri, idx, res, s, class_names) for s in final_splits if s in res["metrics"]]
    view.views = _views_view(ri, idx, res, final_splits)
    view.search = _search_rows(ri, idx, res)
    if len(class_names) == 2 or any(_get(res, ("metrics", s, "roc")) for s in final_splits):
        view.curves = _plot_curves(res, final_splits, salt=f"{view.anchor}-curves")
    if isinstance(res.get("history"), dict):
        view.history = _plot_history(res["history"], salt=f"{view.anchor}-history")
    view.stopping = _stopping_view(res, base, ri)
    view.mistakes = _mistake_rows(ri, idx, res, ds.get("root"), thumbs if is_best else None)
    return view


def _timing_view(caches: list[dict[str, Any]], ordered: list[ResultView], salt: str) -> tuple[list[dict], str]:
    """The "extract once" table per cache and the time plot's rows (extraction, each head's fit, image heads)."""
    timing = []
    time_rows: list[tuple[str, float, bool]] = []
    for cache in caches:
        heads = [v for v in ordered if v.cache_index == cache["index"] and not _from_images(v)]
        extract = cache["extract"].value
        fits = [v.fit.value for v in heads if isinstance(v.fit.value, (int, float))]
        label = cache["label"] or f"cache {cache['index']}"
        time_rows.append((f"extract {label}", extract, True))
        time_rows.extend((f"{v.head} ({label})" if len(caches) > 1 else v.head, v.fit.value, False) for v in heads)
        time_rows.extend(_image_time_rows(ordered, cache["index"], label if len(caches) > 1 else ""))
        if isinstance(extract, (int, float)) and heads:
            with_cache = extract + sum(fits)
            without = extract * len(heads) + sum(fits)
            timing.append({"label": label, "extract": cache["extract"], "n": len(heads),
                           "fit_total": f"{sum(fits):.2f}", "with_cache": f"{with_cache:.2f}",
                           "without": f"{without:.2f}",
                           "factor": f"{without / with_cache:.1f}" if with_cache > 0 else "\u2014"})
    return timing, _plot_times(time_rows, salt=salt)


def _run_view(ri: int, run: Run, columns: list[Column], thumbs: dict[str, str | None]) -> dict:
    """Everything the template shows of one run."""
    r = run.results
    ds = r.get("dataset") if isinstance(r.get("dataset"), dict) else {}
    protocol = r.get("protocol") if isinstance(r.get("protocol"), dict) else {}
    class_names = list(ds.get("class_names") or [])
    best = r.get("best") or {}
    best_key = best.get("key")
    final_splits = _final_splits(r)
    caches = [_cache_view(ri, ci, c) for ci, c in enumerate(r.get("caches") or [])]
    results = [_result_view(ri, idx, r, columns, final_splits, thumbs) for idx in range(len(r["results"]))]

    # leaderboard order: by backbone (cache order), then by selection score, best first
    def order(v: ResultView) -> tuple:
        mean = v.sel_mean.value if isinstance(v.sel_mean.value, (int, float)) else float("-inf")
        return (v.cache_index, -mean, v.index)

    ordered = sorted(results, key=order)
    timing, time_plot = _timing_view(caches, ordered, salt=f"r{ri}-times")
    ratio = ds.get("imbalance_ratio")
    return {
        "index": ri, "name": run.name, "path": str(run.path),
        "r": _fields(r, ("seed", "created", "command")), "best_key": "" if best_key is None else str(best_key),
        "ds": _fields(ds, ("name", "root", "split_rule", "split_source")),
        "protocol": _fields(protocol, ("description", "selection", "cv_folds")),
        "class_names": class_names, **_counts_view(ri, ds, class_names),
        "failed": [f for f in (ds.get("failed") or []) if isinstance(f, dict)],
        "imbalance": Num(ratio, ("dataset", "imbalance_ratio"), RATIO_FMT, ri),
        "imbalance_warn": isinstance(ratio, (int, float)) and ratio >= IMBALANCE_WARN,
        "caches": caches, "results": ordered, "best": next((v for v in results if v.is_best), None),
        "best_value": Num(best.get("value"), ("best", "value"), METRIC_FMT, ri),
        "best_facts": _best_facts(best, ri),
        "tied_views": [v for v in ordered if v.vs and v.vs["tied"]],
        "best_split": best.get("split", ""), "best_metric": best.get("metric", "accuracy"),
        "final_splits": final_splits, "timing": timing, "time_plot": time_plot,
        "versions": r.get("versions") or {},
        "skipped": [{"head": str(sk.get("head", "")), "backbone": str(sk.get("backbone_label", "")),
                     "reason": str(sk.get("reason", ""))} for sk in (r.get("skipped") or []) if isinstance(sk, dict)],
        "budget": _budget(r.get("memory_budget")),
        "search": _search_note(protocol.get("search") if isinstance(protocol.get("search"), dict) else None),
        "audit": _audit_view(ri, run, thumbs),
    }


AUDIT_SHOWN = 8
"""Duplicate pairs, suspect labels and outliers shown with thumbnails (the files hold them all)."""


def _audit_view(ri: int, run: Run, thumbs: dict[str, str | None]) -> dict | None:
    """The "Data audit" section of one run: its counts from results.json, its top items from the audit files."""
    au = run.results.get("audit")
    if not isinstance(au, dict):
        return None
    files = read_audit(run) or {}
    root = _get(run.results, ("dataset", "root"))

    def item(row: dict[str, str]) -> dict[str, Any]:
        return {**row, "src": _thumbnail(root, row.get("path", ""), thumbs)}

    dups = files.get("duplicates", [])
    where = {r["path"]: r for r in dups}
    pairs, seen = [], set()
    for r in dups:
        if r["cluster"] in seen or len(pairs) >= AUDIT_SHOWN:
            continue
        seen.add(r["cluster"])
        other = where.get(r["nearest"], {"path": r["nearest"], "split": "", "class": ""})
        pairs.append({"kind": r["kind"].replace("_", " "), "distance": r["distance"], "a": item(r),
                      "b": item(other), "size": sum(1 for x in dups if x["cluster"] == r["cluster"])})
    d = au.get("duplicates") if isinstance(au.get("duplicates"), dict) else {}
    leaks = _get(au, ("leaks", "counts")) or {}
    return {
        "cache": str(_get(au, ("cache", "backbone_label")) or ""),
        "chosen_by": str(_get(au, ("cache", "chosen_by")) or ""),
        "images": Num(au.get("images"), ("audit", "images"), COUNT_FMT, ri),
        "exact": Num(d.get("exact_pairs"), ("audit", "duplicates", "exact_pairs"), COUNT_FMT, ri),
        "near": Num(d.get("near_pairs"), ("audit", "duplicates", "near_pairs"), COUNT_FMT, ri),
        "clusters": [(k.replace("_", " "), Num(v, ("audit", "duplicates", "clusters", k), COUNT_FMT, ri))
                     for k, v in (d.get("clusters") or {}).items()],
        "dup_rule": str(d.get("rule") or ""),
        "leaks": [(s, Num(v, ("audit", "leaks", "counts", s), COUNT_FMT, ri)) for s, v in leaks.items()],
        "leaked": sum(v for v in leaks.values() if isinstance(v, int)),
        "excluded": bool(_get(au, ("leaks", "excluded"))),
        "labels_n": Num(_get(au, ("label_issues", "count")), ("audit", "label_issues", "count"), COUNT_FMT, ri),
        "label_rule": str(_get(au, ("label_issues", "rule")) or ""),
        "outliers_n": Num(_get(au, ("outliers", "count")), ("audit", "outliers", "count"), COUNT_FMT, ri),
        "outlier_rule": str(_get(au, ("outliers", "rule")) or ""),
        "skipped": [str(x) for x in au.get("skipped") or []],
        "pairs": pairs,
        "labels": [item(r) for r in files.get("label_issues", [])[:AUDIT_SHOWN]],
        "outliers": [item(r) for r in files.get("outliers", [])[:AUDIT_SHOWN]],
        "files": [str(v) for v in (au.get("files") or {}).values()],
    }


def _leak_free(best: dict, ri: int) -> dict | None:
    """The pick's number on the images of its split without a duplicate in train (``best.leak_free``)."""
    lf = best.get("leak_free")
    if not isinstance(lf, dict):
        return None
    iv = lf.get("interval") if isinstance(lf.get("interval"), list) else None
    base = ("best", "leak_free")
    return {"accuracy": Num(lf.get("accuracy"), base + ("accuracy",), METRIC_FMT, ri),
            "n": Num(lf.get("n"), base + ("n",), COUNT_FMT, ri),
            "leaked": Num(lf.get("leaked"), base + ("leaked",), COUNT_FMT, ri),
            "lo": Num(iv[0], base + ("interval", 0), METRIC_FMT, ri) if iv else None,
            "hi": Num(iv[1], base + ("interval", 1), METRIC_FMT, ri) if iv else None}


def _best_facts(best: dict, ri: int) -> dict:
    """What the pick box says beyond the value: its rule and reason, interval, images, detectable difference."""
    iv = best.get("interval") if isinstance(best.get("interval"), list) else None
    mdd = best.get("min_detectable") if isinstance(best.get("min_detectable"), dict) else {}
    reason = best.get("reason") if isinstance(best.get("reason"), str) else None
    return {"rule": str(best.get("rule") or ""), "reason": Num(reason, ("best", "reason"), "", ri),
            "lo": Num(iv[0], ("best", "interval", 0), METRIC_FMT, ri) if iv else None,
            "hi": Num(iv[1], ("best", "interval", 1), METRIC_FMT, ri) if iv else None,
            "n": Num(best.get("n"), ("best", "n"), COUNT_FMT, ri),
            "mdd_images": Num(mdd.get("images"), ("best", "min_detectable", "images"), COUNT_FMT, ri),
            "mdd": Num(mdd.get("delta"), ("best", "min_detectable", "delta"), ".3f", ri),
            "within": [str(k) for k in best.get("within_one_se") or []], "leak_free": _leak_free(best, ri),
            "selection_is_final": bool(best.get("selection_is_final"))}


def _image_time_rows(views: Sequence["ResultView"], cache_index: int, label: str) -> list[tuple[str, float, bool]]:
    """Time-plot rows of the models trained from the image files on one backbone (their whole wall time)."""
    return [(f"{v.head} from images" + (f" ({label})" if label else ""), v.fit.value, True)
            for v in views if v.cache_index == cache_index and _from_images(v)]


def _budget(budget: Any) -> str:
    """The memory budget of the fit, as the page states it."""
    if not isinstance(budget, dict) or not isinstance(budget.get("bytes"), (int, float)):
        return ""
    return f"{budget['bytes'] / 1e9:.1f} GB ({budget.get('source', '')})"


def _search_note(search: dict | None) -> str:
    """One sentence on the search rows, when they are a subsample."""
    if not search or not search.get("subsample"):
        return ""
    return (f"Hyperparameters were searched on a stratified subsample of {search.get('search_rows', 0):,} of the "
            f"{search.get('train_rows', 0):,} training rows; every chosen head was refitted on all of them.")


def _columns(runs: Sequence[Run]) -> list[Column]:
    """Leaderboard metric columns: every main metric on each run's reporting split, accuracy on other final ones."""
    columns: list[Column] = []
    seen: set[tuple[str, str]] = set()

    def add(split: str, metric: str, label: str) -> None:
        if (split, metric) not in seen:
            seen.add((split, metric))
            columns.append(Column(split, metric, label))

    for run in runs:
        r = run.results
        primary = (r.get("best") or {}).get("split") or ((r.get("protocol") or {}).get("final_splits") or [""])[0]
        present = {k for res in r["results"] for k in ((res.get("metrics") or {}).get(primary) or {})}
        for metric, label in MAIN_METRICS:
            if metric in present:
                add(primary, metric, label)
    for run in runs:
        for split in (run.results.get("protocol") or {}).get("final_splits") or []:
            if any(_get(res, ("metrics", split, "accuracy")) is not None for res in run.results["results"]):
                add(split, "accuracy", "Accuracy")
    return columns


def _environment() -> jinja2.Environment:
    """The jinja2 environment of the report templates (autoescape on, undefined names are errors)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "j2"), default_for_string=True,
                                            default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pretty"] = lambda v: json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
    return env


def render_compare(doc: dict[str, Any]) -> str:
    """Render the ``compare`` page of a comparison already made (:func:`pipeline.compare.compare_runs`)."""
    template = _environment().get_template("compare.html.j2")
    return template.render(doc=doc, written=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                           version=__version__)


def render_report(runs: Sequence[Run], compare_href: str | None = None,
                  problems: dict[int, str] | None = None) -> str:
    """Render the HTML page of already loaded runs.

    Parameters
    ----------
    runs : sequence of Run
        Runs from :func:`load_run`, in the order they are shown.
    compare_href : str, optional
        Link to the runs' compare page (written by ``report`` with several runs), shown at the top.
    problems : dict of int to str, optional
        Run index -> why its pick cannot be used (:func:`pipeline.results.pick_file_problem`), shown in its pick box.

    Returns
    -------
    str
        The complete, self-contained HTML document.
    """
    columns = _columns(runs)
    thumbs: dict[str, str | None] = {}
    views = [_run_view(i, run, columns, thumbs) for i, run in enumerate(runs)]
    for i, v in enumerate(views):
        v["pick_problem"] = (problems or {}).get(i)
    datasets = sorted({str((run.results.get("dataset") or {}).get("name", "")) for run in runs})
    backbones: list[str] = []
    for v in views:
        for c in v["caches"]:
            label = c["label"]
            if label not in backbones:
                backbones.append(label)
    template = _environment().get_template("report.html.j2")
    return template.render(
        runs=views,
        columns=columns,
        multi=len(views) > 1,
        datasets=datasets,
        backbones=backbones,
        n_results=sum(len(v["results"]) for v in views),
        selection_splits=sorted({r.selection_split for v in views for r in v["results"]}),
        has_spread=any(r.sel_std.value is not None for v in views for r in v["results"]),
        has_se=any(r.sel_is_se for v in views for r in v["results"]),
        has_vs=any(r.vs is not None for v in views for r in v["results"]),
        written=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        version=__version__,
        lower_is_better=LOWER_IS_BETTER,
        thumb_px=THUMB_PX,
        compare_href=compare_href,
    )
