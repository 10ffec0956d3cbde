"""File names of a cache: its identity, its parts folder, lock and temporary names, within the name limit.

A cache belongs to one dataset folder: its file name carries a digest of the folder's resolved path besides the
folder's name, so two projects whose image folders share a name never overwrite or reuse each other's cache. Every
name beside a cache (``.parts``, ``.lock``, temporaries) is shortened to fit the file system's limit.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.errors import CacheError


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
