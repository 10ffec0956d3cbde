"""Writing a cache: atomic part files while an extraction runs, then the assembly of the complete file.

A cache file at its final name is always complete: it is written under a temporary name and moved into place with
an atomic rename, and carries ``complete = True``. While an extraction runs, finished rows go to small *part* files
in ``<cache>.parts/``, each also written to a temporary name and renamed, so a run killed at any moment (SIGKILL
included) leaves only whole parts. When all rows are done, the final file is assembled (old rows that are still
valid + parts) and the parts are removed. The assembled file lists the parts it consumed, so parts left behind by a
kill between the rename and their removal are recognised as already assembled. Write failures (disk full,
read-only or unwritable folder) remove the temporary file, keep every finished part and raise one clear line.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from pipeline.cache.faults import DamagedCache, _short, write_error
from pipeline.cache.format import LIBVER, _dataset_name, _signature, _store_dtype
from pipeline.cache.names import parts_dir, sibling_name, temp_path
from pipeline.cache.rows import Existing, Rows, _read_rows, _set_attrs, _write_rows
from pipeline.atomic import Commit, commit_file
from pipeline.errors import CacheError
from pipeline.sizes import fmt_bytes

FREE_SPACE_MARGIN = 1.05
"""Assembly needs the new file's size free (the old file stays until the rename); 5% covers HDF5's overhead."""


def _open_write(path: Path) -> tuple[Path, h5py.File]:
    tmp = temp_path(path, f"{os.getpid()}.{uuid.uuid4().hex[:6]}")
    return tmp, h5py.File(tmp, "w", libver=LIBVER)


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


@contextmanager
def atomic_write(path: Path, need_bytes: int, parts: Path, room: Path | None = None,
                 commit: Commit = commit_file) -> Iterator[h5py.File]:
    """Write one HDF5 file (a part, a complete cache) so that ``path`` only ever holds a whole one.

    The ``with`` body writes into a temporary file beside ``path`` (:func:`~pipeline.cache.names.temp_path`); on
    leaving it the file is closed, flushed to disk and renamed to ``path`` in one atomic rename.

    Parameters
    ----------
    path : Path
        The file to write.
    need_bytes : int
        Its estimated size, for the disk-full line.
    parts : Path
        The parts folder whose finished rows a failed write keeps (named in the line).
    room : Path, optional
        A folder whose free space is checked against ``need_bytes`` before the temporary file is made, so that a
        full disk is one line rather than HDF5 failing half-way through a write.
    commit : callable
        Makes the closed temporary the file (:func:`pipeline.atomic.commit_file`: flushed, renamed, folder
        flushed).

    Yields
    ------
    h5py.File
        The temporary file, open for writing.

    Raises
    ------
    CacheError
        The write failed (disk full, read-only file system, permission...): the temporary file is removed and
        ``path`` is as it was. Any other exception is raised as it is, after the same clean-up.
    """
    tmp, f = None, None
    try:
        if room is not None and shutil.disk_usage(room).free < need_bytes:
            raise OSError(errno.ENOSPC, "No space left on device")
        tmp, f = _open_write(path)
        yield f
        f.close()
        commit(tmp, path)
    except BaseException as exc:
        failure = _discard_failed_write(f, tmp, exc)
        if failure is None:
            raise
        raise write_error(failure, path, need_bytes=need_bytes, parts=parts) from None


def _row_bytes(shapes: dict[str, tuple[int, ...]], meta: dict[str, Any]) -> int:
    return sum(int(np.prod(s)) * np.dtype(_store_dtype(k, meta)).itemsize for k, s in shapes.items()) + 200


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
        this long has passed since the last part; a kill loses at most that much work. The caller calls it
        between batches, so parts hold whole batches and a resumed run feeds the model exactly the batches an
        uninterrupted run would.
    run_info : dict, optional
        Provenance of the run that makes these rows (engine, runtime and its version, device, ``run_id``...),
        stored with every part and gathered into the cache's ``runs`` attribute at assembly.
    commit : callable
        Makes each written part its file (:func:`pipeline.atomic.commit_file`); a test hands in one that records
        or fails.

    Parts are named ``part-<sequence>-<writer id>.h5``, so several writers (the actors of a cluster engine) can
    write into one parts folder at once.
    """

    def __init__(self, path: Path, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 flush_rows: int = 256, flush_seconds: float = 20.0, run_info: dict[str, Any] | None = None,
                 commit: Commit = commit_file) -> None:
        self.dir = parts_dir(path)
        self.commit = commit
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
        """Write buffered rows as one part file (:func:`atomic_write`); on a write failure raise one clear line.

        The free space of the parts folder is checked first: HDF5 failing half-way through a write is noisier than
        the line.
        """
        if not len(self.rows) or self.failed:
            return
        path = self.dir / f"part-{self._seq:06d}-{self.writer_id}.h5"
        need = int(len(self.rows) * _row_bytes(self.shapes, self.meta) * FREE_SPACE_MARGIN) + (64 << 10)
        try:
            with atomic_write(path, need, parts=self.dir, room=self.dir, commit=self.commit) as f:
                _set_attrs(f, _signature(self.meta) | {
                    "seconds": self.seconds, "part_id": uuid.uuid4().hex, "run_info": json.dumps(self.run_info)})
                _write_rows(f.create_group("rows"), self.rows)
                for k in self.shapes:
                    f.create_dataset(_dataset_name(k),
                                     data=np.stack(self.feats[k]).astype(_store_dtype(k, self.meta)))
        except CacheError:
            self.failed = True  # the buffered rows are not committed; a rerun extracts them again
            raise
        self._seq += 1
        self.parts_written += 1
        self.rows = Rows()
        self.feats = {k: [] for k in self.shapes}
        self.seconds = 0.0
        self._last = time.monotonic()


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
             shapes: dict[str, tuple[int, ...]], block: int = 512, commit: Commit = commit_file) -> Rows:
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
        raise CacheError(f"not enough free space in {path.parent} to assemble {path.name}: needs about "
                         f"{fmt_bytes(need)}, {fmt_bytes(free)} free; free space (or pass --cache-dir on another disk) "
                         f"and rerun: finished rows are kept in {parts_dir(path)}")
    runs, run_index = _runs_of(existing)
    parts: dict[Path, tuple[Rows, h5py.File]] = {}
    old = h5py.File(path, "r") if existing.meta is not None and existing.final_rows else None
    old_rows = _read_rows(old["rows"]) if old is not None else None
    try:
        with atomic_write(path, need, parts=parts_dir(path), commit=commit) as f:
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
                row_size = max(1, _nbytes(shape, dtype))
                chunk_rows = 1 if k == "maps" else max(1, min(n, max(1, (1 << 20) // row_size)))
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
    finally:
        for _, handle in parts.values():
            handle.close()
        if old is not None:
            old.close()
    remove_parts(path, keep=[p for p, _, _ in existing.other_views])
    return rows


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


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
