"""The cache's written format in constants: schema, format name, the signature, the row fields, dataset names.

``docs/cache-format.md`` is the normative text; every constant here must agree with it. Bump
:data:`SCHEMA_VERSION` when old readers would misread a new file (files of schema 1 are still read).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMAT_NAME = "headbench-features"
FEATURE_KINDS = ("avg", "max", "maps")
LIBVER = ("v110", "latest")
"""HDF5 file format bounds: 1.10's format checksums the file's own metadata (superblock, object headers)."""


class Signature(NamedTuple):
    """The attributes that must agree between a cache and what the caller asks for (and between parts and their
    cache): two sets of rows are interchangeable exactly when their signatures are equal.

    The one list of the signature's keys: :data:`SIGNATURE_KEYS` is its fields, and the extraction's configuration
    makes one (:meth:`pipeline.extract.config.ExtractConfig.signature`). docs/cache-format.md names them.
    """

    backbone: str
    backbone_label: str
    alpha: float | None
    input_size: int
    resize: str
    preprocess: str
    preprocess_mode: str
    weights_source: str
    weights_sha256: str
    pixel_rule: str
    feature_kinds: list[str]
    maps_dtype: str
    views: dict[str, Any]


SIGNATURE_KEYS: tuple[str, ...] = Signature._fields
"""Attributes that must agree between a cache and what the caller asks for (and between parts and their cache)."""
ROW_FIELDS = ("path", "label", "split", "size", "mtime_ns", "sha256", "ok", "error")
_STRING_FIELDS = ("path", "split", "error")
_ROW_DTYPES = {"label": "<i4", "size": "<i8", "mtime_ns": "<i8", "sha256": "S64", "ok": "|b1", "run": "<i2"}
_JSON_ATTRS = ("class_names", "feature_kinds", "map_shape", "versions", "alpha", "views", "runs")


def _signature(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in SIGNATURE_KEYS}


def _dataset_name(key: str) -> str:
    """Where a feature key lives: ``avg`` -> ``features/avg``; ``views/avg`` stays."""
    return key if "/" in key else f"features/{key}"


def _store_dtype(key: str, meta: dict[str, Any]) -> type:
    return np.float16 if key == "maps" and meta.get("maps_dtype") == "float16" else np.float32
