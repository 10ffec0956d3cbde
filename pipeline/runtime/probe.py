"""The parity probe: fixed pixels whose Keras features are computed once, when a model is exported, and stored in it.

Every run that opens an exported ONNX model must know that ONNX Runtime, on this machine and provider, computes
what the Keras model computes. Checking that with an eager Keras run on the first real batch costs the same CPU per
run whatever the dataset's size (the eager reference of two MobileNetV2 images and the garbage collection after it:
about 0.6 s, 1.1 ms per image of a 398-image folder, half of what decoding it costs; docs/benchmarks.md). The
exporter already has the Keras model built, so it runs it
once on :func:`probe_pixels` and stores the features in the exported file's metadata (:data:`PROBE_PROP`, bound to
the file as its key is). A run then only runs the probe through its own session and compares
(:func:`relative_difference`): a damaged stored model, a wrong provider result (TF32 on a GPU) or a runtime fault shows
there as it would on real images, since the pixels go through the same graph (preprocessing included, the input is
uint8). A model stored without a probe (exported by an older version) is checked against Keras as before.

Only pooled outputs (``avg``, ``max``) are stored: the spatial maps are the tensor they are pooled from, so a fault in
them shows in the pooled outputs, and storing them would make the file megabytes larger.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import numpy as np

__all__ = ["PROBE_PROP", "PROBE_IMAGES", "PROBE_SEED", "probe_pixels", "encode_probe", "decode_probe",
           "keras_features", "relative_difference"]

PROBE_PROP = "headbench_probe"
"""Metadata key of the stored probe features in an exported ``.onnx`` file."""
PROBE_IMAGES = 2
"""Probe images: one of seeded noise (every pixel value, every channel) and one smooth gradient with noise (the
statistics of a photo's large regions)."""
PROBE_SEED = 20_240_601
"""Seed of the probe's noise: the probe is the same pixels on every machine."""


def probe_pixels(size: int) -> np.ndarray:
    """The probe: ``(PROBE_IMAGES, size, size, 3)`` uint8, the same on every call and machine."""
    rng = np.random.default_rng(PROBE_SEED)
    noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    ramp = np.linspace(0.0, 255.0, size)
    smooth = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                       np.full((size, size), 128.0)], axis=-1)
    smooth = np.clip(smooth + rng.normal(0.0, 12.0, smooth.shape), 0, 255).astype(np.uint8)
    return np.stack([noise, smooth])


def encode_probe(features: dict[str, np.ndarray], size: int) -> str:
    """The metadata value of a probe's features (pooled outputs only, float32, base64)."""
    outputs = {k: {"shape": list(v.shape), "data": base64.b64encode(np.ascontiguousarray(v, np.float32)).decode()}
               for k, v in features.items() if np.ndim(v) == 2}
    return json.dumps({"seed": PROBE_SEED, "images": PROBE_IMAGES, "size": int(size), "outputs": outputs},
                      sort_keys=True)


def decode_probe(text: str | None, size: int) -> dict[str, np.ndarray] | None:
    """The stored probe features, or None when there are none or they do not belong to these probe pixels."""
    if not text:
        return None
    try:
        doc: Any = json.loads(text)
        if (doc.get("seed"), doc.get("images"), doc.get("size")) != (PROBE_SEED, PROBE_IMAGES, int(size)):
            return None
        out = {k: np.frombuffer(base64.b64decode(v["data"]), np.float32).reshape(v["shape"])
               for k, v in doc["outputs"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable probe: the run checks against Keras instead
    return out or None


def keras_features(built: Any, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The Keras feature model's outputs for ``pixels``, eagerly and in float32 on the CPU: the reference ONNX
    Runtime is held to (at export, on the probe; in a run without a stored probe, on its first images)."""
    import keras

    x = pixels.astype(np.float32)
    ctx: Any = contextlib.nullcontext()
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        ctx = tf.device("/CPU:0")
    with ctx:
        out = built.model(x, training=False)
    return {k: np.asarray(v) for k, v in out.items()}


def relative_difference(out: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    """``max|out - ref| / max|ref|`` over every output (inf when shapes or the finite entries disagree)."""
    worst = 0.0
    for kind, r in ref.items():
        o = out.get(kind)
        if o is None or o.shape != r.shape:
            return float("inf")
        fin = np.isfinite(r)
        if not np.array_equal(fin, np.isfinite(o)):
            return float("inf")
        if not fin.any():
            continue
        r64, o64 = r[fin].astype(np.float64), o[fin].astype(np.float64)
        diff = float(np.abs(o64 - r64).max())
        scale = float(np.abs(r64).max())
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst
