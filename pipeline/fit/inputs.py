"""The caches a fit compares: found, opened once each, checked to be one dataset, and aligned on common images."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.errors import CacheError, FitError

__all__ = ["Inputs", "open_inputs", "select_caches"]


def select_caches(cache_dir: str | Path, dataset: str | None, backbones: Sequence[str] | None) -> list[Path]:
    """Complete caches of ``cache_dir`` (of one dataset / backbones when given), or CacheError saying what to do."""
    from pipeline.cache import find_caches

    cache_dir = Path(cache_dir)
    if backbones:
        found: list[Path] = []
        for b in backbones:
            for p in find_caches(cache_dir, dataset=dataset, backbone=b):
                if p not in found:
                    found.append(p)
    else:
        found = find_caches(cache_dir, dataset=dataset)
    if not found:
        what = [f"dataset {dataset!r}" if dataset else "", f"backbone {', '.join(backbones)}" if backbones else ""]
        what_s = " for " + " and ".join(w for w in what if w) if any(what) else ""
        raise CacheError(f"no complete feature caches in {cache_dir}{what_s}; make one with "
                         f"`python cli.py extract DATA_DIR --cache-dir {cache_dir}`")
    return found


def _check_one_dataset(metas: list[dict[str, Any]], searched: bool) -> None:
    """Refuse caches of several datasets (a dataset is its name and its folder)."""
    datasets = sorted({(str(m.get("dataset_name")), str(m.get("dataset_root"))) for m in metas})
    if len(datasets) > 1:
        names = sorted({name for name, _ in datasets})
        if searched and len(names) > 1:
            raise FitError(f"the caches hold several datasets: {', '.join(names)}; pick one with --dataset NAME")
        listing = "; ".join(f"{name} ({root})" for name, root in datasets)
        raise FitError(f"caches of different datasets mixed: {listing}; fit one dataset at a time "
                       f"(pass caches of one dataset, or keep datasets in separate cache folders)")


def _align(path_lists: list[list[str]]) -> tuple[list[str], list[np.ndarray]]:
    """Paths common to all caches (in the first one's order) and each cache's row indices for them."""
    if len(path_lists) == 1:
        return list(path_lists[0]), [np.arange(len(path_lists[0]), dtype=np.int64)]
    common = set(path_lists[0])
    for paths in path_lists[1:]:
        common &= set(paths)
    order = [p for p in path_lists[0] if p in common]
    rows = []
    for paths in path_lists:
        index = {p: i for i, p in enumerate(paths)}
        rows.append(np.array([index[p] for p in order], dtype=np.int64))
    return order, rows


@dataclass
class Inputs:
    """The run's caches, open, and their common images.

    Attributes
    ----------
    paths : list of Path
        The cache files, in run order.
    readers : list of FeatureReader
        One open reader per cache (each file is opened once per fit).
    rel_paths : list of str
        Relative paths of the images common to every cache, in the first cache's order.
    rows : list of ndarray
        Per cache, the reader row of each common image.
    labels : ndarray of int
    cached_splits : ndarray of str
        Splits as cached (``""`` without split folders).
    class_names : list of str
    dropped : int
        Images left out because some cache lacks them.
    """

    paths: list[Path]
    readers: list[Any]
    rel_paths: list[str]
    rows: list[np.ndarray]
    labels: np.ndarray
    cached_splits: np.ndarray
    class_names: list[str]
    dropped: int

    @property
    def meta(self) -> dict[str, Any]:
        """The first cache's attributes (dataset name and root are those of every cache)."""
        return self.readers[0].meta

    @property
    def dataset_name(self) -> str:
        """The dataset's name (its folder name)."""
        m = self.meta
        return str(m.get("dataset_name") or Path(str(m.get("dataset_root", "dataset"))).name)

    def failed(self) -> list[tuple[str, str]]:
        """Images that could not be decoded at extraction (union over the caches, first reason kept)."""
        out: dict[str, str] = {}
        for r in self.readers:
            for p, reason in r.failed:
                out.setdefault(p, reason)
        return sorted(out.items())


def open_inputs(stack: contextlib.ExitStack, cache_dir: str | Path, caches: Sequence[str | Path] | None,
                dataset: str | None, backbones: Sequence[str] | None, features: str,
                say: Callable[[str], None]) -> Inputs:
    """Find the caches of a fit, open each once (closed when ``stack`` closes) and align them.

    Raises
    ------
    CacheError
        No cache found, or one that cannot be read or lacks ``features``.
    FitError
        Several datasets without ``dataset``, caches of different datasets or class sets, no common image.
    """
    from pipeline.cache import open_features

    paths = [Path(p) for p in caches] if caches else select_caches(cache_dir, dataset, backbones)
    readers = [stack.enter_context(open_features(p, kind=features)) for p in paths]
    _check_one_dataset([r.meta for r in readers], searched=not caches)
    class_names = list(readers[0].class_names)
    for r in readers[1:]:
        if list(r.class_names) != class_names:
            raise FitError(f"caches disagree on the classes ({', '.join(class_names)} vs "
                           f"{', '.join(r.class_names)}); extract them again from the same dataset folder")
    rel_paths, rows = _align([list(r.paths) for r in readers])
    if not rel_paths:
        raise FitError("the caches have no image in common; extract them again from the same dataset folder")
    dropped = max(len(r.paths) for r in readers) - len(rel_paths)
    if dropped:
        say(f"note: {dropped} images are not in every cache; comparing on the {len(rel_paths)} common ones")
    base = readers[0]
    labels = np.asarray(base.labels, dtype=np.int64)[rows[0]]
    cached_splits = np.asarray(base.splits).astype(str)[rows[0]]
    return Inputs(paths, readers, rel_paths, rows, labels, cached_splits, class_names, dropped)
