"""How rows and attributes are stored: the per-image row metadata, its digest, and root attribute encoding.

:class:`Rows` holds a block of rows in memory; ``_write_rows`` / ``_read_rows`` store and load them as the
``rows/*`` datasets, and :meth:`Rows.digest` is the ``rows_sha256`` of docs/cache-format.md. :class:`Existing` is
what a previous run left for a cache (read by :func:`pipeline.cache.read.scan_existing`, consumed by
:func:`pipeline.cache.write.assemble`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.cache.format import _JSON_ATTRS, _ROW_DTYPES, _STRING_FIELDS, ROW_FIELDS

_STR = h5py.string_dtype("utf-8")

_DIGEST_BLOCK = 65536
"""Rows hashed at a time by :meth:`Rows.digest`: the same bytes as whole fields, without a copy of each field in
memory at once (at a million rows that copy was ~110 MB, mostly the 64-byte digests twice)."""


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

    def digest(self, block: int = _DIGEST_BLOCK) -> str:
        """SHA-256 of the rows' content in the canonical form of docs/cache-format.md.

        Hashed ``block`` rows at a time: the same bytes as whole arrays and one join of all strings, without those
        copies in memory at once.

        Parameters
        ----------
        block : int, optional
            Rows hashed at a time (default :data:`_DIGEST_BLOCK`); the digest is the same whatever it is.
        """
        h = hashlib.sha256()
        n = len(self)
        for name in (*ROW_FIELDS, "run"):
            h.update(name.encode() + b"\0")
            values = getattr(self, name)
            for start in range(0, n, block):
                part = values[start:start + block]
                if name in _STRING_FIELDS:  # the values joined by \x1f, the separator also between blocks
                    h.update((b"\x1f" if start else b"") + "\x1f".join(str(v) for v in part).encode("utf-8"))
                else:
                    h.update(np.ascontiguousarray(np.asarray(part, dtype=_ROW_DTYPES[name])))
        return h.hexdigest()


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
