"""The batch stage's entry points: one backbone (plan -> engine -> assemble), and every backbone of one command.

:func:`extract_dataset` takes a dataset folder and one resolved :class:`~pipeline.extract.config.ExtractConfig`,
plans the work against what earlier runs left (:mod:`pipeline.extract.plan`), runs the chosen engine (local
threads, or a Ray cluster) which commits finished rows as part files, and assembles the complete cache file, which
appears under its final name only once every row is done. A complete cache found damaged (checksums) is said to be
discarded and its rows are extracted again; finished parts are never thrown away.

:func:`extract_all` is ``python cli.py extract``: it discovers the folder once, resolves every backbone's
configuration (weights included) and checks every cache name before the first model is built, then runs
:func:`extract_dataset` (a seam) once per backbone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline import cache
from pipeline.atomic import Commit, commit_file
from pipeline.data import Dataset, discover
from pipeline.errors import CacheError
from pipeline.extract.config import ExtractConfig, ExtractOptions, fit_batch_to_checkpoint, resolve_config
from pipeline.extract.local import EngineReport, run_local
from pipeline.extract.plan import Plan, cache_file, plan_extraction
from pipeline.runtime.factory import RuntimeFactory, make_runtime
from pipeline.views import NO_VIEWS, ViewSpec


@dataclass
class ExtractResult:
    """Summary of one extraction (one dataset x one backbone configuration)."""

    path: Path
    n_total: int
    n_extracted: int
    n_reused: int
    n_dropped: int
    n_failed: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    up_to_date: bool = False


def run_engine(plan: Plan, log: Callable[[str], None], runtime_factory: RuntimeFactory = make_runtime,
               commit: Commit = commit_file) -> EngineReport:
    """Run ``plan.todo`` on the configured engine (the local one builds its runtime with ``runtime_factory`` and
    commits its parts with ``commit``; Ray's model actors build theirs with
    :func:`~pipeline.runtime.factory.make_runtime` and commit with :func:`~pipeline.atomic.commit_file` in their own
    processes)."""
    if plan.config.engine == "ray":
        from pipeline.extract.ray_engine import run_ray

        return run_ray(plan, log=log)
    return run_local(plan, log=log, runtime_factory=runtime_factory, commit=commit)


def resolve_views(config: ExtractConfig, path: Path) -> ExtractConfig:
    """Fix the view spec: as asked, or (when not asked) as the existing cache or its unfinished parts have it."""
    if config.views is not None:
        return config
    try:
        return config.with_views(ViewSpec.from_json(cache.read_meta(path).get("views")))
    except CacheError:
        pass
    spec = cache.parts_views(path)
    return config.with_views(ViewSpec.from_json(spec) if spec is not None else NO_VIEWS)


def _views_words(views: dict[str, Any]) -> str:
    """The options that ask for ``views``: ``--views 4`` (kinds and seed where they are not the defaults)."""
    return " ".join(ViewSpec.from_json(views).cli_options())


def other_views_lines(plan: Plan) -> list[str]:
    """One line per view spec of an interrupted run's parts that this run does not use: kept or discarded, and why.

    A run without ``--views`` keeps the cache's views, so it never throws away the work of an interrupted run that
    asked for others: those parts stay for a rerun with that run's ``--views``. A run that asks for views replaces
    parts of other views, and says whose.

    Parameters
    ----------
    plan : Plan
        With ``other_views`` and ``other_views_kept`` set by :func:`~pipeline.extract.plan.plan_extraction`.

    Returns
    -------
    list of str
    """
    spec = plan.config.views or NO_VIEWS
    ours = _views_words(spec.to_json()) if spec.n else "no views"
    where = cache.parts_dir(plan.path).name
    lines = []
    for views, parts, rows in plan.other_views:
        theirs = _views_words(views)
        what = f"{parts} part(s) ({rows} rows) of an interrupted run with {theirs}"
        if plan.other_views_kept:
            lines.append(f"kept {what} in {where}/: this run has {ours}, as the cache has (no --views given); "
                         f"rerun with {theirs} to resume it, or delete those parts")
        else:
            lines.append(f"discarded {what}: this run asks for {ours}")
    return lines


def _failures(path: Path) -> list[tuple[str, str]]:
    rows = cache.read_rows(path)
    return [(p, e) for p, o, e in zip(rows.path, rows.ok, rows.error) if not o]


def _retries_unchanged(plan: Plan) -> bool:
    """Whether every retried row failed again exactly as before (same file digest, same reason)."""
    again = cache.scan_existing(plan.path, plan.meta).part_rows
    for q, old in plan.retried.items():
        new = again.get(q)
        if new is None or new[2].ok or (new[2].sha256, new[2].error) != (old.sha256, old.error):
            return False
    return True


def extract_dataset(root: str | os.PathLike | Dataset, config: ExtractConfig, log: Callable[[str], None] = print,
                    runtime_factory: RuntimeFactory = make_runtime, commit: Commit = commit_file) -> ExtractResult:
    """Extract features of every image under ``root`` into the cache (incremental, resumable).

    Parameters
    ----------
    root : path or Dataset
        Dataset folder (see :mod:`pipeline.data` for layouts), or an already discovered :class:`Dataset`.
    config : ExtractConfig
        From :func:`pipeline.extract.config.resolve_config`.
    log : callable
        Receives one-line messages.
    runtime_factory : callable
        Builds the local engine's runtime: ``(model, runtime, log=, batch_size=) -> Runtime``; the real
        :func:`~pipeline.runtime.factory.make_runtime` by default (a test hands in a wrapped or reused one).
    commit : callable
        Makes each written part and the assembled cache their files (:func:`pipeline.atomic.commit_file` by
        default; a test hands in one that records when parts are committed, or fails).

    Returns
    -------
    ExtractResult

    Raises
    ------
    DatasetError, CacheError
        For unusable input or cache folders (disk full, read-only: one line, finished rows kept; a cache name longer
        than the cache folder allows, before any work); with ``strict``,
        DatasetError at the first undecodable image (finished rows are kept).
    """
    ds = root if isinstance(root, Dataset) else discover(root)
    path = cache_file(ds, config)
    cache.check_name_fits(path, ds.root)  # before any work: an assembly that cannot be named would fail last
    w = config.model.weights
    if w.source == "none":
        log(f"WARNING: {config.model.backbone} runs with RANDOM weights (--weights none): features are not "
            f"ImageNet features")
    with cache.locked(path):
        cfg = resolve_views(config, path)
        for _attempt in range(3):  # a damaged old file is discarded and planned again (at most twice)
            plan = plan_extraction(ds, cfg, keep_other_views=config.views is None)
            for line in other_views_lines(plan) if _attempt == 0 else ():
                log(line)
            ex = plan.existing
            if ex.discarded and ex.discarded != "made with other settings":
                log(f"discarded {path.name}: {ex.discarded}; its rows are extracted again")
                cache.discard(path)
            elif ex.discarded:
                log(f"{path.name} was made with other settings (features, views or pixel rule); rebuilding it")
            if plan.stale_removed:
                log(f"discarded {plan.stale_removed} leftover file(s) of an interrupted write, another configuration "
                    f"or an earlier assembly")
            if plan.up_to_date:
                try:
                    cache.verify(path)
                except CacheError as exc:
                    log(f"discarded {path.name}: {exc}; its rows are extracted again")
                    cache.discard(path)
                    continue
                failed = _failures(path)
                log(f"{path.name}: up to date ({len(ds.items)} images, checksums verified, nothing to extract)")
                return ExtractResult(path, len(ds.items), 0, plan.n_reused, 0, len(failed), failed, up_to_date=True)
            try:
                return _run(plan, log, runtime_factory, commit)
            except cache.DamagedCache as exc:  # found while copying old rows: discard what is damaged, plan again
                log(f"discarded {exc.path.name}: {exc}; its rows are extracted again")
                exc.path.unlink(missing_ok=True)
        raise CacheError(f"cache {path} keeps failing its checksums after rebuilding; check the disk it is on")


def _run(plan: Plan, log: Callable[[str], None], runtime_factory: RuntimeFactory,
         commit: Commit = commit_file) -> ExtractResult:
    ds, cfg, ex = plan.dataset, plan.config, plan.existing
    w = cfg.model.weights
    views = cfg.views or NO_VIEWS
    retry = f", retrying {len(plan.retried)} that failed before" if plan.retried else ""
    log(f"{ds.name} x {cfg.label} ({cfg.resize}, weights {w.source}{' ' + w.sha256[:12] if w.sha256 else ''}"
        f"{f', {views.n} views ' + '+'.join(views.kinds) if views.n else ''}): {len(ds.items)} images; reusing "
        f"{plan.n_reused} finished rows{f' ({plan.n_resumed} from an interrupted run)' if plan.n_resumed else ''}, "
        f"extracting {len(plan.todo)}{retry}{f', dropping {plan.n_dropped} removed' if plan.n_dropped else ''}")
    if views.n:
        log(f"views: {views.describe()}")

    t0 = time.perf_counter()
    report = run_engine(plan, log, runtime_factory, commit) if plan.todo else None
    if plan.only_retries and _retries_unchanged(plan):
        cache.remove_parts(plan.path, keep=[p for p, _, _ in plan.existing.other_views])
        failed = _failures(plan.path)
        log(f"{len(plan.retried)} failed image(s) retried: still failing the same way; {plan.path.name} unchanged")
        return ExtractResult(plan.path, len(ds.items), len(plan.todo), plan.n_reused, 0, len(failed), failed,
                             time.perf_counter() - t0)
    meta = dict(plan.meta)
    prior = float(ex.meta.get("extract_seconds", 0.0)) if ex.meta else 0.0
    rescanned = cache.scan_existing(plan.path, meta)
    meta["extract_seconds"] = prior + rescanned.part_seconds
    shapes = cache.source_shapes(plan.path, rescanned)
    rows = cache.assemble(plan.path, meta, [(it.relpath, it.label, it.split) for it in ds.items], rescanned, shapes,
                          commit=commit)
    seconds = time.perf_counter() - t0
    all_failed = [(p, e) for p, o, e in zip(rows.path, rows.ok, rows.error) if not o]
    # decoding + model of this run's rows, summed over the engine's workers (each writes its own parts)
    run_s = (rescanned.part_seconds - ex.part_seconds) / max(1, report.workers if report else 1)
    ips = f", {len(plan.todo) / run_s:.1f} images/s after start-up" if report and run_s > 0 else ""
    log(f"wrote {plan.path} ({len(rows)} rows, {len(all_failed)} failed) in {seconds:.1f}s{ips}")
    return ExtractResult(plan.path, len(ds.items), len(plan.todo), plan.n_reused, plan.n_dropped,
                         len(all_failed), all_failed, seconds)


Extract = Callable[..., ExtractResult]
"""``extract(dataset, config, log=log) -> ExtractResult``: one backbone's extraction (:func:`extract_dataset`; a test
hands in one that records the configurations, or stops)."""


def dataset_line(ds: Dataset) -> str:
    """The one line ``extract`` says about the folder: images, classes, split folders, what was ignored."""
    splits = f" (split folders: {', '.join(sorted({i.split for i in ds.items}))})" if ds.has_splits else ""
    ignored = ds.ignored_summary()
    return (f"{ds.root}: {len(ds.items)} images in {len(ds.classes)} classes{splits}"
            f"{'; ignored ' + ignored if ignored else ''}")


def extract_all(data: str | os.PathLike | Dataset, options: ExtractOptions, backbones: Sequence[str], *,
                log: Callable[[str], None] = print, done: Callable[[ExtractResult], None] | None = None,
                extract: Extract = extract_dataset) -> list[ExtractResult]:
    """Extract every backbone's features of one folder: ``python cli.py extract``, without its option parsing.

    In this order: the batch is fitted to the checkpoint bound (said once, not once per backbone); the folder is
    discovered; every backbone's configuration is resolved (weights found or downloaded, options checked); the
    dataset line is said; every cache name is checked. Only then is the first backbone extracted, so that a bad
    option, missing weights or an impossible cache name of the last backbone stops the command before any model is
    built or image decoded.

    Parameters
    ----------
    data : path or Dataset
        The dataset folder (see :mod:`pipeline.data`), or an already discovered :class:`Dataset`.
    options : ExtractOptions
        What the user asked for; its ``backbone`` is replaced by each of ``backbones`` in turn.
    backbones : sequence of str
        Registered backbone names, extracted in this order.
    log : callable
        Receives one-line messages.
    done : callable, optional
        Told each backbone's result as soon as it is done (the command line prints its failures there, so they
        follow that backbone's lines and are said even if a later backbone is interrupted).
    extract : callable
        One backbone's extraction, ``extract(dataset, config, log=log)``: :func:`extract_dataset` by default (a
        test hands in one that records the configurations it is given, or stops).

    Returns
    -------
    list of ExtractResult
        One per backbone, in order.

    Raises
    ------
    DatasetError, BackboneError, WeightsError, CacheError
        As :func:`~pipeline.data.discover`, :func:`~pipeline.extract.config.resolve_config` and
        :func:`extract_dataset` raise them; a cache name that cannot fit, before any backbone is extracted.
    """
    options = fit_batch_to_checkpoint(options, log=log)
    ds = data if isinstance(data, Dataset) else discover(data)
    configs = [resolve_config(options, log=log, backbone=b) for b in backbones]
    log(dataset_line(ds))
    for cfg in configs:  # every cache can be named, before the first is made
        cache.check_name_fits(cache_file(ds, cfg), ds.root)
    results = []
    for cfg in configs:
        res = extract(ds, cfg, log=log)
        results.append(res)
        if done is not None:
            done(res)
    return results
