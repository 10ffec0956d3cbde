"""Predict with a fitted head on new images, and export backbone + dense head as one Keras model.

Predictions go through exactly what made the training features: the backbone, width multiplier, input size,
weights file (checked by SHA-256), resize rule and decoding rule recorded in the run's feature cache, then the
saved head (a scikit-learn pipeline via joblib, or the dense head's ``.keras`` model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from pipeline.atomic import check_free_space, write_atomically
from pipeline.backbones import build_features
from pipeline.data import ImageItem, looks_like_image
from pipeline.errors import RunError
from pipeline.machine import decode_threads
from pipeline.reader import Decoded, read_batches
from pipeline.results import RunHead, head_file, run_model_config, select_head
from pipeline.runtime.factory import make_runtime
from pipeline.saved_head import load_saved_head
from pipeline.views import ViewSpec


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files among ``inputs``: files as given, folders searched recursively (hidden entries skipped), with
    the same candidate rule as dataset discovery (:func:`pipeline.data.looks_like_image`)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise RunError(f"{p} does not exist")
        if p.is_file():
            out.append(p)
            continue
        for dirpath, dirnames, filenames in os.walk(p, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                f = Path(dirpath) / fn
                if not fn.startswith(".") and looks_like_image(f):
                    out.append(f)
    if not out:
        raise RunError("no image files found in the given paths")
    return out


def _load_head(rh: RunHead) -> Callable[[np.ndarray], np.ndarray]:
    model = load_saved_head(head_file(rh.run_dir, rh.result), rh.cache_entry.get("feature_shape"),
                            len(rh.class_names))
    if rh.model_path.suffix == ".keras":
        return lambda x: np.asarray(model.predict(x, verbose=0, batch_size=256))
    return lambda x: np.asarray(model.predict_proba(x))


def predict_images(run_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike], head: str | None = None,
                   weights: str | None = None, batch_size: int = 32, runtime: str = "auto",
                   log: Callable[[str], None] = print, out: str | os.PathLike | None = None,
                   workers: int | None = None) -> tuple[RunHead, list[dict[str, Any]]]:
    """Predict class probabilities for image files with a run's head.

    Parameters
    ----------
    run_dir : path
        Folder written by ``fit``.
    inputs : paths
        Image files and/or folders (searched recursively).
    head : str, optional
        Result key or head name; default the run's best.
    weights : str, optional
        Backbone weights file, when the recorded one has moved (must have the recorded SHA-256).
    runtime : {"auto", "onnx", "keras"}
        Inference runtime for the backbone (see :func:`pipeline.runtime.factory.make_runtime`); every runtime
        gives the same features to 1e-4 of their scale, checked on the first batch.
    out : path, optional
        Where the predictions will be written (:func:`write_predictions`): its disk's free space is checked against
        an estimate of their size before any model is built.
    workers : int, optional
        Decoding workers (:mod:`pipeline.reader`, as ``extract`` decodes; default one per core, at most 8).

    Returns
    -------
    (RunHead, list of dict)
        One dict per image: ``path``, ``label`` (or None), ``probability`` and ``probs`` by class, or ``error``.
    """
    rh = select_head(run_dir, head)
    files = collect_images(inputs)
    if out is not None:
        check_free_space(out, predictions_size(files, rh.class_names, out), "the predictions")
    if rh.finetuned:
        return rh, predict_finetuned(rh, files, batch_size, workers, log)
    ex = rh.extraction
    tta = rh.tta_views
    head_fn = _load_head(rh)  # before the backbone is built: a missing, replaced or damaged file is one line
    model = run_model_config(rh, weights, announce=log)
    run = make_runtime(model, runtime, log=log, batch_size=batch_size)
    if tta is not None:
        log(f"{rh.key} averages its probabilities over the centre view and {tta.describe()} (test-time views "
            f"chosen by fit)")

    def score(batch: list[Decoded]) -> np.ndarray:
        if tta is not None:  # each image's centre view first, then its views: (K + 1) rows per image
            pixels = np.concatenate([np.concatenate([d.pixels[None], d.views]) if d.views is not None
                                     else d.pixels[None] for d in batch])
            feats = run(pixels)[rh.feature].astype(np.float32)
            return head_fn(feats).reshape(len(batch), tta.n + 1, -1).mean(axis=1)
        return head_fn(run(np.stack([d.pixels for d in batch]))[rh.feature].astype(np.float32))

    batches = _read(files, model.input_size, ex["resize"], batch_size, workers, tta, log)
    return rh, _rows_by_batch(batches, score, rh.class_names)


def _read(files: list[Path], size: int, resize: str, batch_size: int, workers: int | None,
          views: ViewSpec | None, log: Callable[[str], None]) -> Iterator[list[Decoded]]:
    """The files decoded by the reader as extraction decodes them (the same function, so the same pixels and, with
    ``views``, the same views of each file, keyed by its SHA-256)."""
    items = [ImageItem(str(f), -1, "", 0, 0) for f in files]  # a path as given: relative to "." or absolute
    return read_batches(Path("."), items, size, resize, batch_size, workers or decode_threads(), views, log=log)


def predictions_size(files: list[Path], class_names: list[str], out: str | os.PathLike) -> int:
    """Bytes :func:`write_predictions` is about to need for ``files``, generously (paths as written, 24 characters
    per probability, JSON's indentation and keys), twice over for the temporary it writes first."""
    per_row = 64 + 24 * len(class_names) + (48 + 16 * len(class_names) if str(out).lower().endswith(".json") else 0)
    return 2 * (sum(len(os.fsencode(f)) for f in files) + per_row * len(files) + 4096)


def write_predictions(rows: list[dict[str, Any]], class_names: list[str], out: str | os.PathLike) -> Path:
    """Write predictions as CSV (``.csv``) or JSON (``.json``), atomically (:func:`pipeline.atomic.write_atomically`:
    a write fault is one line and leaves no partial file under ``out``)."""
    path = Path(out)
    if path.suffix.lower() == ".json":
        def write(tmp: Path) -> None:
            tmp.write_text(json.dumps(rows, indent=1))
    elif path.suffix.lower() == ".csv":
        import csv

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["path", "label", "probability", *[f"p_{c}" for c in class_names], "error"])
                for r in rows:
                    probs = r.get("probs", {})
                    w.writerow([r["path"], r.get("label", ""), r.get("probability", ""),
                                *[probs.get(c, "") for c in class_names], r.get("error", "")])
    else:
        raise RunError(f"--out must end in .csv or .json, got {path.name}")
    return write_atomically(path, write, "the predictions")


def export_size(backbone_weights: str, head: Path) -> int:
    """Bytes an exported model is about to need: the backbone's weights file (float32, as the model stores them;
    the resolved file of ImageNet weights too) and the saved head, with a margin, for the model and its temporary
    (a random backbone, with no file, counts by the head alone: its size is not known before it is built)."""
    weights = Path(backbone_weights)
    base = weights.stat().st_size if weights.is_file() else 0
    return int(2 * 1.1 * (base + head.stat().st_size)) + 65536


def _save_export(model: Any, path: Path, side: dict[str, Any]) -> Path:
    """Save an exported model and its ``<out>.json`` sidecar, each atomically (the model first)."""
    write_atomically(path, lambda tmp: model.save(tmp), "the exported model")
    write_atomically(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(side, indent=1)),
                     "the exported model's sidecar")
    return path


def export_model(run_dir: str | os.PathLike, out: str | os.PathLike, head: str | None = "dense",
                 weights: str | None = None, log: Callable[[str], None] = lambda m: None) -> Path:
    """Save backbone + dense head as one ``.keras`` model that plain Keras loads.

    The model takes ``(n, s, s, 3)`` RGB pixels in [0, 255] already resized by the run's resize rule and returns
    class probabilities; a ``<out>.json`` beside it records class names, input size, resize rule and provenance.

    When the head chose test-time views (``views.chosen`` ``tta`` or ``both``), the model averages them only if
    they are the mirror image alone (``--views 1 --view-kinds flip``: exactly the input reversed left-right, done
    in the graph); with any other views it is the centre-view model, and ``log`` receives one line saying so (the
    sidecar records it as ``tta``). ``predict`` always applies the head's full choice.
    """
    import keras

    rh = select_head(run_dir, head)
    if rh.finetuned:
        return export_finetuned(rh, out)
    if rh.model_path.suffix != ".keras":
        raise RunError(f"{rh.key} is a scikit-learn head; only Keras (dense) heads export to one .keras model")
    if rh.feature == "maps":
        raise RunError("exporting heads fitted on spatial maps is not supported; fit the dense head on avg features")
    ex = rh.extraction
    saved = head_file(rh.run_dir, rh.result)
    head_model = load_saved_head(saved, rh.cache_entry.get("feature_shape"),
                                 len(rh.class_names))  # before the backbone is built: a bad file is one line
    model = run_model_config(rh, weights, announce=lambda m: None)
    check_free_space(out, export_size(model.weights.path, saved), "the exported model")
    built = build_features(model)
    pixels = keras.Input((built.input_size, built.input_size, 3), name="pixels")
    feats = built.model(pixels)[rh.feature]
    probs = head_model(feats)
    tta = rh.tta_views
    tta_note = "none"
    if tta is not None and tta.n == 1 and tuple(tta.kinds) == ("flip",):
        mirrored = keras.ops.flip(pixels, axis=2)  # view 1 of a flip spec: the centre view's pixels reversed
        probs = keras.layers.Average(name="mirror_tta")([probs, head_model(built.model(mirrored)[rh.feature])])
        tta_note = "mirror image averaged in the model"
        log(f"{rh.key} uses test-time views: the exported model averages the image and its mirror image, as "
            f"predict does")
    elif tta is not None:
        tta_note = f"not exported: centre-view model; predict averages over {tta.describe()}"
        log(f"note: {rh.key} averages over {tta.n} augmented views at predict; the exported model is the "
            f"centre-view model (only mirror-only views export)")
    model = keras.Model(pixels, probs, name=f"{built.label}_{rh.result['head']}")
    path = Path(out)
    if path.suffix != ".keras":
        raise RunError(f"--out must end in .keras, got {path.name}")
    side = {"class_names": rh.class_names, "input_size": built.input_size, "resize": ex["resize"],
            "input": "RGB pixels in [0, 255], shape (n, size, size, 3), resized by the resize rule",
            "backbone": ex["backbone"], "alpha": ex["alpha"], "weights_sha256": ex["weights_sha256"],
            "head": rh.key, "run": str(Path(run_dir).resolve()), "tta": tta_note}
    return _save_export(model, path, side)


# ---- fine-tuned models (``python cli.py finetune``): pixels in, probabilities out, no backbone to rebuild --------


def _load_finetuned(rh: RunHead) -> Any:
    size = int(rh.extraction["input_size"])
    return load_saved_head(head_file(rh.run_dir, rh.result), (size, size, 3), len(rh.class_names))


def predict_finetuned(rh: RunHead, files: list[Path], batch_size: int = 32, workers: int | None = None,
                      log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """:func:`predict_images` for a fine-tuned model: each file decoded and resized by the run's cache rule, then the
    model; rows as :func:`predict_images` returns them."""
    model = _load_finetuned(rh)
    size, resize = int(rh.extraction["input_size"]), str(rh.extraction["resize"])

    def score(batch: list[Decoded]) -> np.ndarray:
        pixels = np.stack([d.pixels for d in batch]).astype(np.float32)
        return np.asarray(model(pixels, training=False), np.float64)

    return _rows_by_batch(_read(files, size, resize, batch_size, workers, None, log), score, rh.class_names)


def _rows_by_batch(batches: Iterable[list[Decoded]], score: Callable[[list[Decoded]], np.ndarray],
                   class_names: list[str]) -> list[dict[str, Any]]:
    """One row per file, in order: an undecodable file is a row with its ``error`` (the others go on); ``score``
    turns a batch's decoded images into class probabilities."""
    rows: list[dict[str, Any]] = []
    for batch in batches:
        ok = [d for d in batch if d.pixels is not None]
        for d in batch:
            rows.append({"path": d.item.relpath} if d.pixels is not None else
                        {"path": d.item.relpath, "error": d.error})
        if ok:
            for row, p in zip((r for r in rows[-len(batch):] if "error" not in r), score(ok)):
                k = int(np.argmax(p))
                row["label"] = class_names[k]
                row["probability"] = float(p[k])
                row["probs"] = {c: float(v) for c, v in zip(class_names, p)}
    return rows


def export_finetuned(rh: RunHead, out: str | os.PathLike) -> Path:
    """:func:`export_model` for a fine-tuned model: the run's ``.keras`` file (already pixels -> probabilities),
    saved again at ``out`` with the same ``<out>.json`` sidecar."""
    path = Path(out)
    if path.suffix != ".keras":
        raise RunError(f"--out must end in .keras, got {path.name}")
    model = _load_finetuned(rh)  # its file checked against the recorded SHA-256 first
    check_free_space(path, export_size("", rh.model_path), "the exported model")
    ex = rh.extraction
    side = {"class_names": rh.class_names, "input_size": int(ex["input_size"]), "resize": ex["resize"],
            "input": "RGB pixels in [0, 255], shape (n, size, size, 3), resized by the resize rule",
            "backbone": ex["backbone"], "alpha": ex["alpha"], "weights_sha256": ex["weights_sha256"],
            "head": rh.key, "start": (rh.result.get("params") or {}).get("start"),
            "run": str(Path(rh.run_dir).resolve())}
    return _save_export(model, path, side)
