"""The HDF5 feature cache (schema v1): the only module that touches h5py.

The written schema is ``docs/cache-format.md``; every change here must keep it exact and bump
:data:`SCHEMA_VERSION` when old readers would misread a file.

Crash safety
------------
A cache file at its final name is always complete: it is written under a temporary name and moved into place with
an atomic rename, and carries ``complete = True``. While an extraction runs, finished rows go to small *part* files
in ``<cache>.parts/``, each also written to a temporary name and renamed, so a run killed at any moment (SIGKILL
included) leaves only whole parts. The next identical command reuses them and extracts only what is missing; when
all rows are done, the final file is assembled (old rows that are still valid + parts) and the parts are removed.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from pipeline.backbones import get_spec, sha256_file
from pipeline.errors import CacheError

SCHEMA_VERSION = 1
FORMAT_NAME = "headbench-features"
FEATURE_KINDS = ("avg", "max", "maps")
_STR = h5py.string_dtype("utf-8")
# Attributes that must agree between a cache and what the caller asks for (and between parts and their cache).
SIGNATURE_KEYS = (
    "backbone", "backbone_label", "alpha", "input_size", "resize", "preprocess", "preprocess_mode",
    "weights_source", "weights_sha256", "pixel_rule", "feature_kinds", "maps_dtype",
    "views",  # TEMPORARY (views branch, until cache schema v2 lands): the view spec is part of the signature
)
ROW_FIELDS = ("path", "label", "split", "size", "mtime_ns", "sha256", "ok", "error")


def cache_path(cache_dir: str | os.PathLike, dataset: str, label: str, resize: str, weights_tag: str) -> Path:
    """File of one (dataset, backbone + input size, resize rule, weights) combination."""
    return Path(cache_dir) / f"{dataset}__{label}__{resize}__{weights_tag}.h5"


def parts_dir(path: str | os.PathLike) -> Path:
    """Folder holding the finished-but-unassembled rows of an interrupted extraction."""
    return Path(str(path) + ".parts")


# ---- rows --------------------------------------------------------------------------------------------------------


@dataclass
class Rows:
    """Per-image metadata of a block of cache rows (parallel arrays)."""

    path: list[str] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    mtime_ns: list[int] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    ok: list[bool] = field(default_factory=list)
    error: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.path)

    def append(self, **row: Any) -> None:
        for name in ROW_FIELDS:
            getattr(self, name).append(row[name])


def _write_rows(g: h5py.Group, rows: Rows) -> None:
    n = len(rows)
    g.create_dataset("path", data=np.array(rows.path, dtype=object), dtype=_STR)
    g.create_dataset("label", data=np.asarray(rows.label, dtype=np.int32).reshape(n))
    g.create_dataset("split", data=np.array(rows.split, dtype=object), dtype=_STR)
    g.create_dataset("size", data=np.asarray(rows.size, dtype=np.int64).reshape(n))
    g.create_dataset("mtime_ns", data=np.asarray(rows.mtime_ns, dtype=np.int64).reshape(n))
    g.create_dataset("sha256", data=np.array(rows.sha256, dtype="S64").reshape(n))
    g.create_dataset("ok", data=np.asarray(rows.ok, dtype=bool).reshape(n))
    g.create_dataset("error", data=np.array(rows.error, dtype=object), dtype=_STR)


def _read_rows(g: h5py.Group) -> Rows:
    return Rows(
        path=[s.decode() if isinstance(s, bytes) else s for s in g["path"][()]],
        label=g["label"][()].tolist(),
        split=[s.decode() if isinstance(s, bytes) else s for s in g["split"][()]],
        size=g["size"][()].tolist(),
        mtime_ns=g["mtime_ns"][()].tolist(),
        sha256=[s.decode() for s in g["sha256"][()]],
        ok=g["ok"][()].astype(bool).tolist(),
        error=[s.decode() if isinstance(s, bytes) else s for s in g["error"][()]],
    )


def _attrs_to_dict(attrs: h5py.AttributeManager) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    for k in ("class_names", "feature_kinds", "map_shape", "versions", "alpha",
              "views"):  # TEMPORARY (views branch): "views" is a JSON object
        if k in out and isinstance(out[k], str):
            out[k] = json.loads(out[k])
    return out


def _set_attrs(obj: h5py.HLObject, meta: dict[str, Any]) -> None:
    for k, v in meta.items():
        if isinstance(v, (list, dict, tuple)) or v is None or k == "alpha":
            v = json.dumps(v)
        obj.attrs[k] = v


def _signature(meta: dict[str, Any]) -> dict[str, Any]:
    sig = {k: meta.get(k) for k in SIGNATURE_KEYS}
    sig["views"] = sig["views"] or {"n": 0}  # TEMPORARY (views branch): files without the attribute have no views
    return sig


def stored_views(path: Path) -> dict[str, Any] | None:
    """TEMPORARY (views branch, until cache schema v2 lands): the ``views`` attribute of what an earlier run left.

    The newest part's (an interrupted run, the latest thing asked for), else the complete file's; None when there
    is neither. Lets an extraction without ``--views`` keep the views an existing cache has, and resume.
    """
    pdir = parts_dir(path)
    candidates = sorted(pdir.glob("part-*.h5"), reverse=True) if pdir.is_dir() else []
    if path.exists():
        candidates.append(path)
    for p in candidates:
        try:
            with h5py.File(p, "r") as f:
                m = _attrs_to_dict(f.attrs)
        except OSError:
            continue
        if p == path and not m.get("complete"):
            continue
        return m.get("views") or {"n": 0}
    return None


def _atomic_h5(path: Path) -> tuple[Path, h5py.File]:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    return tmp, h5py.File(tmp, "w")


def _commit(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---- writing: parts and assembly -----------------------------------------------------------------------------------


class PartWriter:
    """Buffers finished rows and writes them as atomic part files.

    Parameters
    ----------
    path : Path
        The final cache file; parts go to :func:`parts_dir` of it.
    meta : dict
        Cache attributes; parts record their signature so a resumed run never mixes configurations.
    shapes : dict
        Feature kind -> per-row shape.
    flush_rows, flush_seconds : int, float
        :meth:`maybe_flush` writes a part when this many rows are buffered or this long has passed since the last
        part; a kill loses at most that much work. The caller calls it between batches, so parts hold whole
        batches and a resumed run feeds the model exactly the batches an uninterrupted run would.
    """

    def __init__(self, path: Path, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 flush_rows: int = 256, flush_seconds: float = 20.0) -> None:
        self.dir = parts_dir(path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.shapes = shapes
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.rows = Rows()
        self.feats: dict[str, list[np.ndarray]] = {k: [] for k in shapes}
        self.seconds = 0.0
        self._last = time.monotonic()
        existing = [int(p.stem.split("-")[1]) for p in self.dir.glob("part-*.h5")]
        self._seq = max(existing, default=-1) + 1

    def add(self, row: dict[str, Any], feats: dict[str, np.ndarray] | None) -> None:
        """Add one finished row; ``feats`` None for a failed image (stored as NaN)."""
        self.rows.append(**row)
        for k, shape in self.shapes.items():
            self.feats[k].append(feats[k] if feats is not None else np.full(shape, np.nan, np.float32))

    def maybe_flush(self) -> None:
        """Write a part if enough rows or time have accumulated."""
        if len(self.rows) >= self.flush_rows or time.monotonic() - self._last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as one part file (atomically)."""
        if not len(self.rows):
            return
        path = self.dir / f"part-{self._seq:06d}.h5"
        tmp, f = _atomic_h5(path)
        with f:
            _set_attrs(f, _signature(self.meta) | {"seconds": self.seconds})
            _write_rows(f.create_group("rows"), self.rows)
            g = f.create_group("features")
            for k in self.shapes:
                dtype = np.float16 if k == "maps" and self.meta.get("maps_dtype") == "float16" else np.float32
                g.create_dataset(k, data=np.stack(self.feats[k]).astype(dtype))
        _commit(tmp, path)
        self._seq += 1
        self.rows = Rows()
        self.feats = {k: [] for k in self.shapes}
        self.seconds = 0.0
        self._last = time.monotonic()


@dataclass
class Existing:
    """What is already done for a cache: rows of the complete file and of leftover parts, keyed by path."""

    meta: dict[str, Any] | None
    final_rows: dict[str, tuple[int, int, int]]  # path -> (row index, size, mtime_ns)
    part_rows: dict[str, tuple[Path, int, int, int]]  # path -> (part file, row, size, mtime_ns)
    stale_parts: list[Path]
    part_seconds: float


def scan_existing(path: Path, meta: dict[str, Any]) -> Existing:
    """Read what a previous run left for this cache, keeping only what matches ``meta``'s signature.

    A complete file of another configuration (e.g. it lacks ``maps`` that are now asked for) is treated as absent,
    so it is rebuilt; parts of another configuration and temporary files of a write that was killed are listed in
    ``stale_parts`` for removal.
    """
    sig = _signature(meta)
    final_meta, final_rows = None, {}
    if path.exists():
        try:
            with h5py.File(path, "r") as f:
                m = _attrs_to_dict(f.attrs)
                if m.get("complete") and m.get("schema_version") == SCHEMA_VERSION and _signature(m) == sig:
                    final_meta = m
                    r = _read_rows(f["rows"])
                    final_rows = {p: (i, s, t) for i, (p, s, t) in enumerate(zip(r.path, r.size, r.mtime_ns))}
        except OSError:
            final_meta, final_rows = None, {}  # unreadable: rebuilt from scratch, never trusted
    part_rows: dict[str, tuple[Path, int, int, int]] = {}
    # Temporary files of an assembly or part that was killed while being written: never valid, always removed.
    stale: list[Path] = list(path.parent.glob(f".{path.name}.*.tmp"))
    seconds = 0.0
    pdir = parts_dir(path)
    if pdir.is_dir():
        stale.extend(pdir.glob(".*.tmp"))
        for p in sorted(pdir.glob("part-*.h5")):
            try:
                with h5py.File(p, "r") as f:
                    m = _attrs_to_dict(f.attrs)
                    if _signature(m) != sig:
                        stale.append(p)
                        continue
                    r = _read_rows(f["rows"])
                    seconds += float(m.get("seconds", 0.0))
                    for i, (q, s, t) in enumerate(zip(r.path, r.size, r.mtime_ns)):
                        part_rows[q] = (p, i, s, t)
            except OSError:
                stale.append(p)
    return Existing(final_meta, final_rows, part_rows, stale, seconds)


def source_shapes(path: Path, existing: Existing, kinds: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per-row shape of each feature kind, read from the complete file or a part that holds rows."""
    if existing.part_rows:
        src = next(iter(existing.part_rows.values()))[0]
    elif existing.meta is not None:
        src = path
    else:
        raise CacheError(f"internal: no rows to take feature shapes from for {path}")
    with h5py.File(src, "r") as f:
        return {k: tuple(f["features"][k].shape[1:]) for k in kinds}


def assemble(path: Path, meta: dict[str, Any], order: Sequence[tuple[str, int, str]], existing: Existing,
             shapes: dict[str, tuple[int, ...]], block: int = 512) -> Rows:
    """Write the complete cache: rows in ``order`` (relative path, label, split), from parts or the old file.

    Returns the rows' metadata as written.

    Labels and splits come from ``order`` (the current folder), so a new class folder re-labels old rows
    without extracting them again.
    The new file is written under a temporary name and atomically renamed over the old one; then the parts folder
    is removed. Raises CacheError if a row in ``order`` is in neither source.
    """
    parts: dict[Path, tuple[Rows, h5py.File]] = {}
    old = h5py.File(path, "r") if existing.meta is not None and existing.final_rows else None
    old_rows = _read_rows(old["rows"]) if old is not None else None
    tmp, f = _atomic_h5(path)
    try:
        with f:
            rows = Rows()
            sources: list[tuple[Any, int]] = []
            for q, label, split in order:
                if q in existing.part_rows:
                    p, i, _, _ = existing.part_rows[q]
                    if p not in parts:
                        pf = h5py.File(p, "r")
                        parts[p] = (_read_rows(pf["rows"]), pf)
                    src_rows, handle = parts[p]
                elif q in existing.final_rows and old is not None and old_rows is not None:
                    i = existing.final_rows[q][0]
                    src_rows, handle = old_rows, old
                else:
                    raise CacheError(f"internal: row {q} has no source while assembling {path}")
                rows.append(**({k: getattr(src_rows, k)[i] for k in ROW_FIELDS} | {"label": label, "split": split}))
                sources.append((handle, i))
            n = len(rows)
            _write_rows(f.create_group("rows"), rows)
            g = f.create_group("features")
            for k, shape in shapes.items():
                dtype = np.float16 if k == "maps" and meta.get("maps_dtype") == "float16" else np.float32
                chunks = (1, *shape) if k == "maps" else (min(max(n, 1), 1024), *shape)
                ds = g.create_dataset(k, shape=(n, *shape), dtype=dtype, chunks=chunks if n else None)
                step = 64 if k == "maps" else block
                for start in range(0, n, step):
                    ds[start:start + step] = _gather(sources[start:start + step], k)
            counts = {"n_rows": n, "n_ok": int(sum(rows.ok)), "n_failed": int(n - sum(rows.ok))}
            _set_attrs(f, meta | counts | {"complete": True, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for _, handle in parts.values():
            handle.close()
        if old is not None:
            old.close()
    _commit(tmp, path)
    remove_parts(path)
    return rows


def _gather(sources: list[tuple[Any, int]], kind: str) -> np.ndarray:
    """Rows of one feature kind from (open h5 file, row) pairs, reading runs of rows from one file at once."""
    out = []
    i = 0
    while i < len(sources):
        handle, start = sources[i]
        j = i + 1
        while j < len(sources) and sources[j][0] is handle and sources[j][1] == sources[j - 1][1] + 1:
            j += 1
        out.append(handle["features"][kind][start:start + (j - i)])
        i = j
    return np.concatenate(out)


def remove_parts(path: Path) -> None:
    """Delete the parts folder of a cache (after assembly, or when they are stale)."""
    pdir = parts_dir(path)
    if pdir.is_dir():
        for p in pdir.iterdir():
            p.unlink(missing_ok=True)
        pdir.rmdir()


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on a cache while extracting, so two runs never write the same parts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"another extraction is writing {path}; wait for it or stop it") from None
        yield
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)


# ---- reading -------------------------------------------------------------------------------------------------------


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


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Attributes of a cache file, after checking it is a complete headbench cache of a known schema."""
    p = Path(path)
    if not p.exists():
        hint = " (an interrupted extraction left parts: rerun the same extract command to finish it)" \
            if parts_dir(p).is_dir() else ""
        raise CacheError(f"cache {p} does not exist{hint}")
    try:
        with h5py.File(p, "r") as f:
            meta = _attrs_to_dict(f.attrs)
    except OSError as exc:
        raise CacheError(f"cache {p} is not a readable HDF5 file ({exc}); delete it and extract again") from None
    if meta.get("format") != FORMAT_NAME:
        raise CacheError(f"{p} is not a headbench feature cache")
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CacheError(f"cache {p} has schema version {version}; this headbench reads up to "
                         f"{SCHEMA_VERSION}: upgrade headbench or extract again")
    if not meta.get("complete"):
        raise CacheError(f"cache {p} is incomplete; rerun the extract command that made it")
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


def read_features(path: str | os.PathLike, kind: str = "avg", expect: dict[str, Any] | None = None) -> FeatureSet:
    """Load one feature kind of a complete cache, checking its schema, its preprocessing and ``expect``.

    Parameters
    ----------
    path : path
        Cache file.
    kind : {"avg", "max", "maps"}
    expect : dict, optional
        Attribute values the caller relies on (e.g. ``{"backbone": "mobilenet_v2", "input_size": 224}``).

    Raises
    ------
    CacheError
        Missing, unreadable, incomplete or newer-schema file; a kind it does not hold; preprocessing that is not the
        registered one for its backbone; or any ``expect`` mismatch (the message says what differs and the fix).
    """
    meta = read_meta(path)
    spec = get_spec(str(meta.get("backbone")))
    check_expected(meta, {"preprocess": spec.preprocess, "preprocess_mode": spec.preprocess_mode}, path)
    if expect:
        check_expected(meta, expect, path)
    if kind not in meta.get("feature_kinds", []):
        raise CacheError(f"cache {path} holds {', '.join(meta.get('feature_kinds', []))} features, not {kind!r}; "
                         f"extract again with {'--maps' if kind == 'maps' else '--max-pool'}")
    with h5py.File(path, "r") as f:
        rows = _read_rows(f["rows"])
        ok = np.asarray(rows.ok, dtype=bool)
        idx = np.flatnonzero(ok)
        dset = f["features"][kind]
        feats = dset[()] if ok.all() else (dset[idx] if len(idx) else np.zeros((0, *dset.shape[1:]), dset.dtype))
    return FeatureSet(
        path=str(path),
        features=feats.astype(np.float32) if kind != "maps" else feats,
        labels=np.asarray(rows.label, dtype=np.int64)[idx],
        class_names=list(meta["class_names"]),
        paths=[rows.path[i] for i in idx],
        splits=np.asarray(rows.split, dtype=object)[idx].astype(str),
        failed=[(p, e) for p, o, e in zip(rows.path, rows.ok, rows.error) if not o],
        meta=meta,
        file_sha256=sha256_file(path),
    )


def read_rows(path: str | os.PathLike) -> Rows:
    """All rows' metadata (including failed images) of a complete cache."""
    read_meta(path)
    with h5py.File(path, "r") as f:
        return _read_rows(f["rows"])


def find_caches(cache_dir: str | os.PathLike, dataset: str | None = None,
                backbone: str | None = None) -> list[Path]:
    """Complete caches in ``cache_dir``, optionally only one dataset's and/or one backbone's (name or label)."""
    d = Path(cache_dir)
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.h5")):
        try:
            meta = read_meta(p)
        except CacheError:
            continue
        if dataset is not None and meta.get("dataset_name") != dataset:
            continue
        if backbone is not None and backbone not in (meta.get("backbone"), meta.get("backbone_label")):
            continue
        out.append(p)
    return out
