"""Fine-tuning: the top of the backbone and a converged head, trained together from the image files.

The classic transfer-learning recipe's third step. After a head has converged on frozen features, the top layers
of the backbone are unfrozen and trained together with it, at a low learning rate, on augmented images.

Model
-----
``pixels (n, s, s, 3) in [0, 255] -> preprocessing -> backbone -> global average pooling -> head -> probabilities``,
with the same preprocessing layers as the feature model (:func:`pipeline.backbones.preprocess_layers`), so the
features at the start are the cache's ``avg`` features. The head starts from a fitted head:

* a run's **dense head** (``heads/<key>.keras``: Normalization -> Dense(256, relu) -> Dropout -> softmax on raw
  pooled features), used as it is, nested in the model;
* a fitted **logistic regression** (``heads/<key>.joblib``: StandardScaler + LogisticRegression), turned into one
  ``Dense(n_classes, softmax)`` layer with the scaler folded into its weights exactly
  (``W' = W / scale``, ``b' = b - W' . mean``; a binary model's single logit ``z`` becomes the logits ``(0, z)``,
  whose softmax is the sigmoid), so fine-tuning starts from the converged probe's probabilities.

Batch normalisation stays in inference mode
-------------------------------------------
Every ``BatchNormalization`` layer of the backbone keeps ``trainable = False``, which in Keras 3 also makes it use
its moving statistics during training. Calling the backbone with ``training=False`` (the Keras guide's recipe) is
not enough once layers are unfrozen, because ``fit`` calls the model with ``training=True``
(keras-team/keras#20285): the moving statistics then follow the small training batches, and with the guide's
recipe validation accuracy on hymenoptera (MobileNetV2, top 30 layers, Adam 1e-5) fell from 0.961 to 0.667 in 6
epochs.

Training
--------
Images stream from their files (:func:`image_batches`, a ``keras.utils.PyDataset`` over file lists, decoded in
threads by :func:`pipeline.views.read_views` with the cache's pixel and resize rules): memory does not depend on
the dataset size. Keras augmentation layers (``RandomFlip`` horizontal, ``RandomRotation`` within
+-:attr:`FinetuneConfig.rotation` degrees, ``RandomZoom`` in by up to :attr:`FinetuneConfig.zoom`) sit in front
of the model during training only; the model that is returned and saved has none. Adam at a low learning rate
(1e-5) trains the unfrozen layers and the head. After every epoch the model is scored on the selection split
(accuracy, the protocol's selection score; log loss breaks ties) and, before the first epoch, the starting model
too: the best of these is kept (epoch 0, the starting head, when no epoch beats it, so fine-tuning never returns a
model worse on the selection split than the head it started from), and training stops after
:attr:`FinetuneConfig.patience` epochs without improvement.

Which layers are unfrozen (:data:`UNFREEZE_FROM`)
-------------------------------------------------
By default the backbone's last stage after the block that downsamples to the final 7x7 (8x8) grid, plus the final
convolution: the layers whose features are the most specific to ImageNet's classes and the least transferable
(Yosinski et al. 2014); the backward pass runs through these layers only. For MobileNetV2 that is
blocks 14-16 and ``Conv_1`` (29 layers, 1.5 M of 2.2 M weights); for InceptionV3 the last two inception blocks,
the Keras guide's choice (62 layers); for ConvNeXt its stage 4 after the last downsampling layer, for DenseNet dense
block 5, for ResNetV2 (which downsamples at the end of stage 4) all of stage 5. ``unfreeze`` sets the number of top
layers instead (0: only the head).

ConvNeXt has no batch normalisation: its LayerNormalization layers normalise each position over its own channels,
with no statistics that depend on the batch, so they behave alike in training and inference and are trained
with the unfrozen layers. Every other normalisation layer with moving statistics (``BatchNormalization``) stays
frozen, in inference mode, as above.

The returned model is a plain Keras model (built-in layers only) that ``keras.models.load_model`` reloads without
custom objects.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.errors import DatasetError, FitError, ImageDecodeError
from pipeline.machine import decode_threads
from pipeline.views import read_views

__all__ = ["FinetuneConfig", "FinetuneData", "FinetuneResult", "image_batches", "UNFREEZE_FROM", "default_unfreeze",
           "logreg_dense_weights", "build_finetune_model", "finetune", "save_finetuned"]

UNFREEZE_FROM = {
    "mobilenet": "conv_dw_13",
    "mobilenet_v2": "block_14_expand",
    "inception_v3": ">mixed8",  # blocks mixed9 and mixed10 (their layers have numbered names: conv2d_80, ...)
    "resnet50": "conv5_block2_1_conv",
    "efficientnet_b0": "block6b_expand_conv",
    "mobilenet_v3_small": "expanded_conv_9_expand",
    "mobilenet_v3_large": "expanded_conv_13_expand",
    **{f"convnext_{v}": f"convnext_{v}_stage_3_block_0_depthwise_conv" for v in ("tiny", "small", "base")},
    **{f"efficientnet_v2_{v}": "block6b_expand_conv" for v in ("b0", "b1", "b2", "b3", "s")},
    **{f"efficientnet_{v}": "block6b_expand_conv" for v in ("b1", "b2", "b3")},
    "resnet50_v2": "conv5_block1_preact_bn",  # ResNetV2 downsamples in the last block of stage 4: all of stage 5
    "resnet101_v2": "conv5_block1_preact_bn",
    "xception": "block14_sepconv1",  # the exit flow after block 13's pooling
    "inception_resnet_v2": ">mixed_7a",  # the ten block8 modules and conv_7b
    "densenet121": "conv5_block1_0_bn",  # dense block 5 after transition pool4
    "densenet201": "conv5_block1_0_bn",
    "nasnet_mobile": ">reduction_concat_reduce_8",  # normal cells 9-12
}
"""First backbone layer unfrozen by default: the last stage after its downsampling block (see module docstring).
A name after ``>`` means the layers after that one (where the first layer of the stage has a numbered name)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune.

    Attributes
    ----------
    unfreeze : int or None
        Top layers of the backbone to train (0: the head only); None: :func:`default_unfreeze`.
    learning_rate : float
        Adam's learning rate. 1e-5: the head has converged and the pretrained layers must move only a little.
    epochs : int
        Most epochs. At 1e-5 from a converged head the kept epoch was the 1st to the 7th in six runs on
        hymenoptera (bench/finetune.py); 10 bounds the cost at ten passes over the training images.
    patience : int
        Epochs without a better selection score before stopping (the best epoch's weights are kept).
    batch_size : int
    flip : bool
        Random horizontal flips during training.
    rotation : float
        Largest random rotation during training, in degrees (0: none).
    zoom : float
        Largest random zoom-in during training, as a fraction of the side (0: none).
    seed : int
        Seed of the shuffling, the augmentation and the head's dropout.
    workers : int or None
        Decoding threads (default: one per CPU core).
    progress : bool
        A progress bar per epoch (one line per epoch when stderr is not a terminal).
    keep_best : bool
        Keep the weights of the epoch with the best selection score (the default); False keeps the last epoch's.
    run_eagerly : bool
        Train without compiling a TensorFlow graph: slower per step but without the seconds of tracing, only worth
        it for tiny data (the tests use it).
    """

    unfreeze: int | None = None
    learning_rate: float = 1e-5
    epochs: int = 10
    patience: int = 3
    batch_size: int = 32
    flip: bool = True
    rotation: float = 10.0
    zoom: float = 0.2
    seed: int = 0
    workers: int | None = None
    progress: bool = True
    keep_best: bool = True
    run_eagerly: bool = False

    def check(self) -> None:
        """Raise FitError with one clear line for an unusable setting."""
        if self.unfreeze is not None and self.unfreeze < 0:
            raise FitError(f"--unfreeze must be 0 or more layers, got {self.unfreeze}")
        if not self.learning_rate > 0:
            raise FitError(f"the learning rate must be positive, got {self.learning_rate}")
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise FitError("epochs, patience and batch size must be at least 1")
        if not 0 <= self.rotation < 180 or not 0 <= self.zoom < 1:
            raise FitError(f"rotation must be in [0, 180) degrees and zoom in [0, 1), got {self.rotation}, "
                           f"{self.zoom}")


@dataclass(frozen=True)
class FinetuneData:
    """The images to fine-tune on: files relative to ``root`` with class indices into ``class_names``.

    Attributes
    ----------
    root : Path
        Dataset folder.
    class_names : list of str
        Output order of the model.
    train, select : list of (str, int)
        (relative path, class index) of the training rows and of the selection rows (early stopping and the choice
        of the best epoch). Only images that decoded at extraction belong here.
    resize : {"crop", "squash", "pad"}
        The resize rule of the cache the head was fitted on.
    """

    root: Path
    class_names: list[str]
    train: list[tuple[str, int]]
    select: list[tuple[str, int]]
    resize: str


@dataclass
class FinetuneResult:
    """What :func:`finetune` made.

    Attributes
    ----------
    model : keras.Model
        Pixels ``(n, s, s, 3)`` in [0, 255] -> class probabilities, in ``class_names`` order.
    class_names : list of str
    history : dict of str to list of float
        ``select_accuracy`` and ``select_loss`` per epoch, index 0 being the starting model; ``loss`` and
        ``accuracy`` on the (augmented) training batches per epoch, index 0 being None.
    best_epoch : int
        Epoch whose weights were kept (0: the starting model).
    epochs_run : int
    unfreeze : int
        Top backbone layers that were trained.
    trainable_weights : int
        Number of trained scalars (unfrozen layers and head).
    seconds : float
        Wall time of training and selection scoring (model build excluded).
    select_proba : np.ndarray
        Probabilities of the selection rows from the kept model.
    """

    model: Any
    class_names: list[str]
    history: dict[str, list[Any]]
    best_epoch: int
    epochs_run: int
    unfreeze: int
    trainable_weights: int
    seconds: float
    select_proba: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))

    @property
    def select_accuracy_start(self) -> float:
        """Selection accuracy of the starting model (the frozen head)."""
        return float(self.history["select_accuracy"][0])

    @property
    def select_accuracy(self) -> float:
        """Selection accuracy of the kept model."""
        return float(self.history["select_accuracy"][self.best_epoch])

    def to_json(self) -> dict[str, Any]:
        """Metrics and settings, JSON-ready (no model)."""
        return {"class_names": list(self.class_names), "best_epoch": self.best_epoch,
                "epochs_run": self.epochs_run, "unfreeze": self.unfreeze,
                "trainable_weights": self.trainable_weights, "seconds": round(self.seconds, 3),
                "select_accuracy_start": self.select_accuracy_start, "select_accuracy": self.select_accuracy,
                "history": self.history}


# ---- data --------------------------------------------------------------------------------------------------------


class _Batches:
    """Batches ``(pixels float32 (n, s, s, 3) in [0, 255], labels int64 (n,))`` streamed from image files.

    Decoded by :func:`pipeline.views.read_views` (the centre view: the cache's pixel rule and resize rule), a few
    batches ahead in ``workers`` threads, so memory does not grow with the number of images. With ``shuffle`` the
    order is reshuffled after every epoch by a generator seeded with ``seed``. Made a ``keras.utils.PyDataset`` by
    :func:`image_batches` (Keras is imported only when one is made).

    Raises
    ------
    DatasetError
        When a file can no longer be decoded (it changed since extraction).
    """

    def __init__(self, root: Path, items: Sequence[tuple[str, int]], size: int, resize: str, batch_size: int,
                 shuffle: bool = False, seed: int = 0, workers: int = 1) -> None:
        super().__init__(workers=max(1, int(workers)), use_multiprocessing=False, max_queue_size=4)
        self.root = Path(root)
        self.items = list(items)
        self.size = int(size)
        self.resize = resize
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self.order = self._rng.permutation(len(self.items)) if shuffle else np.arange(len(self.items))

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        pixels = np.empty((len(rows), self.size, self.size, 3), np.float32)
        labels = np.empty(len(rows), np.int64)
        for j, r in enumerate(rows):
            rel, label = self.items[r]
            try:
                pixels[j] = read_views(self.root / rel, self.size, self.resize)[0]
            except ImageDecodeError as exc:
                raise DatasetError(f"{rel}: {exc} (it decoded at extraction: extract again)") from None
            labels[j] = label
        return pixels, labels

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.order = self._rng.permutation(len(self.items))


_BATCHES_CLASS: list[type] = []


def image_batches(root: Path, items: Sequence[tuple[str, int]], size: int, resize: str, batch_size: int,
                  shuffle: bool = False, seed: int = 0, workers: int = 1) -> Any:
    """A ``keras.utils.PyDataset`` of image batches streamed from files (see :class:`_Batches`).

    Parameters
    ----------
    root : Path
        Dataset folder.
    items : sequence of (str, int)
        (relative path, class index) pairs.
    size : int
        Input side.
    resize : {"crop", "squash", "pad"}
    batch_size : int
    shuffle : bool
        Reshuffle after every epoch (training).
    seed : int
    workers : int
        Decoding threads.
    """
    if not _BATCHES_CLASS:
        import keras

        _BATCHES_CLASS.append(type("ImageBatches", (_Batches, keras.utils.PyDataset), {}))
    return _BATCHES_CLASS[0](root, items, size, resize, batch_size, shuffle=shuffle, seed=seed, workers=workers)


# ---- heads -------------------------------------------------------------------------------------------------------


def logreg_dense_weights(pipeline: Any, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Kernel ``(D, K)`` and bias ``(K,)`` of one softmax layer equal to a fitted StandardScaler + LogisticRegression.

    The scaler is folded in exactly: ``W' = W / scale`` and ``b' = b - sum(W' * mean)``. Columns follow
    ``class_names`` (the pipeline was fitted on class names). A binary model (one logit ``z`` for its second
    class) becomes logits ``(0, z)``: their softmax is ``(1 - sigmoid(z), sigmoid(z))``, its probabilities.

    Raises
    ------
    FitError
        When the pipeline is not a (StandardScaler +) LogisticRegression, or its classes are not ``class_names``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps = list(pipeline.named_steps.values()) if isinstance(pipeline, Pipeline) else [pipeline]
    clf = steps[-1]
    scalers = steps[:-1]
    if not isinstance(clf, LogisticRegression) or any(not isinstance(s, StandardScaler) for s in scalers) \
            or len(scalers) > 1:
        raise FitError("fine-tuning starts from a dense head or a logistic-regression head; this head is "
                       f"{' + '.join(type(s).__name__ for s in steps)}")
    coef = np.asarray(clf.coef_, np.float64)
    bias = np.asarray(clf.intercept_, np.float64)
    classes = [str(c) for c in clf.classes_]
    if coef.shape[0] == 1 and len(classes) == 2:
        coef = np.vstack([np.zeros_like(coef), coef])
        bias = np.concatenate([[0.0], bias])
    if sorted(classes) != sorted(str(c) for c in class_names):
        raise FitError(f"the head was fitted on classes {', '.join(classes)}, not {', '.join(class_names)}")
    if scalers:
        sc = scalers[0]
        scale = np.asarray(sc.scale_, np.float64) if sc.scale_ is not None else np.ones(coef.shape[1])
        mean = np.asarray(sc.mean_, np.float64) if sc.mean_ is not None else np.zeros(coef.shape[1])
        coef = coef / scale
        bias = bias - coef @ mean
    order = [classes.index(str(c)) for c in class_names]
    return coef[order].T.astype(np.float32), bias[order].astype(np.float32)


def _base_of(built: Any) -> Any:
    import keras

    bases = [layer for layer in built.model.layers if isinstance(layer, keras.Model)]
    if len(bases) != 1:
        raise FitError(f"internal: expected one backbone inside the feature model of {built.label}")
    return bases[0]


def default_unfreeze(backbone: str, base: Any) -> int:
    """Number of top layers of ``base`` that :data:`UNFREEZE_FROM` unfreezes for ``backbone``."""
    names = [layer.name for layer in base.layers]
    first = UNFREEZE_FROM.get(backbone) or ""
    after = first.startswith(">")
    if first.lstrip(">") not in names:
        raise FitError(f"no default --unfreeze for {backbone}; pass --unfreeze N (top layers of its "
                       f"{len(names)})")
    return len(names) - names.index(first.lstrip(">")) - int(after)


def build_finetune_model(built: Any, head: Any, class_names: Sequence[str], unfreeze: int | None = None) -> Any:
    """The model to fine-tune: pixels -> preprocessing -> backbone -> average pooling -> head -> probabilities.

    Parameters
    ----------
    built : BuiltBackbone
        From :func:`pipeline.backbones.build_features` (weights loaded).
    head : keras.Model or sklearn Pipeline
        A dense head (raw pooled features in, softmax over ``class_names`` out) or a fitted
        (StandardScaler +) LogisticRegression (see :func:`logreg_dense_weights`).
    class_names : sequence of str
    unfreeze : int, optional
        Top layers of the backbone to train; default :func:`default_unfreeze`.

    Returns
    -------
    keras.Model
        With attributes set on its layers: the top ``unfreeze`` backbone layers and the head trainable, every
        other layer and every BatchNormalization layer frozen (inference mode).
    """
    import keras

    from pipeline.backbones import preprocess_layers

    base = _base_of(built)
    n_layers = len(base.layers)
    n = default_unfreeze(built.spec.name, base) if unfreeze is None else int(unfreeze)
    if not 0 <= n <= n_layers:
        raise FitError(f"--unfreeze must be between 0 and {n_layers} (the layers of {built.label}), got {n}")
    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= n_layers - n and not isinstance(layer, keras.layers.BatchNormalization)

    pixels = keras.Input((built.input_size, built.input_size, 3), name="pixels")
    x = pixels
    for layer in preprocess_layers(built.spec):
        x = layer(x)
    x = base(x)
    feats = keras.layers.GlobalAveragePooling2D(name="avg")(x)
    if isinstance(head, keras.Model):
        if int(head.output.shape[-1]) != len(class_names):
            raise FitError(f"the head has {int(head.output.shape[-1])} outputs for {len(class_names)} classes")
        head.trainable = True
        probs = head(feats)
    else:
        kernel, bias = logreg_dense_weights(head, class_names)
        if kernel.shape[0] != int(feats.shape[-1]):
            raise FitError(f"the head takes {kernel.shape[0]} features; {built.label} gives {int(feats.shape[-1])}")
        dense = keras.layers.Dense(len(class_names), activation="softmax", name="softmax")
        probs = dense(feats)
        dense.set_weights([kernel, bias])
    return keras.Model(pixels, probs, name=f"{built.label}_finetuned".replace(".", "_"))


# ---- training ----------------------------------------------------------------------------------------------------


def _score(model: Any, batches: Any) -> tuple[float, float, np.ndarray]:
    """Accuracy, mean log loss and probabilities of ``model`` on ``batches`` (inference mode)."""
    probs, labels = [], []
    for i in range(len(batches)):
        x, y = batches[i]
        probs.append(np.asarray(model(x, training=False), np.float64))
        labels.append(y)
    p = np.concatenate(probs) if probs else np.zeros((0, 0))
    y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if not len(y):
        return float("nan"), float("nan"), p
    acc = float(np.mean(np.argmax(p, axis=1) == y))
    loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1.0))))
    return acc, loss, p


def finetune(built: Any, head: Any, data: FinetuneData, config: FinetuneConfig | None = None,
             log: Callable[[str], None] = print) -> FinetuneResult:
    """Fine-tune the top of a backbone together with a fitted head, on image files (see the module docstring).

    Parameters
    ----------
    built : BuiltBackbone
        The frozen feature model the head was fitted on (:func:`pipeline.backbones.build_features` of the
        cache's backbone, input size, width multiplier and weights). Its backbone's layers are modified in place
        (trainable flags and weights): build a new one for anything else.
    head : keras.Model or sklearn Pipeline
        The dense head or the logistic-regression pipeline to start from
        (:func:`pipeline.saved_head.load_saved_head`).
    data : FinetuneData
    config : FinetuneConfig, optional
    log : callable
        Receives one line per epoch, and the settings first.

    Returns
    -------
    FinetuneResult

    Raises
    ------
    FitError
        An unusable setting or head, or no training or selection images.
    DatasetError
        An image that no longer decodes.
    """
    import keras

    cfg = config or FinetuneConfig()
    cfg.check()
    if not data.train or not data.select:
        raise FitError("fine-tuning needs training images and selection images (a val split, or part of train)")
    keras.utils.set_random_seed(int(cfg.seed))
    model = build_finetune_model(built, head, data.class_names, cfg.unfreeze)
    base = _base_of(built)
    unfrozen = sum(1 for layer in base.layers if layer.trainable_weights)
    n_unfreeze = default_unfreeze(built.spec.name, base) if cfg.unfreeze is None else int(cfg.unfreeze)
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))

    inputs = keras.Input(model.input.shape[1:], name="pixels")
    x = inputs
    if cfg.flip:
        x = keras.layers.RandomFlip("horizontal", seed=cfg.seed, name="random_flip")(x)
    if cfg.rotation:
        x = keras.layers.RandomRotation(cfg.rotation / 360.0, fill_mode="reflect", seed=cfg.seed + 1,
                                        name="random_rotation")(x)
    if cfg.zoom:
        x = keras.layers.RandomZoom((-cfg.zoom, 0.0), fill_mode="reflect", seed=cfg.seed + 2, name="random_zoom")(x)
    trainer = keras.Model(inputs, model(x), name="finetune_trainer")
    trainer.compile(optimizer=keras.optimizers.Adam(learning_rate=float(cfg.learning_rate)),
                    loss="sparse_categorical_crossentropy", metrics=["accuracy"], run_eagerly=bool(cfg.run_eagerly))

    workers = cfg.workers or decode_threads()
    size = built.input_size
    train = image_batches(data.root, data.train, size, data.resize, cfg.batch_size, shuffle=True, seed=cfg.seed,
                          workers=workers)
    select = image_batches(data.root, data.select, size, data.resize, cfg.batch_size, workers=workers)
    log(f"fine-tuning {built.label}: top {n_unfreeze} of {len(base.layers)} backbone layers ({unfrozen} with "
        f"weights to train; batch norms frozen) + head, {trainable:,} weights; Adam {cfg.learning_rate:g}, "
        f"{len(data.train)} training / {len(data.select)} selection images, up to {cfg.epochs} epochs")

    t0 = time.perf_counter()
    acc, loss, proba = _score(model, select)
    history: dict[str, list[Any]] = {"select_accuracy": [acc], "select_loss": [loss], "loss": [None],
                                     "accuracy": [None]}
    log(f"epoch 0 (start): selection accuracy {acc:.4f}, log loss {loss:.4f}")
    state = {"best": (acc, -loss), "epoch": 0, "weights": model.get_weights() if cfg.keep_best else None,
             "proba": proba, "wait": 0}

    class KeepBest(keras.callbacks.Callback):
        """Score the selection split after each epoch; keep the best weights; stop after ``patience`` misses."""

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            a, lo, p = _score(model, select)
            history["select_accuracy"].append(a)
            history["select_loss"].append(lo)
            history["loss"].append(float((logs or {}).get("loss", float("nan"))))
            history["accuracy"].append(float((logs or {}).get("accuracy", float("nan"))))
            improved = (a, -lo) > state["best"]
            if improved:
                state.update(best=(a, -lo), wait=0)
            else:
                state["wait"] += 1
            if improved or not cfg.keep_best:
                state.update(epoch=epoch + 1, proba=p)
                if cfg.keep_best:
                    state["weights"] = model.get_weights()
            if cfg.keep_best and state["wait"] >= cfg.patience:
                self.model.stop_training = True
            log(f"epoch {epoch + 1}: selection accuracy {a:.4f}, log loss {lo:.4f}{'  (best)' if improved else ''}")

    verbose = (1 if sys.stderr.isatty() else 2) if cfg.progress else 0
    trainer.fit(train, epochs=int(cfg.epochs), callbacks=[KeepBest()], verbose=verbose)
    if cfg.keep_best:
        model.set_weights(state["weights"])
    seconds = time.perf_counter() - t0
    return FinetuneResult(model=model, class_names=list(data.class_names), history=history,
                          best_epoch=int(state["epoch"]), epochs_run=len(history["select_accuracy"]) - 1,
                          unfreeze=n_unfreeze, trainable_weights=trainable, seconds=seconds,
                          select_proba=state["proba"])


def save_finetuned(result: FinetuneResult, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the fine-tuned model as a plain ``.keras`` file and its metrics as ``<path>.json`` beside it.

    Parameters
    ----------
    result : FinetuneResult
    path : path
        Ends in ``.keras``.
    extra : dict, optional
        More JSON-ready entries for the sidecar (provenance: the head it started from, the cache, the splits).
    """
    import json

    p = Path(path)
    if p.suffix != ".keras":
        raise FitError(f"the fine-tuned model file must end in .keras, got {p.name}")
    p.parent.mkdir(parents=True, exist_ok=True)
    result.model.save(p)
    doc = result.to_json() | dict(extra or {})
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
    tmp.replace(p.with_suffix(".json"))
    return p
