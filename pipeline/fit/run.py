"""The fit stage: cached features in, a run folder out (results.json, fitted heads, predictions, leaderboard).

One run compares heads on one dataset, across one or several feature caches of it (e.g. MobileNet and
MobileNetV2), by the protocol of :mod:`pipeline.fit.protocol`. All caches of a run are aligned on the images they
have in common, so every head and backbone is scored on the same rows and the same folds.

:func:`run_fit` is three steps: **plan** (open every cache once, align, decide the splits and the protocol, the
search rows, and per cache and head where the features live and which form fits the head:
:mod:`pipeline.fit.plan`), **evaluate** (search, refit and predict each head: :mod:`pipeline.fit.evaluate`), and
**write** (the fitted heads and predictions as each head finishes, then results.json: :mod:`pipeline.fit.output`).

Run folder (default ``reports/runs/<dataset>_<YYYYmmdd-HHMMSS>/``)::

    results.json                 schema v2, documented in docs/results-format.md
    heads/<key>.joblib           scikit-learn Pipeline (joblib.load; predict() returns class names)
    heads/<key>.keras            dense head: plain Keras model, raw features in, softmax over class_names out
    predictions/<key>.csv        path,split,true,pred,p_<class>... for every row of the final splits

where ``<key>`` is ``<backbone label slug>__<head>`` (e.g. ``mobilenet_v2-a1.0-224__logreg``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.audit import Audit, AuditConfig, AuditImages, AuditSource, run_audit, write_audit
from pipeline.errors import FitError
from pipeline.fit.evaluate import FitData, evaluate_planned, make_context
from pipeline.fit.heads import HEADS, resolve_heads
from pipeline.fit.inputs import Inputs, open_inputs
from pipeline.fit.leaderboard import leaderboard_table
from pipeline.fit.output import (cache_entry, dataset_entry, default_out, discard_run_dir, prepare_run_dir,
                                 publish_run_dir, result_key, results_doc, save_head, slug, write_predictions,
                                 write_splits)
from pipeline.fit.pick import DEFAULT_RULE, PICK_RULES
from pipeline.fit.plan import CachePlan, CostPolicy, MemoryBudget, memory_budget, plan_cache, plan_head
from pipeline.sizes import fmt_bytes
from pipeline.fit.protocol import EXCLUDED, SELECT_ON, Protocol, SearchRows, plan_protocol, search_rows
from pipeline.results import SCHEMA_VERSION, file_sha256, write_results
from pipeline.stats import wilson_interval

__all__ = ["FitRun", "run_fit", "leaderboard_table", "result_key", "FEATURE_KINDS", "CLASS_WEIGHTS"]

FEATURE_KINDS = ("avg", "max", "maps")
CLASS_WEIGHTS = ("none", "balanced")


@dataclass
class FitRun:
    """What :func:`run_fit` made.

    Attributes
    ----------
    run_dir : Path
        The run folder.
    results : dict
        The content of ``results.json``.
    report_path : Path or None
        The HTML report, when one was written.
    """

    run_dir: Path
    results: dict[str, Any]
    report_path: Path | None = None

    def leaderboard(self):
        """The leaderboard as a ``rich.table.Table`` (see :func:`leaderboard_table`)."""
        return leaderboard_table(self.results)


@dataclass
class _Plan:
    """Everything decided before the first head is fitted."""

    inputs: Inputs
    splits: np.ndarray
    protocol: Protocol
    search: SearchRows
    caches: list[CachePlan]
    budget: MemoryBudget
    policy: CostPolicy


def _plan(inputs: Inputs, splits: np.ndarray, protocol: Protocol, seed: int, budget: MemoryBudget,
          policy: CostPolicy) -> _Plan:
    used = int(np.isin(splits, ["train", *protocol.final_splits]).sum())
    caches = [plan_cache(used, tuple(r.shape), budget, policy) for r in inputs.readers]
    max_rows = min(c.search_max_rows for c in caches)
    srows = search_rows(protocol, splits, inputs.labels, seed, max_rows)
    return _Plan(inputs, splits, protocol, srows, caches, budget, policy)


def _view_spec(reader: Any) -> dict[str, Any] | None:
    """The cache's view spec, or None when it holds no augmented views (then results record ``views: null``)."""
    spec = reader.meta.get("views")
    return dict(spec) if isinstance(spec, dict) and int(spec.get("n", 0) or 0) > 0 else None


def _views_note(reader: Any, cplan: CachePlan, policy: CostPolicy, use_views: bool, features: str) -> str:
    """Why the cache's views cannot be used by this fit (empty when they can)."""
    if not use_views:
        return "turned off (--no-views)"
    if not reader.n_views:
        return (f"the cache stores no views of {features!r} features (views of spatial maps are never stored; fit "
                f"--features avg or max to use them)")
    if not cplan.in_memory:
        return ("the features are streamed from the cache (over the memory budget); views are used by heads whose "
                "features and views fit in memory")
    need = policy.memory_factor * cplan.feature_bytes * (1 + reader.n_views)
    if need > cplan.budget.bytes:
        return (f"the features with their {reader.n_views} views per image would need {fmt_bytes(int(need))}, over "
                f"the memory budget of {fmt_bytes(cplan.budget.bytes)}")
    return ""


def _load(plan: _Plan, ci: int, use_views: bool = True, features: str = "avg") -> FitData:
    """The features of cache ``ci``: every row used, in memory, or only the search rows (the rest is streamed);
    with the views of every row used when the cache has them and they fit in memory."""
    inputs, cplan = plan.inputs, plan.caches[ci]
    reader, rows = inputs.readers[ci], inputs.rows[ci]
    if cplan.in_memory:
        held = np.flatnonzero(np.isin(plan.splits, ["train", *plan.protocol.final_splits]))
    else:
        held = plan.search.rows
    X = reader.read(rows[held])
    view_spec = _view_spec(reader)
    note = _views_note(reader, cplan, plan.policy, use_views, features) if view_spec else ""
    V = reader.read_views(rows[held]) if view_spec and not note else None
    return FitData(inputs.labels, inputs.class_names, tuple(reader.shape), X, held, cplan,
                   reader=None if cplan.in_memory else reader, reader_rows=None if cplan.in_memory else rows,
                   V=V, view_spec=view_spec, views_note=note)


def _views_line(res: Any, protocol: Protocol) -> str:
    """The log's view part of a head's line: the selection and final score without and with views."""
    v = res.views
    if v is None or len(v.offered) < 2:
        return ""
    sel = v.selection
    split = protocol.report_split
    fin = v.final.get(split, {})
    return (f"  views {v.chosen}: {protocol.selection} {sel['none']['mean']:.3f} -> {sel[v.chosen]['mean']:.3f}, "
            f"{split} {fin['without']['accuracy']:.3f} -> {fin['with']['accuracy']:.3f}")


def _correct_by_split(res: Any, labels: np.ndarray, splits: np.ndarray) -> dict[str, np.ndarray]:
    """Per final split, whether the head got each image right (images in run order: the same for every head)."""
    rows = res.final_rows
    right = np.argmax(res.proba, axis=1) == np.asarray(labels)[rows]
    return {str(s): right[splits[rows] == s] for s in np.unique(splits[rows])}


def _digests(inputs: Inputs) -> list[str]:
    """Each image's content digest, from the first cache (every cache of a run holds the same files)."""
    reader, rows = inputs.readers[0], inputs.rows[0]
    digests = getattr(reader, "digests", None) or [""] * len(reader.paths)
    return [str(digests[i]) for i in rows]


def _audit_images(inputs: Inputs, splits: np.ndarray, protocol: Protocol) -> AuditImages:
    return AuditImages(inputs.rel_paths, inputs.labels, splits, inputs.class_names, _digests(inputs),
                       protocol.final_splits)


def _audit_sources(inputs: Inputs) -> list[AuditSource]:
    def reader_of(reader: Any, rows: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return lambda idx: reader.read(rows[np.asarray(idx, dtype=np.int64)])

    return [AuditSource(str(r.meta.get("backbone_label") or r.meta.get("backbone")), Path(p).name, reader_of(r, rows))
            for r, p, rows in zip(inputs.readers, inputs.paths, inputs.rows)]


def _discard_on_error(run_dir: Path, final_dir: Path) -> Callable[..., bool]:
    """An exit callback for the fit's ExitStack: an error or interruption before the run is complete removes its
    unfinished folder (a fit does not resume head by head; the same command starts it again); a file that could
    not be written (disk full, permissions) becomes one line."""
    def on_exit(exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None:
            discard_run_dir(run_dir)
            if issubclass(exc_type, OSError):
                raise FitError(f"cannot write the run folder {final_dir} ({exc.strerror or exc}); nothing of this "
                               f"run was kept: free space or pass a writable --out, then rerun") from None
        return False

    return on_exit


def _audit_block(budget: MemoryBudget) -> int:
    """The audit's similarity block: the budget's buffer share (an eighth), between 16 MB and 256 MB."""
    return int(min(256 * 2**20, max(16 * 2**20, budget.buffer_bytes)))


def _exclude_leaks(splits: np.ndarray, leaked: np.ndarray, final_splits: Sequence[str]) -> np.ndarray:
    """The splits with every leaked final-split image moved to :data:`EXCLUDED` (train is never touched)."""
    out = np.where(leaked & np.isin(splits, list(final_splits)), EXCLUDED, splits)
    for s in final_splits:
        if (splits == s).any() and not (out == s).any():
            raise FitError(f"every {s} image has a duplicate in train: --exclude-leaks would leave nothing to "
                           f"report on; see the audit without --exclude-leaks")
    return out


def _leak_free(res: Any, splits: np.ndarray, leaked: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Per final split with leaks, the accuracy on its images without a duplicate in train (with its interval)."""
    rows = res.final_rows
    right = np.argmax(res.proba, axis=1) == np.asarray(labels)[rows]
    out = {}
    for s in np.unique(splits[rows]):
        m = splits[rows] == s
        leak = leaked[rows][m]
        if leak.any():
            ok = right[m][~leak]
            out[str(s)] = {"n": int(len(ok)), "leaked": int(leak.sum()),
                           "accuracy": float(ok.mean()) if len(ok) else None,
                           "interval": wilson_interval(int(ok.sum()), int(len(ok)))}
    return out


def run_fit(cache_dir: str | Path = "cache", *, caches: Sequence[str | Path] | None = None,
            dataset: str | None = None, backbones: Sequence[str] | None = None,
            heads: Sequence[str] | None = None, features: str = "avg", class_weight: str = "none", seed: int = 0,
            out: str | Path | None = None, report: bool = True, command: str = "",
            memory_budget_text: str | None = None, policy: CostPolicy | None = None,
            log: Callable[[str], None] | None = None, views: bool = True, pick: str = DEFAULT_RULE,
            select_on: str = "auto", audit: bool = True, exclude_leaks: bool = False,
            audit_config: AuditConfig | None = None) -> FitRun:
    """Fit and compare heads on cached features and write a run folder.

    Parameters
    ----------
    cache_dir : path, default "cache"
        Folder searched for complete caches (ignored when ``caches`` is given).
    caches : sequence of path, optional
        Explicit cache files (all of one dataset).
    dataset : str, optional
        Dataset to pick when the folder holds caches of several datasets: its name, or its folder (a path) when
        two datasets share a name. Default: the dataset extracted last (``log`` is told which).
    backbones : sequence of str, optional
        Keep only caches of these backbones (name like ``mobilenet_v2`` or label like ``mobilenet_v2-a1.0-224``).
    heads : sequence of str, optional
        Head names or ``all`` (default: all registered heads).
    features : {"avg", "max", "maps"}
        Which cached features to fit on (``maps`` must have been extracted with ``--maps``).
    class_weight : {"none", "balanced"}
    seed : int
        Seed of the hash split, the folds, the search subsample and every head.
    out : path, optional
        Run folder (must not exist or be empty); default ``reports/runs/<dataset>_<timestamp>``.
    report : bool
        Also write the HTML report, ``reports/<run folder name>.html``, with :func:`pipeline.report.write_report`.
    command : str
        The command line, recorded as provenance.
    memory_budget_text : str, optional
        ``--memory-budget`` (e.g. ``"2GB"``): how much memory the features may take; default half of the machine's
        memory. Features that do not fit are streamed from the cache (see :mod:`pipeline.fit.plan`).
    policy : CostPolicy, optional
        Thresholds of the cost plan (default: the documented ones).
    log : callable, optional
        Receives one line per fitted or skipped head (progress).
    views : bool, default True
        Let every head choose among view modes when the caches hold augmented views (``extract --views K``; see
        :mod:`pipeline.fit.views`); False fits on centre views only (recorded as turned off).
    pick : str, default "one_se"
        The rule that picks the recommended result from the selection scores (:mod:`pipeline.fit.pick`).
    select_on : {"auto", "cv", "val"}
        Where hyperparameters and the pick are chosen (:data:`pipeline.fit.protocol.SELECT_ON`).
    audit : bool, default True
        Audit the images once the splits are fixed (duplicates, leaks, suspect labels, outliers:
        :mod:`pipeline.audit`), into ``audit/`` and results.json's ``audit``.
    exclude_leaks : bool, default False
        Move every final-split image with a duplicate in train out of the final split (its split becomes
        ``excluded``); needs ``audit``.
    audit_config : AuditConfig, optional
        The audit's settings (default: the documented rules).

    Returns
    -------
    FitRun

    Raises
    ------
    FitError
        Unknown head, feature kind, class weight or memory size; a ``dataset`` name two dataset folders share; caches of
        different datasets or class sets; data the protocol cannot use (see
        :func:`pipeline.fit.protocol.plan_protocol`); an existing non-empty ``out``; every head skipped.
    CacheError
        No cache found, or one that cannot be read.
    """
    say = log or (lambda _m: None)
    head_list = resolve_heads(list(heads) if heads else None)
    if pick not in PICK_RULES:
        raise FitError(f"unknown --pick {pick!r}; choose one of {', '.join(PICK_RULES)}")
    if select_on not in SELECT_ON:
        raise FitError(f"unknown --select-on {select_on!r}; choose one of {', '.join(SELECT_ON)}")
    if features not in FEATURE_KINDS:
        raise FitError(f"unknown --features {features!r}; choose one of {', '.join(FEATURE_KINDS)}")
    if class_weight not in CLASS_WEIGHTS:
        raise FitError(f"unknown --class-weight {class_weight!r}; choose one of {', '.join(CLASS_WEIGHTS)}")
    cw = "balanced" if class_weight == "balanced" else None
    if exclude_leaks and not audit:
        raise FitError("--exclude-leaks needs the audit (drop --no-audit)")
    budget = memory_budget(memory_budget_text)
    policy = policy or CostPolicy()

    with contextlib.ExitStack() as stack:
        # ---- plan
        inputs = open_inputs(stack, cache_dir, caches, dataset, backbones, features, say)
        splits, protocol = plan_protocol(inputs.cached_splits, inputs.labels, inputs.class_names, inputs.rel_paths,
                                         seed, select_on)
        found: Audit | None = None
        if audit:
            found = run_audit(_audit_images(inputs, splits, protocol), _audit_sources(inputs),
                              audit_config or AuditConfig(seed=seed, block_bytes=_audit_block(budget),
                                                       memory_bytes=budget.bytes),
                              exclude_leaks)
            for line in found.lines():
                say(line)
            if exclude_leaks:
                splits = _exclude_leaks(splits, found.leaked, protocol.final_splits)
        plan = _plan(inputs, splits, protocol, seed, budget, policy)
        final_dir = Path(out) if out is not None else default_out(inputs.dataset_name)
        run_dir = prepare_run_dir(final_dir, say)  # built hidden; appears at final_dir only when complete
        stack.push(_discard_on_error(run_dir, final_dir))
        splits, protocol = plan.splits, plan.protocol
        if plan.search.subsample:
            say(f"hyperparameter search on a stratified subsample of {plan.search.fit_rows:,} of "
                f"{plan.search.train_rows:,} training rows; each chosen head is refitted on all of them")

        # ---- evaluate (and write each head's files as it finishes)
        cache_json, results, skipped = [], [], []
        correct: dict[str, dict[str, np.ndarray]] = {}
        used_labels: set[str] = set()
        for ci, reader in enumerate(inputs.readers):
            cplan = plan.caches[ci]
            cache_json.append(cache_entry(reader, features, cplan.data, cplan.feature_bytes))
            label = str(reader.meta.get("backbone_label") or reader.meta.get("backbone"))
            slug_label = slug(label)
            if slug_label in used_labels:
                slug_label = f"{slug_label}-{ci}"
            used_labels.add(slug_label)
            if not cplan.in_memory:
                say(f"{label}: {cplan.reason}")
            data = _load(plan, ci, views, features)
            if data.view_spec is not None:
                k = int(data.view_spec["n"])
                say(f"{label}: {k} augmented view{'s' if k > 1 else ''} per image "
                    f"({', '.join(data.view_spec.get('kinds', []))}): "
                    + (f"not used: {data.views_note}" if data.views_note else
                       "each head chooses none / train / tta / both on the selection split"))
            ctx = make_context(reader.shape, inputs.labels, splits, len(inputs.class_names), seed, cw)
            for name in head_list:
                spec = HEADS[name]
                key = result_key(slug_label, name)
                hp = plan_head(spec, ctx, cplan, plan.search.fit_rows, policy)
                if hp.skipped:
                    skipped.append({"key": key, "cache_index": ci, "backbone_label": label, "head": name,
                                    "reason": hp.skipped, "cost": hp.to_json(plan.search.to_json())})
                    say(f"{label:<24} {name:<11} skipped: {hp.skipped}")
                    continue
                t0 = time.perf_counter()
                res = evaluate_planned(spec, hp, data, splits, inputs.rel_paths, protocol, plan.search)
                model_file = save_head(res, spec.kind, run_dir / "heads", key)
                write_predictions(run_dir / "predictions" / f"{key}.csv", res, inputs.rel_paths, splits,
                                  inputs.labels, inputs.class_names)
                results.append({"key": key, "cache_index": ci, "backbone_label": label, **res.to_json(),
                                "model_file": model_file, "model_sha256": file_sha256(run_dir / model_file),
                                "predictions_file": f"predictions/{key}.csv"})
                if found is not None and not exclude_leaks and found.leaked.any():
                    results[-1]["leak_free"] = _leak_free(res, splits, found.leaked, inputs.labels)
                correct[key] = _correct_by_split(res, inputs.labels, splits)
                rep = res.metrics[protocol.report_split]
                form = "" if hp.form is None or hp.form.exact else f" [{hp.form.name}]"
                say(f"{label:<24} {name:<11} {protocol.selection} acc {res.selection_score:.3f}  "
                    f"{protocol.report_split} acc {rep['accuracy']:.3f}  ({time.perf_counter() - t0:.1f} s){form}"
                    + _views_line(res, protocol))
                del res
            del data

        # ---- write
        protocol_json = {**protocol.to_json(), "search": plan.search.to_json(),
                         "search_max_rows": int(policy.search_max_rows)}
        doc = results_doc(
            SCHEMA_VERSION, command or f"run_fit(heads={head_list}, features={features!r}, seed={seed})", seed,
            dataset_entry(inputs.dataset_name, str(inputs.meta.get("dataset_root", "")), inputs.class_names,
                          inputs.labels, splits, protocol, inputs.failed()),
            protocol_json, cache_json, results, skipped, budget.to_json(), protocol.report_split, correct, pick,
            None if found is None else found.to_json(write_audit(run_dir, found)))
        b = doc["best"]
        iv = b.get("interval")
        say(f"pick ({pick}): {b['key']}, {b['split']} accuracy {b['value']:.3f}"
            + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "") + f" on {b['n']} images: {b['reason']}"
            + (f" Tied with it on {b['split']}: {', '.join(b['tied_with'])}." if b["tied_with"] else ""))
        lf = b.get("leak_free")
        if lf:
            say(f"  without leaks: {b['split']} accuracy " + (f"{lf['accuracy']:.3f}" if lf["accuracy"] is not None
                                                               else "n/a")
                + (f" [{lf['interval'][0]:.3f}, {lf['interval'][1]:.3f}]" if lf.get("interval") else "")
                + f" on the {lf['n']:,} {b['split']} images without a duplicate in train")
        write_splits(run_dir / "splits.csv", inputs.rel_paths, splits, inputs.labels, inputs.class_names,
                     _digests(inputs))
    try:
        write_results(run_dir, doc)
        publish_run_dir(run_dir, final_dir)
    except BaseException as exc:
        discard_run_dir(run_dir)
        if isinstance(exc, OSError):
            raise FitError(f"cannot write the run folder {final_dir} ({exc.strerror or exc}); nothing of this run "
                           f"was kept: free space or pass a writable --out, then rerun") from None
        raise

    run = FitRun(run_dir=final_dir, results=doc)
    if report:
        from pipeline.report import write_report

        run.report_path = write_report([final_dir])  # reports/<run name>.html, as `python cli.py report RUN` does
    return run
