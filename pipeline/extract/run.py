"""The batch stage's one entry point: plan -> engine -> assemble.

:func:`extract_dataset` takes a dataset folder and one resolved :class:`~pipeline.extract.config.ExtractConfig`,
plans the work against what earlier runs left (:mod:`pipeline.extract.plan`), runs the chosen engine (local
threads, or a Ray cluster) which commits finished rows as part files, and assembles the complete cache file, which
appears under its final name only once every row is done.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline import cache
from pipeline.data import Dataset, discover
from pipeline.extract.config import ExtractConfig
from pipeline.extract.local import EngineReport, run_local, view_keys
from pipeline.extract.plan import Plan, plan_extraction


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


def run_engine(plan: Plan, log: Callable[[str], None]) -> EngineReport:
    """Run ``plan.todo`` on the configured engine."""
    if plan.config.engine == "ray":
        from pipeline.extract.ray_engine import run_ray

        return run_ray(plan, log=log)
    return run_local(plan, log=log)


def extract_dataset(root: str | os.PathLike | Dataset, config: ExtractConfig,
                    log: Callable[[str], None] = print) -> ExtractResult:
    """Extract features of every image under ``root`` into the cache (incremental, resumable).

    Parameters
    ----------
    root : path or Dataset
        Dataset folder (see :mod:`pipeline.data` for layouts), or an already discovered :class:`Dataset`.
    config : ExtractConfig
        From :func:`pipeline.extract.config.resolve_config`.
    log : callable
        Receives one-line messages.

    Returns
    -------
    ExtractResult

    Raises
    ------
    DatasetError, CacheError
        For unusable input or cache folders; with ``strict``, DatasetError at the first undecodable image
        (finished rows are kept).
    """
    ds = root if isinstance(root, Dataset) else discover(root)
    cfg = config
    w = cfg.model.weights
    if w.source == "none":
        log(f"WARNING: {cfg.model.backbone} runs with RANDOM weights (--weights none): features are not ImageNet "
            f"features")
    path = cache.cache_path(cfg.cache_dir, ds.name, cfg.label, cfg.resize, w.tag)
    with cache.locked(path):
        plan = plan_extraction(ds, cfg)
        cfg = plan.config  # its view spec is now fixed
        log(f"{plan.path.name}: {cfg.views.describe()}")
        if plan.stale_removed:
            log(f"discarded {plan.stale_removed} leftover file(s) of an interrupted write or another configuration")
        ex = plan.existing
        if plan.up_to_date:
            n_failed = len(ex.final_rows) - int(ex.meta.get("n_ok", 0)) if ex.meta else 0
            log(f"{plan.path.name}: up to date ({len(ds.items)} images, nothing to extract)")
            return ExtractResult(plan.path, len(ds.items), 0, plan.n_reused, 0, n_failed, up_to_date=True)

        log(f"{ds.name} x {cfg.label} ({cfg.resize}, weights {w.source}{' ' + w.sha256[:12] if w.sha256 else ''})"
            f": {len(ds.items)} images; reusing {plan.n_reused} finished rows"
            f"{f' ({plan.n_resumed} from an interrupted run)' if plan.n_resumed else ''}, extracting {len(plan.todo)}"
            f"{f', dropping {plan.n_dropped} removed' if plan.n_dropped else ''}")

        t0 = time.perf_counter()
        report = run_engine(plan, log) if plan.todo else None
        seconds = time.perf_counter() - t0
        meta = dict(plan.meta)
        prior = float(ex.meta.get("extract_seconds", 0.0)) if ex.meta else 0.0
        rescanned = cache.scan_existing(plan.path, meta)
        meta["extract_seconds"] = prior + rescanned.part_seconds
        shapes = cache.source_shapes(plan.path, rescanned, [*cfg.kinds, *view_keys(cfg)])
        rows = cache.assemble(plan.path, meta, [(it.relpath, it.label, it.split) for it in ds.items], rescanned,
                              shapes)
        all_failed = [(p, e) for p, o, e in zip(rows.path, rows.ok, rows.error) if not o]
        run_s = rescanned.part_seconds - ex.part_seconds  # decoding + model of this run's rows
        ips = f", {len(plan.todo) / run_s:.1f} images/s after start-up" if report and run_s > 0 else ""
        log(f"wrote {plan.path} ({len(rows)} rows, {len(all_failed)} failed) in {seconds:.1f}s{ips}")
        return ExtractResult(plan.path, len(ds.items), len(plan.todo), plan.n_reused, plan.n_dropped,
                             len(all_failed), all_failed, seconds)
