"""The dense head: a small Keras network behind scikit-learn's estimator contract.

``Normalization -> [Flatten] -> Dense(hidden, relu) -> Dropout -> Dense(softmax)``, Adam, early stopping on the loss
of a held-out, stratified, seeded part of the training rows, best weights restored. See :mod:`pipeline.fit.heads`
for why maps are standardised per channel and flattened, and why wide inputs get a smaller learning rate.
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

__all__ = ["DenseHead"]


class DenseHead(ClassifierMixin, BaseEstimator):
    """Small Keras classifier: Normalization -> [Flatten] -> Dense(relu) -> Dropout -> Dense(softmax).

    The Normalization layer (per feature; per channel for ``(h, w, c)`` maps, which are then flattened) is adapted
    on the rows the network trains on, so the fitted Keras model (``model_``) is self-contained on raw features.
    Training is seeded with :func:`keras.utils.set_random_seed`, which also seeds Python's, NumPy's and
    TensorFlow's global generators: two fits with the same ``random_state`` on the same data give identical
    probabilities (on CPU).

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
        Part of the training rows held out (stratified, seeded) for early stopping. ``0`` trains for ``epochs``
        epochs without early stopping; so does a training set too small to hold out one row per class.
    class_weight : {None, "balanced"} or dict, default=None
        ``"balanced"`` weights each class's loss by ``n_rows / (n_classes * n_rows_of_class)``; a dict maps class
        labels to weights (missing classes weigh 1).
    random_state : int, default=0
        Seed of weight initialisation, shuffling, dropout and the held-out split.
    run_eagerly : bool, default=False
        Train without compiling a TensorFlow graph. Same model, slower per step but without the ~0.5 s of tracing
        per fit: only worth it for tiny data (the estimator-contract tests use it).
    verbose : int, default=0
        Keras ``fit`` verbosity.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels, in the order of ``predict_proba`` columns and of the Keras model's outputs.
    n_features_in_ : int
        Size of the second input dimension (features, or map height for spatial maps).
    input_shape_ : tuple of int
        Shape of one input row.
    model_ : keras.Model
        The trained network (softmax over ``classes_``).
    history_ : dict of str to list of float
        Per-epoch ``loss``, ``accuracy`` and, with early stopping, ``val_loss`` and ``val_accuracy``.
    n_epochs_ : int
        Epochs run.
    best_epoch_ : int
        1-based epoch whose weights were kept.
    """

    def __init__(self, hidden: int = 256, dropout: float = 0.5, epochs: int = 100, learning_rate: float = 1e-3,
                 batch_size: int = 64, patience: int = 5, validation_fraction: float = 0.1,
                 class_weight: str | dict | None = None, random_state: int = 0, run_eagerly: bool = False,
                 verbose: int = 0) -> None:
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

    def __sklearn_tags__(self):  # noqa: D105
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags

    # -- helpers --

    def _holdout(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices of training rows and early-stopping rows (empty when none can be held out)."""
        n = len(y)
        all_rows = np.arange(n)
        if not self.validation_fraction or self.validation_fraction <= 0:
            return all_rows, all_rows[:0]
        n_classes = int(y.max()) + 1
        counts = np.bincount(y, minlength=n_classes)
        n_val = int(math.ceil(self.validation_fraction * n))
        if counts.min() < 2 or n_val < n_classes or n - n_val < n_classes:
            return all_rows, all_rows[:0]
        from sklearn.model_selection import train_test_split

        fit_idx, val_idx = train_test_split(all_rows, test_size=n_val, stratify=y, random_state=self.random_state)
        return np.sort(fit_idx), np.sort(val_idx)

    def _build(self, input_shape: tuple[int, ...], n_classes: int, x_adapt: np.ndarray):
        import keras

        inputs = keras.Input(shape=input_shape, name="features")
        norm = keras.layers.Normalization(axis=-1, name="standardise")  # last axis: features, or map channels
        norm.adapt(x_adapt)
        x = norm(inputs)
        if len(input_shape) > 1:
            x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(int(self.hidden), activation="relu", name="hidden")(x)
        x = keras.layers.Dropout(float(self.dropout), seed=int(self.random_state), name="dropout")(x)
        outputs = keras.layers.Dense(n_classes, activation="softmax", name="softmax")(x)
        model = keras.Model(inputs, outputs, name="dense_head")
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=float(self.learning_rate)),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=False,
                      run_eagerly=bool(self.run_eagerly), steps_per_execution=1 if self.run_eagerly else 8)
        return model

    # -- estimator API --

    def fit(self, X: np.ndarray, y: np.ndarray) -> "DenseHead":
        """Train the network on ``X`` (rows x features, or rows x h x w x c maps) and labels ``y``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, h, w, c)
        y : array-like of shape (n_samples,)

        Returns
        -------
        self : DenseHead
        """
        import keras

        X, y = validate_data(self, X, y, allow_nd=True, dtype=np.float32)
        check_classification_targets(y)
        encoder = LabelEncoder().fit(y)
        self.classes_ = encoder.classes_
        if len(self.classes_) < 2:
            raise ValueError(f"DenseHead needs at least 2 classes to train; got 1 class: {self.classes_[0]!r}")
        y_idx = encoder.transform(y).astype(np.int64)
        self.input_shape_ = tuple(int(s) for s in X.shape[1:])
        n_classes = len(self.classes_)

        keras.utils.set_random_seed(int(self.random_state))
        fit_idx, val_idx = self._holdout(y_idx)
        x_fit, y_fit = X[fit_idx], y_idx[fit_idx]
        weights = None
        if isinstance(self.class_weight, str) and self.class_weight == "balanced":
            present = np.unique(y_fit)
            w = compute_class_weight("balanced", classes=present, y=y_fit)
            weights = {int(c): float(v) for c, v in zip(present, w)}
        elif isinstance(self.class_weight, dict):
            weights = {int(i): float(self.class_weight.get(c, 1.0)) for i, c in enumerate(self.classes_)}
        elif self.class_weight is not None:
            raise ValueError(f"class_weight must be None, 'balanced' or a dict, got {self.class_weight!r}")

        model = self._build(self.input_shape_, n_classes, x_fit)
        callbacks = []
        if len(val_idx):
            # Held-out loss computed by a direct forward pass: Keras's own validation_data costs ~0.1 s per epoch.
            callbacks.append(_held_out_callback(X[val_idx], y_idx[val_idx]))
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=int(self.patience),
                                                           restore_best_weights=True))
        hist = model.fit(x_fit, y_fit, epochs=int(self.epochs), batch_size=int(self.batch_size), shuffle=True,
                         class_weight=weights, callbacks=callbacks, verbose=int(self.verbose))
        self.history_ = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
        self.n_epochs_ = len(self.history_.get("loss", []))
        if "val_loss" in self.history_ and self.history_["val_loss"]:
            self.best_epoch_ = int(np.argmin(self.history_["val_loss"])) + 1
        else:
            self.best_epoch_ = self.n_epochs_
        self.model_ = model
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``.

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
        out = [_to_numpy(self.model_(X[i:i + 4096], training=False)) for i in range(0, len(X), 4096)]
        proba = np.concatenate(out, axis=0) if out else np.zeros((0, len(self.classes_)), np.float32)
        proba = proba.astype(np.float64)
        return proba / proba.sum(axis=1, keepdims=True)

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

    # -- pickling: Keras models travel as .keras bytes --

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
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


def _to_numpy(tensor: Any) -> np.ndarray:
    """A backend tensor as NumPy (``.numpy()`` where the backend has it, which avoids a NumPy 2 copy warning)."""
    if hasattr(tensor, "numpy"):
        return np.asarray(tensor.numpy())
    import keras

    return np.asarray(keras.ops.convert_to_numpy(tensor))


def _held_out_callback(x_val: np.ndarray, y_val: np.ndarray):
    """Keras callback adding ``val_loss`` and ``val_accuracy`` of held-out rows to each epoch's logs."""
    import keras

    class HeldOut(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            p = _to_numpy(self.model(x_val, training=False)).astype(np.float64)
            p_true = np.clip(p[np.arange(len(y_val)), y_val], 1e-7, 1.0)
            if logs is not None:
                logs["val_loss"] = float(-np.mean(np.log(p_true)))
                logs["val_accuracy"] = float(np.mean(np.argmax(p, axis=1) == y_val))

    return HeldOut()
