"""Reading a cache: opening it with every check, its features on demand, folder scans and what a run left.

Every fixed-size dataset is chunked with HDF5's Fletcher-32 checksum, which HDF5 verifies on every read of a chunk;
the row metadata has a SHA-256 checked on every read. A damaged file is reported in one line (what is damaged and
what to do), never read as numbers.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from pipeline.backbones import get_spec
from pipeline.cache.faults import _short, corrupt_error
from pipeline.cache.format import FORMAT_NAME, SCHEMA_VERSION, _signature
from pipeline.cache.names import _tmp_stem, parts_dir
from pipeline.cache.rows import Existing, RowRecord, Rows, _attrs_to_dict, _read_rows, _records
from pipeline.errors import CacheError

@dataclass
class FeatureSet:
    """Features of the images that extracted successfully, with their labels and provenance.

    Attributes
    ----------
    path : str
        Cache file.
    features : np.ndarray
        ``(n, d)`` float32 for ``avg``/``max``; ``(n, h, w, c)`` for ``maps``.
    labels : np.ndarray
        ``(n,)`` int64 class indices.
    class_names : list of str
    paths : list of str
        Image paths relative to ``meta["dataset_root"]``.
    splits : np.ndarray
        ``(n,)`` str: ``train``, ``val``, ``test`` or ``""``.
    failed : list of (str, str)
        Images that could not be decoded, with the reason.
    meta : dict
        The cache's attributes (see docs/cache-format.md).
    file_sha256 : str
        The cache's ``content_sha256`` (schema 2; ``""`` for schema-1 files, which did not record one).
    views : np.ndarray or None
        ``(n, K, d)`` augmented views of the same kind, when the cache has views and they were asked for.
    """

    path: str
    features: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    paths: list[str]
    splits: np.ndarray
    failed: list[tuple[str, str]]
    meta: dict[str, Any]
    file_sha256: str
    views: np.ndarray | None = None


def _check_header(p: Path, meta: dict[str, Any]) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise CacheError(f"{p} is not a headbench feature cache")
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CacheError(f"cache {p} has schema version {version}; this headbench reads up to "
                         f"{SCHEMA_VERSION}: upgrade headbench or extract again")
    if not meta.get("complete"):
        raise CacheError(f"cache {p} is incomplete; rerun the extract command that made it")


def _open(p: Path) -> h5py.File:
    if not p.exists():
        hint = " (an interrupted extraction left parts: rerun the same extract command to finish it)" \
            if parts_dir(p).is_dir() else ""
        raise CacheError(f"cache {p} does not exist{hint}")
    try:
        return h5py.File(p, "r")
    except OSError as exc:
        raise CacheError(f"cache {p} is not a readable HDF5 file ({_short(exc)}); delete it and extract again") \
            from None


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Attributes of a cache file, after checking it is a complete headbench cache of a known schema."""
    p = Path(path)
    f = _open(p)
    try:
        try:
            meta = _attrs_to_dict(f.attrs)
        except OSError as exc:
            raise corrupt_error(p, f"unreadable attributes: {_short(exc)}") from None
    finally:
        f.close()
    _check_header(p, meta)
    return meta


def check_expected(meta: dict[str, Any], expect: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise CacheError naming every attribute of ``meta`` that differs from ``expect``, and the fix."""
    diffs = [f"{k}={meta.get(k)!r} (expected {v!r})" for k, v in expect.items() if meta.get(k) != v]
    if diffs:
        root = meta.get("dataset_root", "DATA")
        raise CacheError(
            f"cache {path} does not match: {'; '.join(diffs)}; make a matching cache with "
            f"`python cli.py extract {root} ...` using those options"
        )


class FeatureReader:
    """One open cache, checked, with its rows in memory and its features read on demand (in bounded blocks).

    Made by :func:`open_features`; use as a context manager. Opening checks the format, schema, completeness,
    that the preprocessing is the registered one for the backbone, the caller's ``expect``, and (schema 2) the rows'
    checksum. Every read of features goes through HDF5's Fletcher-32 checks (schema 2) and a finiteness check of
    the rows returned; a failure is one clear :class:`~pipeline.errors.CacheError`.

    Attributes
    ----------
    path : Path
    meta : dict
    kind : str
    class_names : list of str
    paths : list of str
        Relative paths of the usable (ok) rows, in cache order.
    digests : list of str
        SHA-256 of each usable row's image file content (aligned with ``paths``): the same picture under two
        names has the same digest.
    labels : np.ndarray
        ``(n,)`` int64 class indices of the ok rows.
    splits : np.ndarray
        ``(n,)`` str splits of the ok rows.
    failed : list of (str, str)
    shape : tuple of int
        Shape of one row's features.
    n : int
        Number of ok rows.
    n_views : int
        Augmented views per row stored for ``kind`` (0 when none).
    """

    def __init__(self, path: Path, kind: str, expect: dict[str, Any] | None) -> None:
        self.path = path
        self.kind = kind
        self._file = _open(path)
        try:
            self._setup(expect)
        except BaseException:
            self._file.close()
            raise

    def _setup(self, expect: dict[str, Any] | None) -> None:
        f, p = self._file, self.path
        try:
            meta = _attrs_to_dict(f.attrs)
        except OSError as exc:
            raise corrupt_error(p, f"unreadable attributes: {_short(exc)}") from None
        _check_header(p, meta)
        self.meta = meta
        spec = get_spec(str(meta.get("backbone")))
        check_expected(meta, {"preprocess": spec.preprocess, "preprocess_mode": spec.preprocess_mode}, p)
        if expect:
            check_expected(meta, expect, p)
        kinds = meta.get("feature_kinds", [])
        if self.kind not in kinds:
            raise CacheError(f"cache {p} holds {', '.join(kinds)} features, not {self.kind!r}; extract again with "
                             f"{'--maps' if self.kind == 'maps' else '--max-pool'}")
        try:
            rows = _read_rows(f["rows"])
        except (OSError, KeyError) as exc:
            raise corrupt_error(p, f"row metadata unreadable: {_short(exc)}", meta) from None
        if meta.get("schema_version", 1) >= 2 and rows.digest() != meta.get("rows_sha256"):
            raise corrupt_error(p, "row metadata (paths, labels, splits) does not match its checksum", meta)
        ok = np.asarray(rows.ok, dtype=bool)
        self._ok_index = np.flatnonzero(ok)
        self.class_names = list(meta["class_names"])
        self.paths = [rows.path[i] for i in self._ok_index]
        self.digests = [str(rows.sha256[i]) for i in self._ok_index]
        self.labels = np.asarray(rows.label, dtype=np.int64)[self._ok_index]
        self.splits = np.asarray(rows.split, dtype=object)[self._ok_index].astype(str)
        self.failed = [(q, e) for q, o, e in zip(rows.path, rows.ok, rows.error) if not o]
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise corrupt_error(p, "a label outside the class list", meta)
        try:
            self._dset = f[f"features/{self.kind}"]
        except (KeyError, OSError):
            raise corrupt_error(p, f"its features/{self.kind} dataset is missing or unreadable", meta) from None
        self.shape = tuple(int(s) for s in self._dset.shape[1:])
        self.dtype = self._dset.dtype
        vname = f"views/{self.kind}"
        self._views = f[vname] if vname in f else None
        self.n_views = int(self._views.shape[1]) if self._views is not None else 0

    @property
    def n(self) -> int:
        """Number of usable rows."""
        return len(self._ok_index)

    @property
    def nbytes(self) -> int:
        """Bytes of all usable rows' features as float32 (what fitting on them in memory costs)."""
        return self.n * int(np.prod(self.shape)) * 4

    @property
    def content_sha256(self) -> str:
        """The digest of rows and features written at assembly (``""`` for schema-1 files)."""
        return str(self.meta.get("content_sha256", ""))

    def _take(self, dset: h5py.Dataset, idx: np.ndarray | None, name: str) -> np.ndarray:
        rows = self._ok_index if idx is None else self._ok_index[np.asarray(idx, dtype=np.int64)]
        if len(rows) == 0:
            return np.zeros((0, *dset.shape[1:]), dtype=np.float32 if self.kind != "maps" else dset.dtype)
        ascending = bool(np.all(np.diff(rows) > 0))
        order = None if ascending else np.argsort(rows, kind="stable")
        sorted_rows = rows if order is None else rows[order]
        try:
            if len(sorted_rows) == dset.shape[0]:
                data = dset[()]
            else:  # runs of consecutive rows are read as slices (h5py's point selection is slow)
                breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
                data = np.concatenate([dset[int(run[0]):int(run[-1]) + 1]
                                       for run in np.split(sorted_rows, breaks)])
        except OSError as exc:
            raise corrupt_error(self.path, f"checksum mismatch in {name}: {_short(exc)}", self.meta) from None
        if order is not None:
            out = np.empty_like(data)
            out[order] = data
        else:
            out = data
        if self.kind != "maps":
            out = out.astype(np.float32, copy=False)
        # A sum in float64 is finite exactly when every value is (finite float32 values cannot overflow it), and it
        # needs no temporary array of the data's size.
        sums = out.reshape(len(out), -1).sum(axis=1, dtype=np.float64)
        if not np.isfinite(sums).all():
            raise corrupt_error(self.path, f"{int((~np.isfinite(sums)).sum())} usable row(s) of {name} hold NaN or "
                                f"inf", self.meta)
        return out

    def read(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Features of usable rows ``idx`` (indices into :attr:`paths`; all when None), in that order."""
        return self._take(self._dset, idx, f"features/{self.kind}")

    def read_views(self, idx: np.ndarray | None = None) -> np.ndarray:
        """``(len(idx), K, ...)`` augmented views of usable rows ``idx``.

        Raises
        ------
        CacheError
            The cache has no views of this kind.
        """
        if self._views is None:
            raise CacheError(f"cache {self.path} has no augmented views of {self.kind!r}; extract again with "
                             f"--views K")
        return self._take(self._views, idx, f"views/{self.kind}")

    def iter_batches(self, idx: np.ndarray | None = None, batch_size: int = 4096) -> Iterator[np.ndarray]:
        """Features of rows ``idx`` (all when None) in blocks of ``batch_size`` rows, in ``idx`` order."""
        idx = np.arange(self.n) if idx is None else np.asarray(idx, dtype=np.int64)
        for start in range(0, len(idx), batch_size):
            yield self.read(idx[start:start + batch_size])

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()

    def __enter__(self) -> "FeatureReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_features(path: str | os.PathLike, kind: str = "avg", expect: dict[str, Any] | None = None) -> FeatureReader:
    """Open one feature kind of a complete cache for reading (see :class:`FeatureReader` for the checks).

    Raises
    ------
    CacheError
        Missing, unreadable, damaged, incomplete or newer-schema file; a kind it does not hold; preprocessing that
        is not the registered one for its backbone; or any ``expect`` mismatch (the message says what differs and
        the fix).
    """
    return FeatureReader(Path(path), kind, expect)


def read_features(path: str | os.PathLike, kind: str = "avg", expect: dict[str, Any] | None = None,
                  views: bool = False) -> FeatureSet:
    """Load one feature kind of a complete cache into memory, with all the checks of :func:`open_features`.

    Parameters
    ----------
    path : path
        Cache file.
    kind : {"avg", "max", "maps"}
    expect : dict, optional
        Attribute values the caller relies on (e.g. ``{"backbone": "mobilenet_v2", "input_size": 224}``).
    views : bool
        Also load the augmented views of ``kind`` when the cache has them.
    """
    with open_features(path, kind, expect) as fr:
        return FeatureSet(path=str(path), features=fr.read(), labels=fr.labels, class_names=fr.class_names,
                          paths=fr.paths, splits=fr.splits, failed=fr.failed, meta=fr.meta,
                          file_sha256=fr.content_sha256,
                          views=fr.read_views() if views and fr.n_views else None)


def read_rows(path: str | os.PathLike) -> Rows:
    """All rows' metadata (including failed images) of a complete cache, checksum verified (schema 2)."""
    p = Path(path)
    meta = read_meta(p)
    with _open(p) as f:
        rows = _read_rows(f["rows"])
    if meta.get("schema_version", 1) >= 2 and rows.digest() != meta.get("rows_sha256"):
        raise corrupt_error(p, "row metadata does not match its checksum", meta)
    return rows


@dataclass(frozen=True)
class CacheInfo:
    """A complete cache found in a folder, with its attributes (read once)."""

    path: Path
    meta: dict[str, Any]


@dataclass
class CacheScan:
    """What :func:`scan_folder` found: usable caches, and files it could not use with the reason."""

    caches: list[CacheInfo] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)
    unfinished: list[Path] = field(default_factory=list)


def scan_folder(cache_dir: str | os.PathLike) -> CacheScan:
    """Every cache file of a folder: complete ones with their attributes, damaged or foreign ones with the reason,
    and caches still being made (a parts folder without its file)."""
    d = Path(cache_dir)
    out = CacheScan()
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.h5")):
        try:
            out.caches.append(CacheInfo(p, read_meta(p)))
        except CacheError as exc:
            out.problems.append((p, str(exc)))
    owned = {parts_dir(p).name for p in d.glob("*.h5")}  # a parts folder beside its complete file is not unfinished
    out.unfinished = [q.with_name(q.name[: -len(".parts")]) for q in sorted(d.glob("*.parts"))
                      if q.is_dir() and q.name not in owned]
    return out


def scan_existing(path: Path, meta: dict[str, Any]) -> Existing:
    """Read what a previous run left for this cache, keeping only what matches ``meta``'s signature.

    A complete file of another configuration (e.g. it lacks ``maps`` that are now asked for) or of an older schema
    is treated as absent, so it is rebuilt; a damaged one too, with the reason in ``discarded``. Parts of another
    configuration, parts the complete file already consumed, and temporary files of a killed write are listed in
    ``stale_parts`` for removal; parts whose signature differs in ``views`` alone are listed in ``other_views``.
    """
    sig = _signature(meta)
    final_meta, final_rows, discarded, consumed = None, {}, "", set()
    if path.exists():
        try:
            with h5py.File(path, "r") as f:
                m = _attrs_to_dict(f.attrs)
                newer = m.get("schema_version")
                if isinstance(newer, int) and newer > SCHEMA_VERSION:  # a newer headbench's file: never overwrite
                    raise CacheError(f"cache {path} has schema_version {newer}, newer than this headbench writes "
                                     f"({SCHEMA_VERSION}); upgrade headbench, or extract into another --cache-dir")
                if m.get("complete") and m.get("schema_version") == SCHEMA_VERSION and _signature(m) == sig:
                    r = _read_rows(f["rows"])
                    lost = [k for k in m.get("feature_kinds", []) if f"features/{k}" not in f]
                    if lost:
                        discarded = f"its features/{lost[0]} dataset is missing"
                    elif r.digest() != m.get("rows_sha256"):
                        discarded = "its row metadata does not match its checksum"
                    else:
                        final_meta, final_rows = m, _records(r)
                        if "provenance/consumed_parts" in f:
                            consumed = {s.decode() for s in f["provenance/consumed_parts"][()]}
                elif m.get("complete") and m.get("schema_version") == SCHEMA_VERSION:
                    discarded = "made with other settings"
        except OSError as exc:
            discarded = f"unreadable: {_short(exc)}"
    part_rows: dict[str, tuple[Path, int, RowRecord]] = {}
    # Temporary files of an assembly or part that was killed while being written: never valid, always removed.
    stale: list[Path] = list(path.parent.glob(f"{glob.escape(_tmp_stem(path))}.*.tmp"))
    seconds = 0.0
    other_views: list[tuple[Path, dict[str, Any], int]] = []
    pdir = parts_dir(path)
    if pdir.is_dir():
        stale.extend(pdir.glob(".*.tmp"))
        for p in sorted(pdir.glob("part-*.h5")):
            try:
                with h5py.File(p, "r") as f:
                    m = _attrs_to_dict(f.attrs)
                    part_sig = _signature(m)
                    if part_sig != sig and m.get("part_id") not in consumed \
                            and part_sig | {"views": sig["views"]} == sig:
                        other_views.append((p, part_sig["views"] or {"n": 0}, len(f["rows/path"])))
                        continue
                    if part_sig != sig or m.get("part_id") in consumed:
                        stale.append(p)
                        continue
                    r = _read_rows(f["rows"])
                    seconds += float(m.get("seconds", 0.0))
                    for q, rec in _records(r).items():
                        part_rows[q] = (p, rec.index, rec)
            except (OSError, KeyError, ValueError):
                stale.append(p)
    return Existing(final_meta, final_rows, part_rows, stale, seconds, discarded, other_views)


def verify(path: str | os.PathLike, block_rows: int = 4096) -> None:
    """Read every dataset of a complete cache chunk by chunk, so HDF5 checks every Fletcher-32 checksum.

    Raises
    ------
    CacheError
        The file is damaged (the message names what and how to rebuild it).
    """
    fr = open_features(path)
    try:
        f = fr._file
        for name in _feature_datasets(f):
            dset = f[name]
            for start in range(0, dset.shape[0], block_rows):
                try:
                    dset[start:start + block_rows]
                except OSError as exc:
                    raise corrupt_error(path, f"checksum mismatch in {name}: {_short(exc)}", fr.meta) from None
    finally:
        fr.close()


def _feature_datasets(f: h5py.File) -> list[str]:
    names = [f"features/{k}" for k in f["features"]] if "features" in f else []
    if "views" in f:
        names += [f"views/{k}" for k in f["views"]]
    return names


def source_shapes(path: Path, existing: Existing) -> dict[str, tuple[int, ...]]:
    """Per-row shape of each feature key (``avg``, ``views/avg``...), from a part that holds rows or the file."""
    if existing.part_rows:
        src = next(iter(existing.part_rows.values()))[0]
    elif existing.meta is not None:
        src = path
    else:
        raise CacheError(f"internal: no rows to take feature shapes from for {path}")
    with h5py.File(src, "r") as f:
        out = {k: tuple(f["features"][k].shape[1:]) for k in f["features"]}
        if "views" in f:
            out.update({f"views/{k}": tuple(f["views"][k].shape[1:]) for k in f["views"]})
    return out


def parts_views(path: Path) -> dict[str, Any] | None:
    """The ``views`` attribute of the newest readable part of an unfinished extraction (None when there is none).

    The newest: when parts of two ``--views`` settings are left (see :class:`Existing`), the last interrupted run's.
    """
    pdir = parts_dir(path)
    found = sorted(pdir.glob("part-*.h5"), key=lambda q: q.stat().st_mtime_ns, reverse=True) if pdir.is_dir() else []
    for p in found:
        try:
            with h5py.File(p, "r") as f:
                return _attrs_to_dict(f.attrs).get("views") or {"n": 0}
        except OSError:
            continue
    return None
