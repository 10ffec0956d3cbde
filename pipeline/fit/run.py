"""The fit stage: cached features in, a run folder out (results.json, fitted heads, predictions, leaderboard).

One run compares heads on one dataset, across one or several feature caches of it (e.g. MobileNet and
MobileNetV2), by the protocol of :mod:`pipeline.fit.protocol`. All caches of a run are aligned on the images they
have in common, so every head and backbone is scored on the same rows and the same folds.

:func:`run_fit` takes one :class:`~pipeline.fit.config.FitConfig` (checked when it was made) and is three steps:
**plan** (:func:`_plan_run`: open every cache once, align, decide the splits and the protocol, audit the images,
the search rows, and per cache where the features live: :mod:`pipeline.fit.plan`), **fit each cache**
(:func:`_fit_cache`: per head its form, then search, refit and predict it, :mod:`pipeline.fit.evaluate`, writing
its fitted head and predictions as it finishes) and **write** (:func:`_write_run`: the pick, the audit files,
splits.csv and results.json, :mod:`pipeline.fit.output`; then the folder is published whole). The HTML report is
not the fit's: its callers write it (:func:`pipeline.report.write_report`), as ``python cli.py fit`` does.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.audit import Audit, AuditImages, AuditSource, run_audit, write_audit
from pipeline.errors import FitError
from pipeline.fit.config import FitConfig
from pipeline.fit.evaluate import FitData, evaluate_planned, make_context
from pipeline.fit.heads import HEADS
from pipeline.fit.inputs import CacheSource, Inputs, open_inputs
from pipeline.fit.leaderboard import leaderboard_table
from pipeline.fit.output import default_out, discard_run_dir, pick_best, prepare_run_dir, publish_run_dir, save_head
from pipeline.fit.plan import CachePlan, CostPolicy, MemoryBudget, plan_cache, plan_head
from pipeline.fit.protocol import EXCLUDED, Protocol, SearchRows, plan_protocol, search_rows
from pipeline.results import (cache_label, cache_record, dataset_record, result_key, result_record, run_document,
                              skipped_record, slug, write_result_predictions, write_results,
                              write_splits)
from pipeline.sizes import fmt_bytes
from pipeline.stats import wilson_interval

__all__ = ["FitRun", "run_fit", "leaderboard_table", "result_key"]


@dataclass
class FitRun:
    """What :func:`run_fit` made.

    Attributes
    ----------
    run_dir : Path
        The run folder.
    results : dict
        The content of ``results.json``.
    """

    run_dir: Path
    results: dict[str, Any]

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
    audit: Audit | None

    @property
    def labels(self) -> list[tuple[str, str]]:
        """Per cache, its backbone label and the slug of its result keys (made unique within the run)."""
        return _cache_labels(self.inputs)


@dataclass
class _CacheFit:
    """What fitting the heads on one cache made: its results.json entries and each head's right/wrong per image."""

    cache: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    correct: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


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

    return [AuditSource(cache_label(r.meta), Path(p).name, reader_of(r, rows))
            for r, p, rows in zip(inputs.readers, inputs.paths, inputs.rows)]


def _write_fault(final_dir: Path, exc: OSError) -> FitError:
    """The one line of a run folder that could not be written (disk full, permissions)."""
    return FitError(f"cannot write the run folder {final_dir} ({exc.strerror or exc}); nothing of this run was "
                    f"kept: free space or pass a writable --out, then rerun")


def _discard_on_error(run_dir: Path, final_dir: Path) -> Callable[..., bool]:
    """An exit callback for the fit's ExitStack: an error or interruption before the run is complete removes its
    unfinished folder (a fit does not resume head by head; the same command starts it again); a file that could
    not be written (disk full, permissions) becomes one line."""
    def on_exit(exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None:
            discard_run_dir(run_dir)
            if issubclass(exc_type, OSError):
                raise _write_fault(final_dir, exc) from None
        return False

    return on_exit


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


def _cache_labels(inputs: Inputs) -> list[tuple[str, str]]:
    """Per cache, its backbone label and the slug of its result keys: a slug two caches share gets the second
    one's index (``mobilenet_v2-a1.0-224-1``), so that every key of the run is unique."""
    out, used = [], set()
    for ci, reader in enumerate(inputs.readers):
        label = cache_label(reader.meta)
        slug_label = slug(label)
        if slug_label in used:
            slug_label = f"{slug_label}-{ci}"
        used.add(slug_label)
        out.append((label, slug_label))
    return out


def _plan_run(stack: contextlib.ExitStack, config: FitConfig, say: Callable[[str], None],
              source: CacheSource) -> _Plan:
    """Open and align the caches of ``source`` (closed when ``stack`` closes), fix the splits and the protocol,
    audit the images (moving leaked final-split images out when asked), then plan each cache and the search rows."""
    inputs = open_inputs(stack, config.cache_dir, config.caches, config.dataset, config.backbones, config.features,
                         say, source)
    splits, protocol = plan_protocol(inputs.cached_splits, inputs.labels, inputs.class_names, inputs.rel_paths,
                                     config.seed, config.select_on)
    found: Audit | None = None
    if config.audit:
        found = run_audit(_audit_images(inputs, splits, protocol), _audit_sources(inputs), config.audit_settings(),
                          config.exclude_leaks)
        for line in found.lines():
            say(line)
        if config.exclude_leaks:
            splits = _exclude_leaks(splits, found.leaked, protocol.final_splits)
    budget, policy = config.budget, config.cost_policy
    used = int(np.isin(splits, ["train", *protocol.final_splits]).sum())
    caches = [plan_cache(used, tuple(r.shape), budget, policy) for r in inputs.readers]
    max_rows = min(c.search_max_rows for c in caches)
    srows = search_rows(protocol, splits, inputs.labels, config.seed, max_rows)
    return _Plan(inputs, splits, protocol, srows, caches, budget, policy, found)


def _fit_cache(plan: _Plan, ci: int, config: FitConfig, run_dir: Path, say: Callable[[str], None]) -> _CacheFit:
    """Fit every head of the run on cache ``ci``: its features loaded (or streamed) once, each head's files
    written as it finishes, one log line per head fitted or skipped."""
    inputs, cplan, reader = plan.inputs, plan.caches[ci], plan.inputs.readers[ci]
    label, slug_label = plan.labels[ci]
    part = _CacheFit(cache_record(reader.meta, reader.path, reader.shape, config.features, cplan.data,
                                  cplan.feature_bytes))
    if not cplan.in_memory:
        say(f"{label}: {cplan.reason}")
    data = _load(plan, ci, config.views, config.features)
    if data.view_spec is not None:
        k = int(data.view_spec["n"])
        say(f"{label}: {k} augmented view{'s' if k > 1 else ''} per image "
            f"({', '.join(data.view_spec.get('kinds', []))}): "
            + (f"not used: {data.views_note}" if data.views_note else
               "each head chooses none / train / tta / both on the selection split"))
    ctx = make_context(reader.shape, inputs.labels, plan.splits, len(inputs.class_names), config.seed,
                       config.head_class_weight)
    for name in config.heads:
        spec = HEADS[name]
        key = result_key(slug_label, name)
        hp = plan_head(spec, ctx, cplan, plan.search.fit_rows, plan.policy)
        if hp.skipped:
            part.skipped.append(skipped_record(key, ci, label, name, hp.skipped, hp.to_json(plan.search.to_json())))
            say(f"{label:<24} {name:<11} skipped: {hp.skipped}")
            continue
        t0 = time.perf_counter()
        res = evaluate_planned(spec, hp, data, plan.splits, inputs.rel_paths, plan.protocol, plan.search)
        _record_head(plan, res, spec.kind, run_dir, key, ci, label, config.exclude_leaks, part)
        rep = res.metrics[plan.protocol.report_split]
        form = "" if hp.form is None or hp.form.exact else f" [{hp.form.name}]"
        say(f"{label:<24} {name:<11} {plan.protocol.selection} acc {res.selection_score:.3f}  "
            f"{plan.protocol.report_split} acc {rep['accuracy']:.3f}  ({time.perf_counter() - t0:.1f} s){form}"
            + _views_line(res, plan.protocol))
        del res
    return part


def _record_head(plan: _Plan, res: Any, kind: str, run_dir: Path, key: str, ci: int, label: str,
               exclude_leaks: bool, part: _CacheFit) -> None:
    """Write one fitted head and its predictions into the run folder and add its result to ``part``."""
    inputs, splits, found = plan.inputs, plan.splits, plan.audit
    model_file = save_head(res, kind, run_dir / "heads", key)
    write_result_predictions(run_dir / "predictions" / f"{key}.csv", res.proba, res.final_rows, inputs.rel_paths,
                             splits, inputs.labels, inputs.class_names)
    entry = result_record(key, ci, label, res.to_json(), run_dir, model_file, f"predictions/{key}.csv")
    if found is not None and not exclude_leaks and found.leaked.any():
        entry["leak_free"] = _leak_free(res, splits, found.leaked, inputs.labels)
    part.results.append(entry)
    part.correct[key] = _correct_by_split(res, inputs.labels, splits)


def _say_pick(best: dict[str, Any], rule: str, say: Callable[[str], None]) -> None:
    """The log's lines of the pick: the chosen result with its interval and reason, and without leaks."""
    iv = best.get("interval")
    say(f"pick ({rule}): {best['key']}, {best['split']} accuracy {best['value']:.3f}"
        + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "") + f" on {best['n']} images: {best['reason']}"
        + (f" Tied with it on {best['split']}: {', '.join(best['tied_with'])}." if best["tied_with"] else ""))
    lf = best.get("leak_free")
    if lf:
        say(f"  without leaks: {best['split']} accuracy " + (f"{lf['accuracy']:.3f}" if lf["accuracy"] is not None
                                                              else "n/a")
            + (f" [{lf['interval'][0]:.3f}, {lf['interval'][1]:.3f}]" if lf.get("interval") else "")
            + f" on the {lf['n']:,} {best['split']} images without a duplicate in train")


def _write_run(plan: _Plan, parts: list[_CacheFit], config: FitConfig, run_dir: Path,
               say: Callable[[str], None]) -> dict[str, Any]:
    """The run's record from what every cache made: the audit files, the pick (said in the log) and splits.csv in
    the run folder; returns the content of results.json (written by :func:`_publish`)."""
    inputs, splits, protocol, found = plan.inputs, plan.splits, plan.protocol, plan.audit
    protocol_json = {**protocol.to_json(), "search": plan.search.to_json(),
                     "search_max_rows": int(plan.policy.search_max_rows)}
    audit_json = None if found is None else found.to_json(write_audit(run_dir, found))
    command = config.command or (f"run_fit(heads={list(config.heads)}, features={config.features!r}, "
                                 f"seed={config.seed})")
    correct = {k: v for p in parts for k, v in p.correct.items()}
    results, skipped = [r for p in parts for r in p.results], [s for p in parts for s in p.skipped]
    best = pick_best(results, skipped, correct, protocol.report_split, protocol.selection, config.pick, config.seed)
    doc = run_document(
        command, config.seed,
        dataset_record(inputs.dataset_name, str(inputs.meta.get("dataset_root", "")), inputs.class_names,
                       inputs.labels, splits, protocol.split_source, protocol.split_rule, inputs.failed()),
        protocol_json, [p.cache for p in parts], results, skipped, plan.budget.to_json(), best, audit_json)
    _say_pick(doc["best"], config.pick, say)
    write_splits(run_dir, inputs.rel_paths, splits, inputs.labels, inputs.class_names, _digests(inputs))
    return doc


def _publish(run_dir: Path, final_dir: Path, doc: dict[str, Any]) -> None:
    """Write results.json and move the complete run folder to ``final_dir``; on any failure nothing is kept."""
    try:
        write_results(run_dir, doc)
        publish_run_dir(run_dir, final_dir)
    except BaseException as exc:
        discard_run_dir(run_dir)
        if isinstance(exc, OSError):
            raise _write_fault(final_dir, exc) from None
        raise


def run_fit(config: FitConfig, *, log: Callable[[str], None] | None = None,
            source: CacheSource = CacheSource()) -> FitRun:
    """Fit and compare heads on cached features and write a run folder.

    The run folder is built hidden and appears at its place only when complete; an error or interruption keeps
    nothing of it. No HTML report is written: pass the run folder to :func:`pipeline.report.write_report`.

    Parameters
    ----------
    config : FitConfig
        What to fit, on which caches, and where to write it (every option, already checked).
    log : callable, optional
        Receives one line per fitted or skipped head (progress), and the dataset, audit and pick lines.
    source : CacheSource, optional
        Where the caches are found and opened (each once); default the cache files on disk. A stand-in (caches
        held in memory, or opens counted) overrides its ``scan`` and ``open``.

    Returns
    -------
    FitRun

    Raises
    ------
    FitError
        A ``dataset`` name two dataset folders share; caches of different datasets or class sets; data the protocol
        cannot use (see :func:`pipeline.fit.protocol.plan_protocol`); an existing non-empty ``out``; every head
        skipped; a run folder that cannot be written. (Bad options are refused earlier, by :class:`FitConfig`.)
    CacheError
        No cache found, or one that cannot be read.
    """
    say = log or (lambda _m: None)
    with contextlib.ExitStack() as stack:
        plan = _plan_run(stack, config, say, source)
        final_dir = Path(config.out) if config.out is not None else default_out(plan.inputs.dataset_name)
        run_dir = prepare_run_dir(final_dir, say)  # built hidden; appears at final_dir only when complete
        stack.push(_discard_on_error(run_dir, final_dir))
        if plan.search.subsample:
            say(f"hyperparameter search on a stratified subsample of {plan.search.fit_rows:,} of "
                f"{plan.search.train_rows:,} training rows; each chosen head is refitted on all of them")
        parts = [_fit_cache(plan, ci, config, run_dir, say) for ci in range(len(plan.inputs.readers))]
        doc = _write_run(plan, parts, config, run_dir, say)
    _publish(run_dir, final_dir, doc)
    return FitRun(run_dir=final_dir, results=doc)
