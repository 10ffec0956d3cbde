"""The cache's written format in constants: schema, format name, the signature, the row fields, dataset names.

``docs/cache-format.md`` is the normative text; every constant here must agree with it. Bump
:data:`SCHEMA_VERSION` when old readers would misread a new file (files of schema 1 are still read).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMAT_NAME = "headbench-features"
FEATURE_KINDS = ("avg", "max", "maps")
LIBVER = ("v110", "latest")
"""HDF5 file format bounds: 1.10's format checksums the file's own metadata (superblock, object headers)."""
SIGNATURE_KEYS = (
    "backbone", "backbone_label", "alpha", "input_size", "resize", "preprocess", "preprocess_mode",
    "weights_source", "weights_sha256", "pixel_rule", "feature_kinds", "maps_dtype", "views",
)
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
