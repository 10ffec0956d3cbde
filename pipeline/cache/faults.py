"""One-line errors for cache faults: failed writes (disk full, read-only, permission) and damaged files.

A damaged cache is reported with the ``extract`` command that rebuilds that very file (:func:`rebuild_command`).
"""

from __future__ import annotations

import errno
import os
import shlex
from pathlib import Path
from typing import Any

from pipeline.backbones import get_spec
from pipeline.data import DEFAULT_RESIZE
from pipeline.errors import BackboneError, CacheError
from pipeline.sizes import fmt_bytes
from pipeline.views import ViewSpec

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
        need = f" (needs about {fmt_bytes(need_bytes)} free)" if need_bytes else ""
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


class DamagedCache(CacheError):
    """A complete cache or a part failed its checksums while its rows were being copied (``path``: which file)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = Path(path)
