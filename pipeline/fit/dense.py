"""The dense head: a small Keras network behind scikit-learn's estimator contract.

``Normalization -> [Flatten] -> Dense(hidden, relu) -> Dropout -> Dense(softmax)``, Adam, early stopping on the loss
of a held-out, stratified, seeded part of the training rows, best weights restored; on sets too small for a
trustworthy held-out part (:data:`HOLDOUT_MIN_ROWS`), the number of epochs is cross-validated instead. See :mod:`pipeline.fit.heads`
for why maps are standardised per channel and flattened, and why wide inputs get a smaller learning rate.

Training runs its own loop rather than ``model.fit``: one compiled TensorFlow function trains on a whole block of
rows (every mini-batch of an epoch, in the graph), and one computes the held-out loss, so an epoch costs one call
instead of Keras's per-epoch set-up, callbacks and data-adapter work (which dominated on small data: ~0.1-0.2 s per
epoch, 100 epochs per fit). Refitting the same instance (the folds of a search, then the final fit) reuses the
network and its compiled functions: weights, optimizer state and dropout seeds go back to their seeded initial
values, and the standardisation statistics are variables the compiled functions read, so a refit gives exactly
what a fresh instance would, without building and tracing again. The same loop learns from rows in memory
(:meth:`DenseHead.fit`) or streamed in blocks from a cache (:meth:`DenseHead.fit_source`).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.errors import FitError
from pipeline.fit.stream import ArraySource, RowSource, class_moments

__all__ = ["DenseHead", "DENSE_DEFAULTS", "HOLDOUT_MAX_ROWS", "HOLDOUT_MIN_ROWS", "EPOCH_FOLDS"]

DENSE_DEFAULTS = {"hidden": 256, "dropout": 0.5, "epochs": 100, "learning_rate": 1e-3, "batch_size": 64,
                  "patience": 5, "validation_fraction": 0.1}
"""The dense head's settings, written once: :class:`DenseHead`'s defaults, the registry's ``fixed`` record and
summary, and the memory plan's weight count all read them."""

HOLDOUT_MAX_ROWS = 10_000
"""Most training rows held out for early stopping: 10 % of 100,000 rows already measures the held-out loss to
about 1 %, and the held-out rows are kept in memory."""

HOLDOUT_MIN_ROWS = 50
"""Fewest held-out rows early stopping trusts. On fewer, one row moves the held-out accuracy by more than two points
and the held-out loss of an epoch is mostly the luck of which rows were drawn, so the epoch it picks is noise
(6 rows of a 60-row set kept epoch 1). Below this floor the number of epochs is chosen by cross-validation instead,
and the network then trains on every row."""

EPOCH_FOLDS = 3
"""Folds used to choose the number of epochs below :data:`HOLDOUT_MIN_ROWS`: each fold holds out a third of the
rows (20 of 60), and three early-stopping runs cost three small fits, cheap at this size."""

PREDICT_ROWS = 4096


class _Engine:
    """A built network with its optimizer, seeded initial state and compiled functions (reused across refits)."""

    def __init__(self, key: tuple, head: "DenseHead", input_shape: tuple[int, ...], n_classes: int) -> None:
        import keras

        self.key = key
        self.input_shape = input_shape
        self.n_classes = n_classes
        seed = int(head.random_state)  # every random draw from this seed, through the layers' own generators:
        channels = input_shape[-1]     # the process's global generators are left as they were
        self.mean = keras.Variable(np.zeros(channels, np.float32), trainable=False, name="feature_mean")
        self.std = keras.Variable(np.ones(channels, np.float32), trainable=False, name="feature_std")
        inputs = keras.Input(shape=input_shape, name="standardised")
        x = inputs
        if len(input_shape) > 1:
            x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(int(head.hidden), activation="relu", name="hidden",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(x)
        self.dropout = keras.layers.Dropout(float(head.dropout), seed=seed + 2, name="dropout")
        x = self.dropout(x)
        outputs = keras.layers.Dense(n_classes, activation="softmax", name="softmax",
                                     kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1))(x)
        self.core = keras.Model(inputs, outputs, name="dense_core")
        self.optimizer = keras.optimizers.Adam(learning_rate=float(head.learning_rate))
        self.optimizer.build(self.core.trainable_variables)
        self.initial_weights = _weights(self.core)
        # the optimizer's variables include its learning rate and step counter as well as Adam's moments
        self.initial_optimizer = [np.array(v.numpy()) for v in self.optimizer.variables]
        self.seed_state = [np.array(v.numpy()) for v in self._seed_variables()]
        self.batch_size = int(head.batch_size)
        self.eager = bool(head.run_eagerly)
        self._train = self._predict = None

    def _seed_variables(self) -> list:
        gen = getattr(self.dropout, "seed_generator", None)
        state = getattr(gen, "state", None)
        return [state] if state is not None else []

    def reset(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Back to the seeded initial weights, a fresh optimizer and dropout stream; set the standardisation."""
        self.core.set_weights(self.initial_weights)
        for v, value in zip(self.optimizer.variables, self.initial_optimizer):
            v.assign(value)
        for v, s in zip(self._seed_variables(), self.seed_state):
            v.assign(s)
        self.mean.assign(mean.astype(np.float32))
        self.std.assign(std.astype(np.float32))

    def _standardise(self, x):
        import keras

        return (x - self.mean) / keras.ops.maximum(self.std, keras.backend.epsilon())

    def _train_block(self, x, y, order, class_w):
        """Every mini-batch of ``order`` over the block ``(x, y)``: (sum of weighted losses, correct, rows)."""
        import tensorflow as tf

        b = self.batch_size
        n = tf.shape(order)[0]
        steps = (n + b - 1) // b
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0.0)
        for i in tf.range(steps):
            idx = order[i * b:(i + 1) * b]
            xb = self._standardise(tf.gather(x, idx))
            yb = tf.gather(y, idx)
            wb = tf.gather(class_w, yb)
            with tf.GradientTape() as tape:
                p = self.core(xb, training=True)
                per_row = _sparse_ce(yb, p)
                loss = tf.reduce_sum(wb * per_row) / tf.cast(tf.shape(yb)[0], tf.float32)
            grads = tape.gradient(loss, self.core.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.core.trainable_variables))
            rows = tf.cast(tf.shape(yb)[0], tf.float32)
            loss_sum += loss * rows
            correct += tf.reduce_sum(tf.cast(tf.equal(tf.argmax(p, axis=1, output_type=tf.int32), yb), tf.float32))
        return loss_sum, correct

    def _predict_block(self, x):
        return self.core(self._standardise(x), training=False)

    def train(self, x: np.ndarray, y: np.ndarray, order: np.ndarray, class_w: np.ndarray) -> tuple[float, float]:
        """Train on one block in the given row order; returns (sum of batch losses x rows, correct)."""
        import tensorflow as tf

        if self._train is None:
            if self.eager:
                self._train = self._train_block
            else:
                spec = tf.TensorSpec((None, *self.input_shape), tf.float32)
                self._train = tf.function(self._train_block, input_signature=[
                    spec, tf.TensorSpec((None,), tf.int32), tf.TensorSpec((None,), tf.int32),
                    tf.TensorSpec((self.n_classes,), tf.float32)], reduce_retracing=True)
        loss, correct = self._train(tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.int32),
                                    tf.convert_to_tensor(order, tf.int32), tf.convert_to_tensor(class_w, tf.float32))
        return float(loss), float(correct)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Softmax outputs of raw rows ``x``."""
        import tensorflow as tf

        if self._predict is None:
            if self.eager:
                self._predict = self._predict_block
            else:
                self._predict = tf.function(self._predict_block, input_signature=[
                    tf.TensorSpec((None, *self.input_shape), tf.float32)], reduce_retracing=True)
        out = [np.asarray(self._predict(tf.convert_to_tensor(x[i:i + PREDICT_ROWS], tf.float32)))
               for i in range(0, len(x), PREDICT_ROWS)]
        return np.concatenate(out) if out else np.zeros((0, self.n_classes), np.float32)

    def export(self, mean: np.ndarray, var: np.ndarray):
        """A plain Keras model, raw features in: a Normalization layer holding the statistics, then the network."""
        import keras

        inputs = keras.Input(shape=self.input_shape, name="features")
        norm = keras.layers.Normalization(axis=-1, name="standardise")  # last axis: features, or map channels
        norm.build((None, *self.input_shape))
        norm.adapt_mean.assign(mean.astype(np.float32))
        norm.adapt_variance.assign(var.astype(np.float32))
        norm.finalize_state()
        x = norm(inputs)
        if len(self.input_shape) > 1:
            x = keras.layers.Flatten(name="flatten")(x)
        layers = {layer.name: layer for layer in self.core.layers}
        # the trained weights are set below: zeros to start with, so that no initializer draws a seed from
        # Python's global generator
        hidden = keras.layers.Dense(layers["hidden"].units, activation="relu", name="hidden",
                                    kernel_initializer="zeros")
        x = hidden(x)
        x = keras.layers.Dropout(self.dropout.rate, seed=0, name="dropout")(x)  # inactive at inference; seeded
        # for the same reason
        soft = keras.layers.Dense(self.n_classes, activation="softmax", name="softmax", kernel_initializer="zeros")
        outputs = soft(x)
        model = keras.Model(inputs, outputs, name="dense_head")
        hidden.set_weights(_weights(layers["hidden"]))
        soft.set_weights(_weights(layers["softmax"]))
        return model


def _sparse_ce(y, p):
    """Per-row cross-entropy of the true class, probabilities clipped as Keras clips them."""
    import keras
    import tensorflow as tf

    eps = keras.backend.epsilon()
    p_true = tf.gather(p, y, axis=1, batch_dims=1)
    return -tf.math.log(tf.clip_by_value(p_true, eps, 1.0 - eps))


class DenseHead(ClassifierMixin, BaseEstimator):
    """Small Keras classifier: Normalization -> [Flatten] -> Dense(relu) -> Dropout -> Dense(softmax).

    The standardisation (per feature; per channel for ``(h, w, c)`` maps, which are then flattened) is computed on
    the rows the network trains on, and the fitted Keras model (``model_``) carries it as a Normalization layer, so
    it is self-contained on raw features. Training is seeded through generators of its own (the layers' seeded
    initializers and dropout, and a NumPy generator for the order of rows; the process's global generators are
    never reseeded): two fits with the same ``random_state`` on the same data give identical probabilities (on
    CPU), whether the instance is new or was fitted before.

    Parameters
    ----------
    hidden : int, default=256
        Units of the hidden layer.
    dropout : float, default=0.5
        Dropout rate after the hidden layer.
    epochs : int, default=100
        Maximum number of epochs (early stopping usually ends training well before).
    learning_rate : float, default=1e-3
        Adam learning rate.
    batch_size : int, default=64
    patience : int, default=5
        Epochs without improvement of the held-out loss before stopping; the best epoch's weights are restored.
    validation_fraction : float, default=0.1
        Part of the training rows held out (stratified, seeded; at most ``validation_max_rows``) for early
        stopping. ``0`` trains for ``epochs`` epochs without early stopping; so does a training set too small to
        hold out one row per class. When the held-out part would be smaller than ``validation_min_rows``, the
        number of epochs is the median best epoch of early stopping on each of :data:`EPOCH_FOLDS` stratified
        folds instead (whole images with ``groups``), and the network then trains on every row for that many
        epochs; ``early_stopping_`` says which rule was used.
    class_weight : {None, "balanced"} or dict, default=None
        ``"balanced"`` weights each class's loss by ``n_rows / (n_classes * n_rows_of_class)``; a dict maps class
        labels to weights (missing classes weigh 1).
    random_state : int, default=0
        Seed of weight initialisation, shuffling, dropout and the held-out split.
    run_eagerly : bool, default=False
        Train without compiling TensorFlow functions. Same model, slower per step but without the ~0.5 s of
        tracing of a new instance: only worth it for tiny data (the estimator-contract tests use it).
    verbose : int, default=0
        Print one line per epoch when positive.
    validation_max_rows : int, default=10_000
        Most rows held out for early stopping (they are kept in memory).
    validation_min_rows : int, default=50
        Fewest rows a held-out part may have for early stopping on it (:data:`HOLDOUT_MIN_ROWS`); below it the
        number of epochs is cross-validated.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels, in the order of ``predict_proba`` columns and of the Keras model's outputs.
    n_features_in_ : int
        Size of the second input dimension (features, or map height for spatial maps).
    input_shape_ : tuple of int
        Shape of one input row.
    model_ : keras.Model
        The trained network (raw features in, softmax over ``classes_`` out).
    history_ : dict of str to list of float
        Per-epoch ``loss``, ``accuracy`` and, with early stopping, ``val_loss`` and ``val_accuracy``.
    n_epochs_ : int
        Epochs run.
    best_epoch_ : int
        1-based epoch whose weights were kept.
    early_stopping_ : dict
        How the number of epochs was chosen: ``rule`` (``"holdout"``: early stopping on ``rows`` held-out rows;
        ``"cv"``: the median of ``fold_best_epochs``, early stopping on each of ``folds`` folds of at least
        ``rows`` rows, then every row trained on; ``"none"``: no rows could be held out, ``epochs`` epochs run).
    """

    def __init__(self, *, hidden: int = DENSE_DEFAULTS["hidden"], dropout: float = DENSE_DEFAULTS["dropout"],
                 epochs: int = DENSE_DEFAULTS["epochs"], learning_rate: float = DENSE_DEFAULTS["learning_rate"],
                 batch_size: int = DENSE_DEFAULTS["batch_size"], patience: int = DENSE_DEFAULTS["patience"],
                 validation_fraction: float = DENSE_DEFAULTS["validation_fraction"],
                 class_weight: str | dict | None = None, random_state: int = 0, run_eagerly: bool = False,
                 verbose: int = 0, validation_max_rows: int = HOLDOUT_MAX_ROWS,
                 validation_min_rows: int = HOLDOUT_MIN_ROWS) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.class_weight = class_weight
        self.random_state = random_state
        self.run_eagerly = run_eagerly
        self.verbose = verbose
        self.validation_max_rows = validation_max_rows
        self.validation_min_rows = validation_min_rows

    def __sklearn_tags__(self):  # noqa: D105
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags

    # -- helpers --

    def _holdout(self, y: np.ndarray, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Indices of training rows and early-stopping rows (empty when none can be held out).

        With ``groups`` (the image of each row, when rows include augmented views of their images), whole images
        are held out: an image's views are never on the other side of its centre view.
        """
        n = len(y)
        all_rows = np.arange(n)
        if not self.validation_fraction or self.validation_fraction <= 0:
            return all_rows, all_rows[:0]
        if groups is not None:
            groups = np.asarray(groups)
            first, inverse = np.unique(groups, return_index=True)[1], np.unique(groups, return_inverse=True)[1]
            g_fit, g_val = self._holdout(np.asarray(y)[first])
            if not len(g_val):
                return all_rows, all_rows[:0]
            val = np.isin(inverse, g_val)
            return all_rows[~val], all_rows[val]
        n_classes = int(y.max()) + 1
        counts = np.bincount(y, minlength=n_classes)
        n_val = min(int(math.ceil(self.validation_fraction * n)), int(self.validation_max_rows))
        if counts.min() < 2 or n_val < n_classes or n - n_val < n_classes:
            return all_rows, all_rows[:0]
        from sklearn.model_selection import train_test_split

        fit_idx, val_idx = train_test_split(all_rows, test_size=n_val, stratify=y, random_state=self.random_state)
        return np.sort(fit_idx), np.sort(val_idx)

    def _class_weights(self, y_fit: np.ndarray, n_classes: int) -> np.ndarray:
        w = np.ones(n_classes, np.float32)
        if isinstance(self.class_weight, str) and self.class_weight == "balanced":
            present = np.unique(y_fit)
            w[present] = compute_class_weight("balanced", classes=present, y=y_fit).astype(np.float32)
        elif isinstance(self.class_weight, dict):
            w = np.array([float(self.class_weight.get(c, 1.0)) for c in self.classes_], np.float32)
        elif self.class_weight is not None:
            raise ValueError(f"class_weight must be None, 'balanced' or a dict, got {self.class_weight!r}")
        return w

    def _engine_for(self, input_shape: tuple[int, ...], n_classes: int) -> _Engine:
        import keras

        if keras.backend.backend() != "tensorflow":
            raise FitError(f"the dense head trains with TensorFlow; KERAS_BACKEND is {keras.backend.backend()!r}: "
                           f"set KERAS_BACKEND=tensorflow")
        key = (input_shape, n_classes, int(self.hidden), float(self.dropout), float(self.learning_rate),
               int(self.batch_size), int(self.random_state), bool(self.run_eagerly))
        engine = getattr(self, "_engine", None)
        if engine is None or engine.key != key:
            engine = _Engine(key, self, input_shape, n_classes)
            self._engine = engine
        return engine

    # -- estimator API --

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> "DenseHead":
        """Train the network on ``X`` (rows x features, or rows x h x w x c maps) and labels ``y``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, h, w, c)
        y : array-like of shape (n_samples,)
        groups : array-like of shape (n_samples,), optional
            The image of each row, when rows include augmented views: early stopping holds out whole images.

        Returns
        -------
        self : DenseHead
        """
        X, y = validate_data(self, X, y, allow_nd=True, dtype=np.float32)
        check_classification_targets(y)
        encoder = LabelEncoder().fit(y)
        if len(encoder.classes_) < 2:
            raise ValueError(f"DenseHead needs at least 2 classes to train; got 1 class: {encoder.classes_[0]!r}")
        return self._fit(ArraySource(X, encoder.transform(y), encoder.classes_), encoder.classes_, in_memory=True,
                         groups=groups)

    def fit_source(self, source: RowSource) -> "DenseHead":
        """Train on the rows of a :class:`~pipeline.fit.stream.RowSource`, streamed in blocks.

        The rows held out for early stopping are read into memory (at most :data:`HOLDOUT_MAX_ROWS`); the others
        are read block by block every epoch, so memory stays bounded whatever the number of rows.

        Returns
        -------
        self : DenseHead
        """
        if len(source.classes) < 2:
            raise ValueError("DenseHead needs at least 2 classes to train")
        self.n_features_in_ = int(source.shape[0])
        return self._fit(source, np.asarray(source.classes), in_memory=False, groups=source.groups)

    def _fit(self, source: RowSource, classes: np.ndarray, in_memory: bool,
             groups: np.ndarray | None = None) -> "DenseHead":
        self.classes_ = classes
        n_classes = len(classes)
        self.input_shape_ = tuple(int(s) for s in source.shape)
        y_all = np.asarray(source.labels, dtype=np.int64)
        engine = self._engine_for(self.input_shape_, n_classes)
        all_rows = np.arange(len(y_all))
        fit_idx, val_idx = self._holdout(y_all, groups)
        stopping: dict[str, Any] = {"rule": "holdout", "rows": int(len(val_idx)), "folds": 0}
        epochs = int(self.epochs)
        if self.validation_fraction and self.validation_fraction > 0 and len(val_idx) < int(self.validation_min_rows):
            folds = self._epoch_folds(y_all, groups)
            if folds:  # too few rows for one held-out part: choose the number of epochs by cross-validation
                best = [self._train(engine, source, f, v, n_classes, in_memory, epochs)[1] for f, v in folds]
                epochs = max(1, int(round(float(np.median(best)))))
                stopping = {"rule": "cv", "rows": int(min(len(v) for _, v in folds)), "folds": len(folds),
                            "fold_best_epochs": [int(b) for b in best]}
            fit_idx, val_idx = all_rows, all_rows[:0]
        if not len(val_idx) and stopping["rule"] == "holdout":
            stopping = {"rule": "none", "rows": 0, "folds": 0}
        history, best_epoch, (mean, var) = self._train(engine, source, fit_idx, val_idx, n_classes, in_memory, epochs)
        self.history_ = history
        self.n_epochs_ = len(history["loss"])
        self.best_epoch_ = best_epoch
        self.early_stopping_ = stopping
        self.model_ = engine.export(mean, var)
        return self

    def _epoch_folds(self, y: np.ndarray, groups: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Stratified, seeded folds (whole images with ``groups``) for choosing the number of epochs; ``[]`` when
        a class has too few rows (images) for two folds."""
        from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

        if groups is not None:
            groups = np.asarray(groups)
            first = np.unique(groups, return_index=True)[1]
            smallest = int(np.bincount(y[first]).min())
        else:
            smallest = int(np.bincount(y).min())
        k = min(EPOCH_FOLDS, smallest)
        if k < 2:
            return []
        if groups is not None:
            split = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=int(self.random_state))
            return list(split.split(np.zeros(len(y)), y, groups))
        split = StratifiedKFold(n_splits=k, shuffle=True, random_state=int(self.random_state))
        return list(split.split(np.zeros(len(y)), y))

    def _train(self, engine: _Engine, source: RowSource, fit_idx: np.ndarray, val_idx: np.ndarray, n_classes: int,
               in_memory: bool, epochs: int) -> tuple[dict[str, list[float]], int, tuple[np.ndarray, np.ndarray]]:
        """Train from the seeded initial state on ``fit_idx``, early stopping on ``val_idx`` when there are any.

        Returns the per-epoch history, the 1-based epoch whose weights the engine now holds, and the standardisation
        (mean, variance) of ``fit_idx``.
        """
        y_all = np.asarray(source.labels, dtype=np.int64)
        y_fit = y_all[fit_idx]
        moments = class_moments(source.chunks(fit_idx), n_classes, per_channel=True)
        mean, var = moments.pooled()
        engine.reset(mean, np.sqrt(var))
        class_w = self._class_weights(y_fit, n_classes)
        x_val = source.take(val_idx) if len(val_idx) else None
        y_val = y_all[val_idx]
        rng = np.random.default_rng(int(self.random_state))
        block = None
        if in_memory:  # the training rows as one block, converted once
            import tensorflow as tf

            block = (tf.convert_to_tensor(source.take(fit_idx), tf.float32),
                     tf.convert_to_tensor(y_fit.astype(np.int32)))
        history: dict[str, list[float]] = {"loss": [], "accuracy": []}
        if x_val is not None:
            history.update(val_loss=[], val_accuracy=[])
        best_loss, best_epoch, best_weights, waited = np.inf, 0, None, 0
        for epoch in range(int(epochs)):
            loss_sum = correct = 0.0
            if block is not None:
                order = rng.permutation(len(fit_idx)).astype(np.int32)
                loss_sum, correct = engine.train(block[0], block[1], order, class_w)
            else:
                for xc, yc in source.chunks(fit_idx, seed=int(rng.integers(2 ** 31))):
                    ls, cr = engine.train(xc, yc.astype(np.int32), np.arange(len(yc), dtype=np.int32), class_w)
                    loss_sum += ls
                    correct += cr
            history["loss"].append(loss_sum / len(fit_idx))
            history["accuracy"].append(correct / len(fit_idx))
            if x_val is not None:
                p = engine.predict(x_val).astype(np.float64)
                p_true = np.clip(p[np.arange(len(y_val)), y_val], 1e-7, 1.0)
                val_loss = float(-np.mean(np.log(p_true)))
                history["val_loss"].append(val_loss)
                history["val_accuracy"].append(float(np.mean(np.argmax(p, axis=1) == y_val)))
                if val_loss < best_loss:
                    best_loss, best_epoch, waited = val_loss, epoch + 1, 0
                    best_weights = _weights(engine.core)
                else:
                    waited += 1
            if self.verbose:
                print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in history.items()))
            if x_val is not None and waited >= int(self.patience):
                break
        if best_weights is not None:
            engine.core.set_weights(best_weights)
        history = {k: [float(v) for v in vals] for k, vals in history.items()}
        return history, (best_epoch if best_weights is not None else len(history["loss"])), (mean, var)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``.

        The network's inference pass is computed in float64 with NumPy from ``model_``'s weights, so a row's
        probabilities do not depend on the other rows it is predicted with (float32 matrix products differ by a unit
        in the last place with a row's position in the batch); ``model_.predict`` gives them to about 1e-6.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, h, w, c)

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, allow_nd=True, dtype=np.float32)
        if tuple(X.shape[1:]) != self.input_shape_:
            raise ValueError(f"X rows have shape {tuple(X.shape[1:])}, the head was fitted on {self.input_shape_}")
        params = self._numpy_params()
        out = [_forward(X[i:i + PREDICT_ROWS], *params) for i in range(0, len(X), PREDICT_ROWS)]
        return np.concatenate(out, axis=0) if out else np.zeros((0, len(self.classes_)), np.float64)

    def _numpy_params(self) -> tuple[np.ndarray, ...]:
        """Standardisation and layer weights of ``model_`` in float64."""
        import keras

        norm = self.model_.get_layer("standardise")
        mean = np.asarray(norm.adapt_mean.numpy(), dtype=np.float64)
        std = np.maximum(np.sqrt(np.asarray(norm.adapt_variance.numpy(), dtype=np.float64)), keras.backend.epsilon())
        w1, b1 = (w.astype(np.float64) for w in _weights(self.model_.get_layer("hidden")))
        w2, b2 = (w.astype(np.float64) for w in _weights(self.model_.get_layer("softmax")))
        return mean, std, w1, b1, w2, b2

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Most probable class of each row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, h, w, c)

        Returns
        -------
        y : ndarray of shape (n_samples,)
        """
        check_is_fitted(self, "model_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def save(self, path: str | Path) -> Path:
        """Write the fitted network as a plain ``.keras`` file (raw features in, softmax over ``classes_`` out)."""
        check_is_fitted(self, "model_")
        path = Path(path)
        self.model_.save(path)
        return path

    # -- pickling: Keras models travel as .keras bytes; the compiled engine stays behind --

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_engine", None)
        model = state.pop("model_", None)
        if model is not None:
            with tempfile.TemporaryDirectory() as tmp:
                p = Path(tmp) / "model.keras"
                model.save(p)
                state["_model_bytes"] = p.read_bytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        blob = state.pop("_model_bytes", None)
        self.__dict__.update(state)
        if blob is not None:
            import keras

            with tempfile.TemporaryDirectory() as tmp:
                p = Path(tmp) / "model.keras"
                p.write_bytes(blob)
                self.model_ = keras.models.load_model(p)


def _weights(layer: Any) -> list[np.ndarray]:
    """A layer's or model's weights as NumPy copies (``get_weights`` without its NumPy-2 copy warning)."""
    return [np.array(v.numpy()) for v in layer.weights]


def _forward(X: np.ndarray, mean: np.ndarray, std: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray,
             b2: np.ndarray) -> np.ndarray:
    """The network's inference pass in float64: standardise, flatten, ReLU layer, softmax (dropout is off)."""
    x = (np.asarray(X, dtype=np.float64) - mean) / std
    h = np.maximum(x.reshape(len(x), -1) @ w1 + b1, 0.0)
    z = h @ w2 + b2
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)
