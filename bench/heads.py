"""The classic tutorial way vs extract-once: what comparing dense heads costs.

Both on the same image files (default ``../shared/data/flowers5``, 4317 photos, 5 classes) with the shared ImageNet
MobileNetV2 weights, batch 32:

* **classic** -- the Keras transfer-learning tutorial: ``image_dataset_from_directory`` -> ``preprocess_input`` ->
  frozen MobileNetV2 (pooling avg) -> Dense(256, relu) -> Dropout(0.5) -> Dense(softmax), trained end to end with
  ``model.fit`` from the JPEG files. Two epochs are timed and the per-epoch cost is the faster of the two (the
  conservative choice: the first also traces the graph, yet the second was measured slower, as the tutorial's
  dataset reshuffles and re-reads the files). Every epoch re-runs the frozen backbone over every image.
* **extract-once** -- ``extract_dataset`` (wall time, model build included) once, then the same dense head
  (:class:`pipeline.fit.heads.DenseHead`, 10 epochs, no early stopping) on the cached features; each of the 5 heads is
  a different hyperparameter setting, as a user comparing heads would try.

Ratios at 10 epochs: ``classic = heads x 10 x epoch cost`` against ``extract + sum(head fits)``, for 1 and 5 heads.

Usage::

    python bench/heads.py [--data DIR] [--epochs 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import _start  # bench/_start.py: the repo on sys.path, TensorFlow's native chatter off

REPO = _start.start(__name__)
WEIGHTS = REPO.parent / "shared" / "weights" / "coralq_mobilenet_v2_1.0_224_no_top.weights.h5"
HEAD_SETTINGS = [dict(hidden=256, dropout=0.5), dict(hidden=512, dropout=0.5), dict(hidden=128, dropout=0.3),
                 dict(hidden=256, dropout=0.2, learning_rate=3e-4), dict(hidden=256, dropout=0.5, batch_size=32)]


def classic_epochs(root: Path, n_classes: int, epochs: int = 2) -> list[float]:
    """Seconds per epoch of the tutorial's frozen-base + head model trained from the image files."""
    import keras

    keras.utils.set_random_seed(0)
    ds = keras.utils.image_dataset_from_directory(root, image_size=(224, 224), batch_size=32, seed=0,
                                                  verbose=False)
    ds = ds.map(lambda x, y: (keras.applications.mobilenet_v2.preprocess_input(x), y))
    base = keras.applications.MobileNetV2(include_top=False, weights=str(WEIGHTS), input_shape=(224, 224, 3),
                                          pooling="avg")
    base.trainable = False
    inputs = keras.Input((224, 224, 3))
    x = base(inputs, training=False)
    x = keras.layers.Dense(256, activation="relu")(x)
    x = keras.layers.Dropout(0.5)(x)
    model = keras.Model(inputs, keras.layers.Dense(n_classes, activation="softmax")(x))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    model.fit(ds, epochs=epochs, verbose=0, callbacks=[Timer()])
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flowers5")
    ap.add_argument("--epochs", type=int, default=10, help="epochs per head in the comparison")
    args = ap.parse_args()
    if not WEIGHTS.exists() or not args.data.exists():
        raise SystemExit("needs ../shared (weights and data) beside the repository")

    from pipeline.cache import read_features
    from pipeline.extract import extract_dataset, resolve_config
    from pipeline.fit.heads import DenseHead

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cfg = resolve_config(backbone="mobilenet_v2", weights=str(WEIGHTS), cache_dir=tmp, log=lambda m: None)
        res = extract_dataset(args.data, cfg, log=lambda m: None)
        extract_s = time.perf_counter() - t
        fs = read_features(res.path)
    fits = []
    for params in HEAD_SETTINGS:
        head = DenseHead(epochs=args.epochs, validation_fraction=0.0, **params)
        t = time.perf_counter()
        head.fit(fs.features, fs.labels)
        fits.append(time.perf_counter() - t)
    ep = classic_epochs(args.data, len(fs.class_names))
    epoch = min(ep)
    n = len(fs.paths)
    print(f"data: {args.data} ({n} images, {len(fs.class_names)} classes), MobileNetV2 224, batch 32, "
          f"{os.cpu_count()} CPUs")
    print(f"classic (frozen base + head, model.fit from JPEGs): epoch 1 {ep[0]:.1f} s (includes tracing), "
          f"epoch 2 {ep[1]:.1f} s -> {epoch:.1f} s/epoch, the faster ({n / epoch:.0f} images/s)")
    print(f"extract once: {extract_s:.1f} s ({n / extract_s:.0f} images/s, model build included)")
    print(f"dense head on the cache, {args.epochs} epochs: " + ", ".join(f"{f:.2f}" for f in fits) + " s")
    for k in (1, 5):
        classic = k * args.epochs * epoch
        ours = extract_s + sum(fits[:k])
        print(f"{k} head(s) x {args.epochs} epochs: classic {classic:.0f} s vs extract-once {ours:.1f} s "
              f"-> {classic / ours:.1f}x")


if __name__ == "__main__":
    main()
