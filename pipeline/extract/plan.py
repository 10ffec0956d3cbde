"""The planner: what an extraction must do, given the dataset folder and what earlier runs left in the cache.

Rows whose file has the same relative path, size and modification time are reused from the complete cache or
from the parts of an interrupted run; new or changed files are extracted; removed files are dropped; rows that
failed before are retried unless ``retry_failed`` is off. Planning reads only row metadata, never features, and
runs on the driver whatever the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import cache, package_versions
from pipeline.data import Dataset, ImageItem
from pipeline.extract.config import ExtractConfig
from pipeline.extract.views import NO_VIEWS, ViewSpec


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
    n_reused, n_resumed, n_dropped, n_retry : int
        Rows reused (of which ``n_resumed`` from an interrupted run's parts), removed files dropped, failed rows
        retried.
    stale_removed : int
        Leftover files of an interrupted write or another configuration that were removed.
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
    n_retry: int = 0
    stale_removed: int = 0

    @property
    def up_to_date(self) -> bool:
        """Nothing to extract, drop, relabel or assemble."""
        ex = self.existing
        same_classes = ex.meta is not None and ex.meta.get("class_names") == list(self.dataset.classes)
        return same_classes and not self.todo and not self.n_dropped and not ex.part_rows


def cache_meta(ds: Dataset, config: ExtractConfig) -> dict[str, Any]:
    """Root attributes of the cache of ``ds`` under ``config`` (counts and times are added at assembly)."""
    w = config.model.weights
    return {
        "format": cache.FORMAT_NAME, "schema_version": cache.SCHEMA_VERSION,
        "dataset_name": ds.name, "dataset_root": str(ds.root), "has_splits": bool(ds.has_splits),
        "class_names": list(ds.classes),
        **config.signature(),
        "weights_path": w.path,
        "versions": package_versions(("tensorflow", "keras", "numpy", "pillow", "h5py")), "command": config.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def fix_views(path: Path, config: ExtractConfig) -> ExtractConfig:
    """``config`` with its view spec fixed: as given, else the one the cache at ``path`` (or its parts) has.

    ``views=None`` means "keep what an existing cache has": the spec of an interrupted run's parts (so rerunning
    without ``--views`` resumes it), else the complete file's, else no views for a new cache.
    """
    if config.views is not None:
        return config
    found = cache.stored_views(path)
    return config.with_views(ViewSpec.from_json(found) if found else NO_VIEWS)


def plan_extraction(ds: Dataset, config: ExtractConfig) -> Plan:
    """Plan the extraction of ``ds`` (call with the cache's lock held: stale files are removed here).

    The plan's ``config`` has its view spec fixed (:func:`fix_views`); a spec that differs from the cache's makes
    every row stale, so every row is extracted again.

    Returns
    -------
    Plan
    """
    path = cache.cache_path(config.cache_dir, ds.name, config.label, config.resize, config.model.weights.tag)
    config = fix_views(path, config)
    meta = cache_meta(ds, config)
    existing = cache.scan_existing(path, meta)
    for stale in existing.stale_parts:
        stale.unlink(missing_ok=True)
    plan = Plan(ds, config, path, meta, existing, stale_removed=len(existing.stale_parts))
    for it in ds.items:
        hit = existing.part_rows.get(it.relpath) or existing.final_rows.get(it.relpath)
        if hit is not None and tuple(hit[-2:]) == (it.size, it.mtime_ns):
            plan.n_reused += 1
        else:
            existing.part_rows.pop(it.relpath, None)
            existing.final_rows.pop(it.relpath, None)
            plan.todo.append(it)
    plan.n_resumed = len(existing.part_rows)
    current = {it.relpath for it in ds.items}
    plan.n_dropped = sum(1 for q in existing.final_rows if q not in current)
    return plan

