"""Write a file so that its name only ever holds a whole file: into a temporary beside it, then one rename; and
refuse, before any work, an output the disk has no room for.

A crash, Ctrl-C or a full disk while writing leaves no 0-byte or truncated file under the name asked for (an older
file there stays as it was), and the temporary is removed; a write fault is one :class:`~pipeline.errors.RunError`
line naming the file and the reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

from pipeline.errors import RunError
from pipeline.sizes import fmt_bytes

__all__ = ["Commit", "check_free_space", "commit_file", "temporary_name", "write_atomically", "write_then_commit"]

Commit = Callable[[Path, Path], None]
"""``commit(temporary, path)``: make a whole temporary file the file ``path`` (:func:`commit_file`; a test hands in
one that records or fails)."""

NAME_MAX = 255
"""Longest file name (bytes) of the file systems users keep outputs on (ext4, XFS, APFS, NTFS)."""


def temporary_name(path: Path) -> Path:
    """A hidden temporary beside ``path``, unique to this process and ending in the same suffix (Keras and joblib
    choose their format by it), shortened by a digest when the name would pass :data:`NAME_MAX`."""
    stem = path.name
    name = f".{stem}.{os.getpid()}.tmp{path.suffix}"
    if len(name.encode()) > NAME_MAX:
        stem = hashlib.sha256(path.name.encode()).hexdigest()[:16]
        name = f".{stem}.{os.getpid()}.tmp{path.suffix}"
    return path.with_name(name)


def commit_file(tmp: Path, path: Path) -> None:
    """Make the whole file ``tmp`` the file ``path``, durably: its bytes flushed to disk, one atomic rename, then
    the folder's entry flushed, so that after a crash or power loss ``path`` holds the old file or the new one,
    whole.

    Parameters
    ----------
    tmp : Path
        The written temporary (beside ``path``, on the same file system).
    path : Path
        The name it takes.

    Raises
    ------
    OSError
        The flush or the rename failed (the caller words it and removes the temporary).
    """
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened for reading (some network mounts): the rename itself is done
    try:
        os.fsync(dfd)
    except OSError:
        pass  # file systems that cannot flush a folder entry (some FUSE mounts) still renamed atomically
    finally:
        os.close(dfd)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None], what: str,
                     hint: str = "free some space or pass another --out", commit: Commit = commit_file) -> Path:
    """Call ``write(temporary)`` and rename the temporary to ``path``.

    Parameters
    ----------
    path : path
        The file to write; its folder is made when missing.
    write : callable
        Writes the whole file at the path it is given.
    what : str
        What the file is, for the error line (``"the predictions"``).
    hint : str
        What to do about a write fault.
    commit : callable
        Makes the written temporary the file (:func:`commit_file`).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    RunError
        When the folder cannot be made or the file cannot be written (permission, read-only, disk full): nothing
        is left under ``path`` that was not there before.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_then_commit(path, write, commit)
    except OSError as exc:
        raise RunError(f"cannot write {what} to {path} ({exc.strerror or exc}): {hint}; nothing was written "
                       f"under that name") from exc
    return path


def write_then_commit(path: Path, write: Callable[[Path], object], commit: Commit = commit_file) -> None:
    """Call ``write(temporary)`` beside ``path``, then ``commit`` it to ``path``; on any failure the temporary is
    removed and the error raised as it is (an OSError for the caller to word: :func:`write_atomically` makes it one
    line, the run record's writers let the fit say it)."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        commit(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def check_free_space(path: str | os.PathLike, need: int, what: str) -> None:
    """Refuse, before the work, an output that the free space of its disk cannot hold.

    Parameters
    ----------
    path : path
        The file to be written (its nearest existing folder is measured).
    need : int
        Bytes the file is estimated to take (and a temporary of it, while it is written).
    what : str
        What the file is, for the error line.

    Raises
    ------
    RunError
        When the disk has less than ``need`` bytes free.
    """
    folder = Path(path).expanduser().resolve().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot be measured: the write itself says what went wrong
    if free < need:
        raise RunError(f"not enough free space for {what} at {folder}: about {fmt_bytes(need)} needed, "
                       f"{fmt_bytes(free)} free; free some space or pass another --out (nothing was done)")
