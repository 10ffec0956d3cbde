"""The HDF5 feature cache (schema v2): the only module that touches h5py.

The written schema is ``docs/cache-format.md``; every change here must keep it exact and bump
:data:`SCHEMA_VERSION` when old readers would misread a file. Files of schema 1 are still read.

Identity
--------
A cache belongs to one dataset folder: its file name carries a digest of the folder's resolved path besides the
folder's name, and the folder is recorded in the file, so two projects whose image folders share a name never
overwrite or reuse each other's cache.

Integrity
---------
Every fixed-size dataset (features, views, labels, sizes, flags) is chunked with HDF5's Fletcher-32 checksum,
which HDF5 verifies on every read of a chunk; the row metadata as a whole (paths, splits, errors included) has a
SHA-256 stored at assembly and checked on every read; file metadata is checksummed by the HDF5 1.10 file format.
A damaged file is reported in one line (what is damaged and what to do), never read as numbers. Features that are
not finite never enter a cache as usable rows. A ``content_sha256`` (rows and features as written) identifies the
content for provenance without hashing the file again.

Crash safety
------------
A cache file at its final name is always complete: it is written under a temporary name and moved into place with
an atomic rename, and carries ``complete = True``. While an extraction runs, finished rows go to small *part* files
in ``<cache>.parts/``, each also written to a temporary name and renamed, so a run killed at any moment (SIGKILL
included) leaves only whole parts. The next identical command reuses them and extracts only what is missing; when
all rows are done, the final file is assembled (old rows that are still valid + parts) and the parts are removed.
The assembled file lists the parts it consumed, so parts left behind by a kill between the rename and their removal
are recognised as already assembled. Write failures (disk full, read-only or unwritable folder) remove the
temporary file, keep every finished part and raise one clear line.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from pipeline.backbones import get_spec
from pipeline.errors import BackboneError, CacheError

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMAT_NAME = "headbench-features"
FEATURE_KINDS = ("avg", "max", "maps")
LIBVER = ("v110", "latest")
"""HDF5 file format bounds: 1.10's format checksums the file's own metadata (superblock, object headers)."""
_STR = h5py.string_dtype("utf-8")
SIGNATURE_KEYS = (
    "backbone", "backbone_label", "alpha", "input_size", "resize", "preprocess", "preprocess_mode",
    "weights_source", "weights_sha256", "pixel_rule", "feature_kinds", "maps_dtype", "views",
)
"""Attributes that must agree between a cache and what the caller asks for (and between parts and their cache)."""
ROW_FIELDS = ("path", "label", "split", "size", "mtime_ns", "sha256", "ok", "error")
_STRING_FIELDS = ("path", "split", "error")
_ROW_DTYPES = {"label": "<i4", "size": "<i8", "mtime_ns": "<i8", "sha256": "S64", "ok": "|b1", "run": "<i2"}
_JSON_ATTRS = ("class_names", "feature_kinds", "map_shape", "versions", "alpha", "views", "runs")
FREE_SPACE_MARGIN = 1.05
"""Assembly needs the new file's size free (the old file stays until the rename); 5% covers HDF5's overhead."""


def dataset_id(root: str | os.PathLike) -> str:
    """16 hex digits of the SHA-256 of a dataset folder's resolved path: the cache's identity."""
    return hashlib.sha256(str(Path(root).resolve()).encode("utf-8")).hexdigest()[:16]


def cache_path(cache_dir: str | os.PathLike, dataset: str, root: str | os.PathLike, label: str, resize: str,
               weights_tag: str) -> Path:
    """File of one (dataset folder, backbone + input size, resize rule, weights) combination.

    ``<dataset>-<8 hex of the folder's path digest>__<label>__<resize>__<weights tag>.h5``.
    """
    return Path(cache_dir) / f"{dataset}-{dataset_id(root)[:8]}__{label}__{resize}__{weights_tag}.h5"


def parts_dir(path: str | os.PathLike) -> Path:
    """Folder holding the finished-but-unassembled rows of an interrupted extraction: ``<file>.parts``.

    Its name keeps within the file system's limit (:func:`sibling_name`).
    """
    p = Path(path)
    return p.with_name(sibling_name(p, ".parts"))


# ---- names within the file system's limit -------------------------------------------------------------------------


NAME_MAX = 255
"""The longest file name, in bytes, on Linux file systems (ext4, xfs, btrfs, tmpfs...), and the most assumed."""
_TMP_TAG_MAX = 14
"""Longest tag of a temporary name (``<pid>.<6 hex>`` or ``probe-<8 hex>``): ``.<stem>.<tag>.tmp``."""
_DIGEST_TAIL = 13
"""``~`` and 12 hex digits of the SHA-256 of a name that had to be shortened."""


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name (bytes) allowed in ``folder`` (or its nearest existing parent), at most :data:`NAME_MAX`.

    Parameters
    ----------
    folder : path

    Returns
    -------
    int
        ``os.pathconf``'s ``PC_NAME_MAX`` there, or :data:`NAME_MAX` when the system does not say.
    """
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return min(NAME_MAX, int(os.pathconf(probe, "PC_NAME_MAX")))
    except (OSError, ValueError):
        return NAME_MAX


def _fit(name: str, room: int) -> str:
    """``name`` if its UTF-8 form takes at most ``room`` bytes, else a prefix of it + ``~`` + 12 hex of its digest."""
    raw = name.encode("utf-8")
    if len(raw) <= room:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return raw[:room - _DIGEST_TAIL].decode("utf-8", "ignore") + "~" + digest


def sibling_name(path: Path, suffix: str) -> str:
    """The name of a file beside a cache (``<file><suffix>``: ``.parts``, ``.lock``), within the name limit.

    A cache name that leaves no room for ``suffix`` is shortened to a prefix of itself and a digest of the whole
    name, so the sibling is always the same for the same cache and never that of another one.
    """
    return _fit(path.name, name_max(path.parent) - len(suffix.encode("utf-8"))) + suffix


def _tmp_stem(path: Path) -> str:
    """The part of ``path``'s temporary names before their tag: ``.<name>`` (shortened to fit, see :func:`_fit`)."""
    return "." + _fit(path.name, name_max(path.parent) - 1 - (_TMP_TAG_MAX + len("..tmp")))


def temp_path(path: Path, tag: str) -> Path:
    """A temporary name for ``path`` in its folder: ``.<name>.<tag>.tmp``, within the name limit.

    Every temporary name of a cache starts with the same stem, so a later run finds and removes the ones a killed
    write left (:func:`scan_existing`).

    Parameters
    ----------
    path : Path
        The file the temporary one will become (a cache, a part).
    tag : str
        At most :data:`_TMP_TAG_MAX` characters that make the name unique.
    """
    if len(tag) > _TMP_TAG_MAX:
        raise ValueError(f"internal: temporary tag {tag!r} is longer than {_TMP_TAG_MAX} characters")
    return path.with_name(f"{_tmp_stem(path)}.{tag}.tmp")


def check_name_fits(path: Path, dataset_root: str | os.PathLike) -> None:
    """Refuse a cache whose own file name is longer than its folder allows, saying what to do.

    Parameters
    ----------
    path : Path
        The cache file.
    dataset_root : path
        The dataset folder whose name is in the cache's name.

    Raises
    ------
    CacheError
        The name does not fit (every other name the cache uses is shortened to fit; this one is its identity).
    """
    limit = name_max(path.parent)
    size = len(path.name.encode("utf-8"))
    if size <= limit:
        return
    folder = Path(dataset_root)
    allowed = len(folder.name.encode("utf-8")) - (size - limit)
    shorter = f"rename the dataset folder {folder} to at most {allowed} bytes" if allowed > 0 else \
        "use a dataset folder with a shorter name"
    raise CacheError(f"the cache file name for {folder.name[:40]}... would be {size} bytes, more than the {limit} a "
                     f"file name may have in {path.parent}: {shorter} (or pass --cache-dir on a file system that "
                     f"allows longer names)")


# ---- faults ----------------------------------------------------------------------------------------------------


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _errno_of(exc: OSError) -> int | None:
    """The errno of an OSError, also when h5py only put it in the message (``errno = 28``)."""
    if exc.errno:
        return exc.errno
    text = str(exc)
    for code, words in ((errno.ENOSPC, "No space left"), (errno.EDQUOT, "quota exceeded"),
                        (errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")):
        if words in text:
            return code
    return None


def write_error(exc: OSError, where: Path, need_bytes: int | None = None, parts: Path | None = None) -> CacheError:
    """One clear line for a failed write into ``where`` (disk full, read-only, permission), or a generic one."""
    code = _errno_of(exc)
    keep = f"; finished rows are kept in {parts}, rerun the same command to resume" if parts else ""
    if code in _NO_SPACE:
        need = f" (needs about {_mb(need_bytes)} free)" if need_bytes else ""
        return CacheError(f"disk full writing in {where.parent}{need}: free space there or pass --cache-dir on "
                          f"another disk{keep}")
    if code in _NO_WRITE:
        reason = "read-only file system" if code == errno.EROFS else "permission denied"
        return CacheError(f"cannot write in cache folder {where.parent} ({reason}): pass --cache-dir with a "
                          f"writable folder{keep}")
    return CacheError(f"cannot write {where.name} in {where.parent} ({_short(exc)}){keep}")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 1e6:.0f} MB" if (n or 0) >= 1e6 else f"{(n or 0) / 1e3:.0f} kB"


def corrupt_error(path: str | os.PathLike, what: str, meta: dict[str, Any] | None = None) -> CacheError:
    """One line for a damaged cache: what is damaged and the command that rebuilds it (from ``meta``)."""
    cmd = rebuild_command(Path(path), meta) if meta and meta.get("dataset_root") else ""
    how = f"`{cmd}`" if cmd else "the extract command that made it"
    return CacheError(f"cache {path} is damaged ({what}); delete it and run {how} again")


def rebuild_command(path: Path, meta: dict[str, Any]) -> str:
    """The ``extract`` command that makes this very cache again, shell-quoted.

    Everything that names the file or its signature is spelled out: the dataset folder, the backbone, and, where
    they differ from ``extract``'s defaults, the input size, width multiplier, resize rule, weights, cache folder,
    extra feature kinds and views. (The pixel rule is not an option: a cache of another rule is rebuilt anyway.)

    Parameters
    ----------
    path : Path
        The cache file (its folder becomes ``--cache-dir`` unless it is the default ``cache``).
    meta : dict
        Its root attributes (``dataset_root``, ``backbone``, ``input_size``...).

    Returns
    -------
    str
        e.g. ``python cli.py extract /data/birds -b mobilenet_v2 --weights none --cache-dir /tmp/c``.
    """
    import shlex

    from pipeline.data import DEFAULT_RESIZE
    from pipeline.extract.views import ViewSpec

    args = ["extract", str(meta["dataset_root"])] + _model_options(meta)
    if meta.get("resize", DEFAULT_RESIZE) != DEFAULT_RESIZE:
        args += ["--resize", str(meta["resize"])]
    kinds = meta.get("feature_kinds") or ["avg"]
    args += (["--max-pool"] if "max" in kinds else []) + (["--maps"] if "maps" in kinds else [])
    if "maps" in kinds and meta.get("maps_dtype") == "float32":
        args += ["--maps-dtype", "float32"]
    views = ViewSpec.from_json(meta.get("views") if isinstance(meta.get("views"), dict) else None)
    if views.n:
        args += views.cli_options()
    if path.parent.resolve() != Path("cache").resolve():
        args += ["--cache-dir", str(path.parent)]
    return " ".join(["python", "cli.py", *(shlex.quote(a) for a in args)])


def _model_options(meta: dict[str, Any]) -> list[str]:
    """``-b``, and ``--input-size``, ``--alpha``, ``--weights`` where they differ from the defaults, of a cache."""
    name = str(meta.get("backbone"))
    args = ["-b", name]
    try:
        spec = get_spec(name)
    except BackboneError:  # a backbone no longer registered: say everything the file records
        spec = None
    size = meta.get("input_size")
    if size is not None and (spec is None or int(size) != spec.default_input_size):
        args += ["--input-size", str(int(size))]
    alpha = meta.get("alpha")
    if alpha is not None and float(alpha) != 1.0:
        args += ["--alpha", f"{float(alpha):g}"]
    source = meta.get("weights_source")
    if source == "none":
        args += ["--weights", "none"]
    elif source == "file":
        args += ["--weights", str(meta.get("weights_path", ""))]
    return args


# ---- rows --------------------------------------------------------------------------------------------------------


@dataclass
class Rows:
    """Per-image metadata of a block of cache rows (parallel lists).

    ``run`` indexes the cache's ``runs`` attribute (the extraction run that made the row; -1 when unknown).
    """

    path: list[str] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    mtime_ns: list[int] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    ok: list[bool] = field(default_factory=list)
    error: list[str] = field(default_factory=list)
    run: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.path)

    def append(self, **row: Any) -> None:
        """Add one row (the :data:`ROW_FIELDS` keys, and optionally ``run``)."""
        for name in ROW_FIELDS:
            getattr(self, name).append(row[name])
        self.run.append(int(row.get("run", -1)))

    def get(self, i: int) -> dict[str, Any]:
        """Row ``i`` as a dict."""
        return {k: getattr(self, k)[i] for k in (*ROW_FIELDS, "run")}

    def arrays(self) -> dict[str, np.ndarray]:
        """The rows as the typed arrays they are stored as."""
        n = len(self)
        out: dict[str, np.ndarray] = {}
        for name in (*ROW_FIELDS, "run"):
            values = getattr(self, name)
            if name in _STRING_FIELDS:
                out[name] = np.array(values, dtype=object).reshape(n)
            else:
                out[name] = np.asarray(values, dtype=_ROW_DTYPES[name]).reshape(n)
        return out

    def digest(self) -> str:
        """SHA-256 of the rows' content in the canonical form of docs/cache-format.md.

        Hashed a block of :data:`_DIGEST_BLOCK` rows at a time: the same bytes as whole arrays and one join of
        all strings, without those copies in memory at once.
        """
        h = hashlib.sha256()
        n = len(self)
        for name in (*ROW_FIELDS, "run"):
            h.update(name.encode() + b"\0")
            values = getattr(self, name)
            for start in range(0, n, _DIGEST_BLOCK):
                block = values[start:start + _DIGEST_BLOCK]
                if name in _STRING_FIELDS:  # the values joined by \x1f, the separator also between blocks
                    h.update((b"\x1f" if start else b"") + "\x1f".join(str(v) for v in block).encode("utf-8"))
                else:
                    h.update(np.ascontiguousarray(np.asarray(block, dtype=_ROW_DTYPES[name])))
        return h.hexdigest()


_DIGEST_BLOCK = 65536
"""Rows hashed at a time by :meth:`Rows.digest`: the same bytes as whole fields, without a copy of each field in
memory at once (at a million rows that copy was ~110 MB, mostly the 64-byte digests twice)."""


def _write_rows(g: h5py.Group, rows: Rows) -> None:
    n = len(rows)
    for name, arr in rows.arrays().items():
        if name in _STRING_FIELDS:
            g.create_dataset(name, data=arr, dtype=_STR)
        else:
            g.create_dataset(name, data=arr, chunks=(max(1, min(n, 65536)),) if n else None,
                             fletcher32=bool(n))


def _strings(dset: h5py.Dataset) -> list[str]:
    return dset.asstr()[()].tolist() if len(dset) else []


def _read_rows(g: h5py.Group) -> Rows:
    n = len(g["path"])
    return Rows(
        path=_strings(g["path"]),
        label=g["label"][()].tolist(),
        split=_strings(g["split"]),
        size=g["size"][()].tolist(),
        mtime_ns=g["mtime_ns"][()].tolist(),
        sha256=g["sha256"].asstr()[()].tolist() if n else [],
        ok=g["ok"][()].astype(bool).tolist(),
        error=_strings(g["error"]),
        run=g["run"][()].tolist() if "run" in g else [-1] * n,
    )


def _attrs_to_dict(attrs: h5py.AttributeManager) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    for k in _JSON_ATTRS:
        if k in out and isinstance(out[k], str):
            out[k] = json.loads(out[k])
    return out


def _set_attrs(obj: h5py.HLObject, meta: dict[str, Any]) -> None:
    for k, v in meta.items():
        if isinstance(v, (list, dict, tuple)) or v is None or k in ("alpha", "views", "runs"):
            v = json.dumps(v)
        obj.attrs[k] = v


def _signature(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in SIGNATURE_KEYS}


def _dataset_name(key: str) -> str:
    """Where a feature key lives: ``avg`` -> ``features/avg``; ``views/avg`` stays."""
    return key if "/" in key else f"features/{key}"


def _store_dtype(key: str, meta: dict[str, Any]) -> type:
    return np.float16 if key == "maps" and meta.get("maps_dtype") == "float16" else np.float32


def _open_write(path: Path) -> tuple[Path, h5py.File]:
    tmp = temp_path(path, f"{os.getpid()}.{uuid.uuid4().hex[:6]}")
    return tmp, h5py.File(tmp, "w", libver=LIBVER)


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


def _discard_failed_write(f: h5py.File | None, tmp: Path | None, exc: BaseException) -> OSError | None:
    """Close and delete the temporary file of a failed write; the OSError behind ``exc`` if it was one.

    HDF5 reports a failed write (disk full...) as an OSError, or, when the failure surfaces while closing, as a
    RuntimeError whose message carries the errno: both are returned as an OSError with that errno.
    """
    if f is not None:
        try:
            f.close()
        except Exception:  # noqa: BLE001 - closing a file whose writes failed fails too; it is removed below
            pass
    if tmp is not None:
        tmp.unlink(missing_ok=True)  # never leave a half-written file filling the disk
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, RuntimeError) and "file write failed" in str(exc):
        code = next((c for c, w in ((errno.ENOSPC, "errno = 28"), (errno.EDQUOT, "errno = 122"),
                                    (errno.EROFS, "errno = 30")) if w in str(exc)), errno.EIO)
        return OSError(code, str(exc).splitlines()[0])
    return None


def _row_bytes(shapes: dict[str, tuple[int, ...]], meta: dict[str, Any]) -> int:
    return sum(int(np.prod(s)) * np.dtype(_store_dtype(k, meta)).itemsize for k, s in shapes.items()) + 200


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
        Feature key -> per-row shape: ``avg``, ``max``, ``maps`` (the centre view) and ``views/avg``,
        ``views/max`` (``(K, D)``: the augmented views of the row).
    flush_rows, flush_seconds : int, float
        :meth:`maybe_flush` writes a part when this many rows are buffered (or the next batch would pass it) or
        this long has passed since the last part; a kill loses at most that much work. The caller calls it between batches, so parts hold whole
        batches and a resumed run feeds the model exactly the batches an uninterrupted run would.
    run_info : dict, optional
        Provenance of the run that makes these rows (engine, runtime and its version, device, ``run_id``...),
        stored with every part and gathered into the cache's ``runs`` attribute at assembly.

    Parts are named ``part-<sequence>-<writer id>.h5``, so several writers (the actors of a cluster engine) can
    write into one parts folder at once.
    """

    def __init__(self, path: Path, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 flush_rows: int = 256, flush_seconds: float = 20.0, run_info: dict[str, Any] | None = None) -> None:
        self.dir = parts_dir(path)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, self.dir / "part") from None
        self.meta = meta
        self.shapes = dict(shapes)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.run_info = dict(run_info or {})
        self.writer_id = uuid.uuid4().hex[:8]
        self.rows = Rows()
        self.feats: dict[str, list[np.ndarray]] = {k: [] for k in self.shapes}
        self.seconds = 0.0
        self.parts_written = 0
        self.failed = False
        self._last = time.monotonic()
        self._seq = 0

    def add(self, row: dict[str, Any], feats: dict[str, np.ndarray] | None) -> None:
        """Add one finished row; ``feats`` None for a failed image (stored as NaN)."""
        self.rows.append(**row)
        for k, shape in self.shapes.items():
            self.feats[k].append(feats[k] if feats is not None else np.full(shape, np.nan, np.float32))

    def maybe_flush(self, coming: int = 0) -> None:
        """Write a part if enough rows or time have accumulated.

        Parameters
        ----------
        coming : int
            Rows the caller will add before it calls again (its next batch): the part is written now when they
            would take the buffer past ``flush_rows``, so that no more than ``flush_rows`` rows are ever uncommitted
            at a batch's end.
        """
        n = len(self.rows)
        if n >= self.flush_rows or (n and n + coming > self.flush_rows) \
                or time.monotonic() - self._last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as one part file (atomically); on a write failure raise one clear line."""
        if not len(self.rows) or self.failed:
            return
        path = self.dir / f"part-{self._seq:06d}-{self.writer_id}.h5"
        need = int(len(self.rows) * _row_bytes(self.shapes, self.meta) * FREE_SPACE_MARGIN) + (64 << 10)
        tmp, f = None, None
        try:
            free = shutil.disk_usage(self.dir).free
            if free < need:  # checked first: HDF5 failing half-way through a write is noisier than this line
                raise OSError(errno.ENOSPC, "No space left on device")
            tmp, f = _open_write(path)
            _set_attrs(f, _signature(self.meta) | {
                "seconds": self.seconds, "part_id": uuid.uuid4().hex, "run_info": json.dumps(self.run_info)})
            _write_rows(f.create_group("rows"), self.rows)
            for k in self.shapes:
                f.create_dataset(_dataset_name(k), data=np.stack(self.feats[k]).astype(_store_dtype(k, self.meta)))
            f.close()
            _commit(tmp, path)
        except BaseException as exc:
            failure = _discard_failed_write(f, tmp, exc)
            if failure is None:
                raise
            self.failed = True  # the buffered rows are not committed; a rerun extracts them again
            raise write_error(failure, path, need_bytes=need, parts=self.dir) from None
        self._seq += 1
        self.parts_written += 1
        self.rows = Rows()
        self.feats = {k: [] for k in self.shapes}
        self.seconds = 0.0
        self._last = time.monotonic()


@dataclass(frozen=True)
class RowRecord:
    """What a finished row of an earlier run says about its file (for reuse and retry decisions)."""

    index: int
    size: int
    mtime_ns: int
    ok: bool
    sha256: str
    error: str


@dataclass
class Existing:
    """What is already done for a cache: rows of the complete file and of leftover parts, keyed by path.

    Attributes
    ----------
    meta : dict or None
        Attributes of a complete file of the same signature (None when there is none, or it was discarded).
    final_rows : dict
        Relative path -> :class:`RowRecord` of that file.
    part_rows : dict
        Relative path -> (part file, row index, :class:`RowRecord`) of parts of the same signature.
    stale_parts : list of Path
        Files to remove: temporary files of killed writes, parts of another configuration or already assembled.
    part_seconds : float
        Wall time recorded by the usable parts.
    discarded : str
        Why a complete file at the cache's name was not usable ("" when it was, or there was none).
    other_views : list of (Path, dict, int)
        Parts that differ from the signature in their views alone (part, its ``views`` attribute, its rows): an
        interrupted run with another ``--views``, which the caller keeps or removes.
    """

    meta: dict[str, Any] | None
    final_rows: dict[str, RowRecord]
    part_rows: dict[str, tuple[Path, int, RowRecord]]
    stale_parts: list[Path]
    part_seconds: float
    discarded: str = ""
    other_views: list[tuple[Path, dict[str, Any], int]] = field(default_factory=list)


def _records(r: Rows) -> dict[str, RowRecord]:
    return {p: RowRecord(i, s, t, o, h, e)
            for i, (p, s, t, o, h, e) in enumerate(zip(r.path, r.size, r.mtime_ns, r.ok, r.sha256, r.error))}


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


def _runs_of(existing: Existing) -> tuple[list[dict[str, Any]], dict[tuple[Path | None, int], int]]:
    """Runs of the old file and of the parts, and a map (source, local run index) -> index in the new ``runs``."""
    runs: list[dict[str, Any]] = []
    index: dict[tuple[Path | None, int], int] = {}
    by_id: dict[str, int] = {}
    for i, run in enumerate(existing.meta.get("runs", []) if existing.meta else []):
        by_id[run.get("run_id", f"old-{i}")] = len(runs)
        index[(None, i)] = len(runs)
        runs.append(dict(run))
    for p in sorted({src for src, _, _ in existing.part_rows.values()}):
        with h5py.File(p, "r") as f:
            info = json.loads(f.attrs.get("run_info", "{}") or "{}")
        rid = info.get("run_id", p.name)
        if rid not in by_id:
            by_id[rid] = len(runs)
            runs.append(dict(info))
        index[(p, 0)] = by_id[rid]
    return runs, index


def assemble(path: Path, meta: dict[str, Any], order: Sequence[tuple[str, int, str]], existing: Existing,
             shapes: dict[str, tuple[int, ...]], block: int = 512) -> Rows:
    """Write the complete cache: rows in ``order`` (relative path, label, split), from parts or the old file.

    Labels and splits come from ``order`` (the current folder), so a new class folder re-labels old rows
    without extracting them again. Before writing, the free space of the cache folder is checked against the new
    file's size. The new file is written under a temporary name and atomically renamed over the old one; then the
    parts folder is removed. Reading the old file or a part verifies its checksums.

    Returns
    -------
    Rows
        The rows' metadata as written.

    Raises
    ------
    CacheError
        Not enough free space, a write failure (disk full, read-only; the temporary file is removed and the parts
        are kept), a damaged old file (:class:`DamagedCache`, which the caller handles by re-extracting), or a row
        in ``order`` that is in neither source.
    """
    n = len(order)
    need = int(n * _row_bytes(shapes, meta) * FREE_SPACE_MARGIN) + (1 << 20)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise CacheError(f"not enough free space in {path.parent} to assemble {path.name}: needs about {_mb(need)}, "
                         f"{_mb(free)} free; free space (or pass --cache-dir on another disk) and rerun: finished "
                         f"rows are kept in {parts_dir(path)}")
    runs, run_index = _runs_of(existing)
    parts: dict[Path, tuple[Rows, h5py.File]] = {}
    old = h5py.File(path, "r") if existing.meta is not None and existing.final_rows else None
    old_rows = _read_rows(old["rows"]) if old is not None else None
    tmp, f = None, None
    try:
        tmp, f = _open_write(path)
        rows = Rows()
        sources: list[tuple[Any, int]] = []
        for q, label, split in order:
            if q in existing.part_rows:
                p, i, _ = existing.part_rows[q]
                if p not in parts:
                    pf = h5py.File(p, "r")
                    parts[p] = (_read_rows(pf["rows"]), pf)
                src_rows, handle = parts[p]
                run = run_index[(p, 0)]
            elif q in existing.final_rows and old is not None and old_rows is not None:
                i = existing.final_rows[q].index
                src_rows, handle = old_rows, old
                run = run_index.get((None, old_rows.run[i]), -1)
            else:
                raise CacheError(f"internal: row {q} has no source while assembling {path}")
            rows.append(**(src_rows.get(i) | {"label": label, "split": split, "run": run}))
            sources.append((handle, i))
        used = sorted({r for r in rows.run if r >= 0})
        renumber = {old_i: new_i for new_i, old_i in enumerate(used)}
        rows.run = [renumber.get(r, -1) for r in rows.run]
        kept_runs = [runs[i] | {"rows": int(sum(1 for r in rows.run if r == renumber[i]))} for i in used]
        _write_rows(f.create_group("rows"), rows)
        content = hashlib.sha256(rows.digest().encode())
        for k, shape in shapes.items():
            dtype = _store_dtype(k, meta)
            chunk_rows = 1 if k == "maps" else max(1, min(n, max(1, (1 << 20) // max(1, _nbytes(shape, dtype)))))
            dset = f.create_dataset(_dataset_name(k), shape=(n, *shape), dtype=dtype,
                                    chunks=(chunk_rows, *shape) if n else None, fletcher32=bool(n))
            step = 64 if k == "maps" else block
            for start in range(0, n, step):
                data = _gather(sources[start:start + step], k).astype(dtype, copy=False)
                dset[start:start + step] = data
                content.update(np.ascontiguousarray(data).tobytes())
        consumed = [str(pf.attrs.get("part_id", "")) for _, pf in parts.values()]
        f.create_dataset("provenance/consumed_parts", data=np.array(consumed, dtype="S32"))
        counts = {"n_rows": n, "n_ok": int(sum(rows.ok)), "n_failed": int(n - sum(rows.ok))}
        _set_attrs(f, meta | counts | {"complete": True, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                       "runs": kept_runs, "rows_sha256": rows.digest(),
                                       "content_sha256": content.hexdigest(), "integrity": "fletcher32"})
        f.close()
        _commit(tmp, path)
    except BaseException as exc:
        failure = _discard_failed_write(f, tmp, exc)
        if failure is None:
            raise
        raise write_error(failure, path, need_bytes=need, parts=parts_dir(path)) from None
    finally:
        for _, handle in parts.values():
            handle.close()
        if old is not None:
            old.close()
    remove_parts(path, keep=[p for p, _, _ in existing.other_views])
    return rows


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


class DamagedCache(CacheError):
    """A complete cache or a part failed its checksums while its rows were being copied (``path``: which file)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = Path(path)


def _gather(sources: list[tuple[Any, int]], key: str) -> np.ndarray:
    """Rows of one feature key from (open h5 file, row) pairs, reading runs of rows from one file at once."""
    out = []
    i = 0
    name = _dataset_name(key)
    while i < len(sources):
        handle, start = sources[i]
        j = i + 1
        while j < len(sources) and sources[j][0] is handle and sources[j][1] == sources[j - 1][1] + 1:
            j += 1
        try:
            out.append(handle[name][start:start + (j - i)])
        except OSError as exc:
            raise DamagedCache(f"checksum mismatch in {name} ({_short(exc)})", Path(handle.filename)) from None
        i = j
    return np.concatenate(out)


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


def remove_parts(path: Path, keep: Sequence[Path] = ()) -> None:
    """Delete the parts folder of a cache (after assembly, or when they are stale), except the parts in ``keep``.

    Parameters
    ----------
    path : Path
        The cache file.
    keep : sequence of Path
        Parts to leave in place (those of an interrupted run with other views); the folder stays while any is left.
    """
    pdir = parts_dir(path)
    if pdir.is_dir():
        kept = {Path(k).name for k in keep}
        for p in pdir.iterdir():
            if p.name not in kept:
                p.unlink(missing_ok=True)
        if not any(pdir.iterdir()):
            pdir.rmdir()


def discard(path: Path) -> None:
    """Remove a complete cache file that is damaged (its parts folder is kept)."""
    path.unlink(missing_ok=True)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on a cache while extracting, so two runs never write the same parts.

    Raises
    ------
    CacheError
        Another process holds the lock, or the cache folder cannot be created or written.
    """
    lock = path.with_name(sibling_name(path, ".lock"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_error(exc, lock) from None
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


def find_caches(cache_dir: str | os.PathLike, dataset: str | None = None,
                backbone: str | None = None) -> list[Path]:
    """Complete caches in ``cache_dir``, optionally only one dataset's and/or one backbone's (name or label)."""
    out = []
    for info in scan_folder(cache_dir).caches:
        meta = info.meta
        if dataset is not None and meta.get("dataset_name") != dataset:
            continue
        if backbone is not None and backbone not in (meta.get("backbone"), meta.get("backbone_label")):
            continue
        out.append(info.path)
    return out

