"""The planner: what an extraction must do, given the dataset folder and what earlier runs left in the cache.

Rows whose file has the same relative path, size and modification time are reused from the complete cache or
from the parts of an interrupted run; new or changed files are extracted; removed files are dropped; rows that
failed before are retried (a file that was unreadable for a passing reason: still being copied, no permission)
unless ``retry_failed`` is off. Planning reads only row metadata, never features, and runs on the driver whatever
the engine.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import cache, package_versions
from pipeline.data import Dataset, ImageItem
from pipeline.extract.config import ExtractConfig


@dataclass
class Plan:
    """What one extraction will do.

    Attributes
    ----------
    dataset : Dataset
    config : ExtractConfig
    path : Path
        The cache file.
    meta : dict
        Root attributes the assembled cache will carry.
    existing : cache.Existing
        What earlier runs left (complete file and parts).
    todo : list of ImageItem
        Images to extract, in dataset order.
    n_reused, n_resumed, n_dropped : int
        Rows reused (of which ``n_resumed`` from an interrupted run's parts), removed files dropped.
    retried : dict
        Relative path -> the earlier failure record of each failed row retried now.
    stale_removed : int
        Leftover files of an interrupted write, another configuration or an earlier assembly that were removed.
    other_views : list of (dict, int, int)
        Parts of an interrupted run with another view spec, grouped by it: (``views`` attribute, parts, rows).
    other_views_kept : bool
        Whether those parts were kept for a later run with their ``--views`` (else they were removed).
    run_info : dict
        Provenance of this run (id, start time, command, versions), completed by the engine with its runtime.
    """

    dataset: Dataset
    config: ExtractConfig
    path: Path
    meta: dict[str, Any]
    existing: cache.Existing
    todo: list[ImageItem] = field(default_factory=list)
    n_reused: int = 0
    n_resumed: int = 0
    n_dropped: int = 0
    retried: dict[str, cache.RowRecord] = field(default_factory=dict)
    stale_removed: int = 0
    run_info: dict[str, Any] = field(default_factory=dict)
    other_views: list[tuple[dict[str, Any], int, int]] = field(default_factory=list)
    other_views_kept: bool = False

    @property
    def up_to_date(self) -> bool:
        """Nothing to extract, drop, relabel or assemble."""
        ex = self.existing
        same_classes = ex.meta is not None and ex.meta.get("class_names") == list(self.dataset.classes)
        return same_classes and not self.todo and not self.n_dropped and not ex.part_rows

    @property
    def only_retries(self) -> bool:
        """The only work is retrying rows that failed before (nothing added, changed, dropped or relabelled)."""
        ex = self.existing
        same_classes = ex.meta is not None and ex.meta.get("class_names") == list(self.dataset.classes)
        return (same_classes and bool(self.todo) and len(self.todo) == len(self.retried) and not self.n_dropped
                and self.n_resumed == 0)


def cache_meta(ds: Dataset, config: ExtractConfig) -> dict[str, Any]:
    """Root attributes of the cache of ``ds`` under ``config`` (counts, runs and digests are added at assembly)."""
    w = config.model.weights
    return {
        "format": cache.FORMAT_NAME, "schema_version": cache.SCHEMA_VERSION,
        "dataset_name": ds.name, "dataset_root": str(ds.root), "dataset_id": cache.dataset_id(ds.root),
        "has_splits": bool(ds.has_splits), "class_names": list(ds.classes),
        **config.signature(),
        "weights_path": w.path,
        "versions": package_versions(("tensorflow", "keras", "numpy", "pillow", "h5py")), "command": config.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def cache_file(ds: Dataset, config: ExtractConfig) -> Path:
    """The cache file of ``ds`` under ``config``."""
    return cache.cache_path(config.cache_dir, ds.name, ds.root, config.label, config.resize,
                            config.model.weights.tag)


def group_views(parts: list[tuple[Path, dict[str, Any], int]]) -> list[tuple[dict[str, Any], int, int]]:
    """Parts of other view specs grouped by spec: (``views`` attribute, number of parts, rows), in first-seen order."""
    groups: dict[str, list[Any]] = {}
    for _, views, rows in parts:
        g = groups.setdefault(json.dumps(views, sort_keys=True), [views, 0, 0])
        g[1] += 1
        g[2] += rows
    return [tuple(g) for g in groups.values()]  # type: ignore[misc]


def plan_extraction(ds: Dataset, config: ExtractConfig, keep_other_views: bool = False) -> Plan:
    """Plan the extraction of ``ds`` (call with the cache's lock held: stale files are removed here).

    Parameters
    ----------
    ds : Dataset
    config : ExtractConfig
        With its view spec fixed.
    keep_other_views : bool
        Keep parts of an interrupted run with another view spec (the run did not ask for views, it keeps the
        cache's: those parts can still serve a later run with their ``--views``); else they are removed, as the
        run asked for other views.

    Returns
    -------
    Plan
    """
    path = cache_file(ds, config)
    meta = cache_meta(ds, config)
    existing = cache.scan_existing(path, meta)
    for stale in existing.stale_parts:
        stale.unlink(missing_ok=True)
    if not keep_other_views:
        for part, _, _ in existing.other_views:
            part.unlink(missing_ok=True)
    run_info = {"run_id": uuid.uuid4().hex[:12], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": config.command, "versions": meta["versions"]}
    plan = Plan(ds, config, path, meta, existing, stale_removed=len(existing.stale_parts), run_info=run_info,
                other_views=group_views(existing.other_views), other_views_kept=keep_other_views)
    if not keep_other_views:
        existing.other_views = []
    for it in ds.items:
        part = existing.part_rows.get(it.relpath)
        rec = part[2] if part is not None else existing.final_rows.get(it.relpath)
        same_file = rec is not None and (rec.size, rec.mtime_ns) == (it.size, it.mtime_ns)
        if same_file and (rec.ok or not config.retry_failed or part is not None):
            plan.n_reused += 1
            continue
        if same_file:
            plan.retried[it.relpath] = rec
        existing.part_rows.pop(it.relpath, None)
        existing.final_rows.pop(it.relpath, None)
        plan.todo.append(it)
    plan.n_resumed = len(existing.part_rows)
    current = {it.relpath for it in ds.items}
    plan.n_dropped = sum(1 for q in existing.final_rows if q not in current)
    return plan
