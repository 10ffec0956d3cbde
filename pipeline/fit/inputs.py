"""The caches a fit compares: found, opened once each, checked to be one dataset, and aligned on common images."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from pipeline.errors import CacheError, FitError
from pipeline.results import cache_label

if TYPE_CHECKING:
    from pipeline.cache import CacheScan, FeatureReader

__all__ = ["CacheSource", "Inputs", "open_inputs", "select_caches"]


class CacheSource:
    """Where a fit finds and opens its caches: the cache files on disk, through :mod:`pipeline.cache`.

    A fit reads caches through these two methods only: :meth:`scan` when it looks for them in a folder, and
    :meth:`open` once per cache it uses. A stand-in (caches held in memory, or the real ones with each open
    counted) overrides them and is handed to :func:`open_inputs` or :func:`pipeline.fit.run_fit` as ``source``.
    """

    def scan(self, cache_dir: Path) -> "CacheScan":
        """Every cache file of ``cache_dir``: complete ones with their attributes, the others with the reason
        (:func:`pipeline.cache.scan_folder`)."""
        from pipeline.cache import scan_folder

        return scan_folder(cache_dir)

    def open(self, path: Path, kind: str) -> "FeatureReader":
        """One feature kind of a complete cache, open and checked (:func:`pipeline.cache.open_features`)."""
        from pipeline.cache import open_features

        return open_features(path, kind=kind)


def _has_separator(dataset: str) -> bool:
    """``--dataset`` can only be a path (a name never holds a separator)."""
    return "/" in dataset or "\\" in dataset or dataset in (".", "..")


def _same_root(meta: dict[str, Any], dataset: str) -> bool:
    try:
        return Path(str(meta.get("dataset_root", ""))).resolve() == Path(dataset).expanduser().resolve()
    except OSError:
        return False


def _why_none(cache_dir: Path, scan: Any, dataset: str | None, backbones: Sequence[str] | None) -> str:
    """The most useful reason why no cache was found, as one line."""
    hint = f"make one with `python cli.py extract DATA_DIR --cache-dir {cache_dir}`"
    if scan.caches:  # there are caches, just none of that dataset / backbone
        what = [f"dataset {dataset!r}" if dataset else "", f"backbone {', '.join(backbones)}" if backbones else ""]
        there = sorted({f"{m.get('dataset_name')} ({cache_label(m)})"
                        for m in (c.meta for c in scan.caches)})
        return (f"no feature cache in {cache_dir} for {' and '.join(w for w in what if w)}; it holds "
                f"{'; '.join(there)}")
    reasons = []
    if scan.unfinished:
        names = ", ".join(p.name for p in scan.unfinished[:2]) + (" ..." if len(scan.unfinished) > 2 else "")
        reasons.append(f"{len(scan.unfinished)} unfinished (rerun the same extract command to finish it: {names})")
    if scan.problems:
        path, why = scan.problems[0]
        more = f" (and {len(scan.problems) - 1} more)" if len(scan.problems) > 1 else ""
        reasons.append(f"{path.name} cannot be used{more}: {why}")
    if reasons:
        return f"no complete feature caches in {cache_dir}: " + "; ".join(reasons)
    return f"no complete feature caches in {cache_dir}; {hint}"


def _extracted_at(path: Path, meta: dict[str, Any]) -> float:
    """When a cache was last assembled: its ``updated`` (or ``created``) attribute, else the file's mtime."""
    from datetime import datetime

    for key in ("updated", "created"):
        for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S"):
            try:
                return datetime.strptime(str(meta.get(key)), fmt).timestamp()
            except ValueError:
                continue
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def select_caches(cache_dir: str | Path, dataset: str | None, backbones: Sequence[str] | None,
                  say: Callable[[str], None] = lambda _m: None, source: CacheSource = CacheSource()) -> list[Path]:
    """Complete caches of ``cache_dir`` (of one dataset / backbones when given), or one line saying what to do.

    ``dataset`` is a dataset name (its folder's name) or the dataset folder itself (a path), which tells apart two
    datasets of the same name. Without ``dataset``, a folder of several datasets gives the one extracted last, and
    ``say`` is told which and how to pick another. A name that two dataset folders share is refused: which one is
    meant cannot be guessed. The folder is scanned once, by ``source`` (default: the cache files on disk).
    """
    cache_dir = Path(cache_dir)
    scan = source.scan(cache_dir)
    metas = {c.path: c.meta for c in scan.caches}
    found = list(metas)
    if dataset is not None:
        # a path names one dataset folder; a bare word is a folder here (`data`) or a dataset name
        path_only = _has_separator(dataset)
        by_root = [p for p in found if _same_root(metas[p], dataset)] if path_only or Path(dataset).is_dir() else []
        if by_root or path_only:
            found = by_root
        else:
            found = [p for p in found if metas[p].get("dataset_name") == dataset]
    if backbones:
        found = [p for p in found if any(b in (metas[p].get("backbone"), metas[p].get("backbone_label"))
                                         for b in backbones)]
    if not found:
        raise CacheError(_why_none(cache_dir, scan, dataset, backbones))

    def ident(p: Path) -> tuple[str, str]:
        return str(metas[p].get("dataset_name")), str(metas[p].get("dataset_root"))

    datasets = sorted({ident(p) for p in found})
    if len(datasets) > 1 and dataset is None:
        last = max(found, key=lambda p: _extracted_at(p, metas[p]))
        name, root = ident(last)
        others = sorted({f"{n} ({r})" if n == name else n for n, r in datasets if (n, r) != (name, root)})
        shared = any(n == name for n, r in datasets if r != root)
        found = [p for p in found if ident(p) == (name, root)]
        say(f"the cache folder holds several datasets: fitting {name} ({root}), the one extracted last; "
            f"also there: {', '.join(others)} (pick one with --dataset {'PATH' if shared else 'NAME'})")
    elif len(datasets) > 1:
        raise FitError(f"{len(datasets)} datasets are named {datasets[0][0]}: "
                       f"{', '.join(root for _, root in datasets)}; pick one with --dataset PATH (its folder)")
    return found


def _check_one_dataset(metas: list[dict[str, Any]]) -> None:
    """Refuse caches of several datasets (a dataset is its name and its folder)."""
    datasets = sorted({(str(m.get("dataset_name")), str(m.get("dataset_root"))) for m in metas})
    if len(datasets) > 1:
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
                say: Callable[[str], None], source: CacheSource = CacheSource()) -> Inputs:
    """Find the caches of a fit, open each once (closed when ``stack`` closes) and align them.

    Parameters
    ----------
    stack : contextlib.ExitStack
        Closes every opened cache when it closes.
    cache_dir : path or None
        The folder to look for caches in, when ``caches`` is not given.
    caches : sequence of path, optional
        The cache files themselves (then no folder is scanned).
    dataset : str, optional
        A dataset name or folder, to pick among the caches of ``cache_dir`` (see :func:`select_caches`).
    backbones : sequence of str, optional
        Backbone names or labels, to pick among the caches of ``cache_dir``.
    features : str
        The feature kind to open (``avg``, ``max`` or ``maps``).
    say : callable
        Receives the dataset line and notes (several datasets, images not in every cache).
    source : CacheSource, optional
        Scans ``cache_dir`` and opens each cache; default the cache files on disk.

    Raises
    ------
    CacheError
        No cache found, or one that cannot be read or lacks ``features``.
    FitError
        Several datasets without ``dataset``, caches of different datasets or class sets, no common image.
    """
    paths = [Path(p) for p in caches] if caches else select_caches(cache_dir, dataset, backbones, say, source)
    readers = [stack.enter_context(source.open(p, features)) for p in paths]
    _check_one_dataset([r.meta for r in readers])
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
    say(f"dataset {base.meta.get('dataset_name')} from {base.meta.get('dataset_root')}: "
        + ", ".join(f"{cache_label(r.meta)} ({p.name})"
                    for r, p in zip(readers, paths)))
    labels = np.asarray(base.labels, dtype=np.int64)[rows[0]]
    cached_splits = np.asarray(base.splits).astype(str)[rows[0]]
    return Inputs(paths, readers, rel_paths, rows, labels, cached_splits, class_names, dropped)
