"""Classifier heads compared on cached features, each a scikit-learn classifier built from a registry.

Every head follows scikit-learn's estimator contract: ``__init__`` only stores keyword arguments, ``fit`` returns
``self``, learned state ends in ``_``, :func:`sklearn.base.clone` works, and ``predict_proba`` is available. Heads
see arrays only (rows x features; the dense head also takes ``(rows, h, w, c)`` spatial maps).

Registered heads (``python cli.py fit --head NAME``, repeatable, or ``--head all``)
------------------------------------------------------------------------------------
``dense``
    A small Keras network (:class:`DenseHead`): Normalization -> Dense(hidden, relu) -> Dropout -> softmax, Adam,
    early stopping on the loss of a held-out, stratified, seeded part of the training rows, best weights restored.
    On spatial maps it standardises each channel (statistics over images and positions) and then flattens them
    (``Normalization -> Flatten -> ...``, as the classic transfer-learning tutorials flatten): global pooling of
    the maps would only reproduce the ``avg``/``max`` features that every cache already holds, so flattening is the
    one way maps add information (where each activation is). Standardising every position-channel on its own would
    blow up activations that are rare at one position (measured: 0.75 instead of 0.95 validation accuracy on
    hymenoptera), and Adam's per-weight steps move a unit's input in proportion to its fan-in, so with more than
    4,096 inputs the learning rate is 1e-4 instead of 1e-3.
``logreg``
    Standardisation + multinomial logistic regression (lbfgs), C swept over a log grid: the linear-probe protocol.
``linear_svm``
    Standardisation + linear SVM (liblinear), C swept. Probabilities come from sigmoid calibration fitted by
    3-fold cross-validation on the training rows (``CalibratedClassifierCV(..., ensemble=False)``).
``svm``
    Signed cube root (power normalisation) + standardisation (+ PCA to 512 components on large inputs) + RBF SVM,
    C and gamma swept; sigmoid calibration as for ``linear_svm``. Pooled features after ReLU are heavy-tailed; the
    cube root keeps a few large activations from dominating RBF distances (+1 point of cross-validated accuracy
    measured on flowers5 with both MobileNets, over 4 split seeds). libsvm evaluates kernels with plain loops, so
    with more than 512 features and at least 1,000 training rows the features are first projected on their 512
    main principal components (seeded randomized PCA): fitting is 1.5x and prediction 2x faster, accuracy within
    0.2 point on flowers5 (256 components lost up to 0.7 point on the held-out split).
``knn``
    Standardisation + k nearest neighbours by cosine distance, distance-weighted votes, k swept.
``centroid``
    Standardisation + nearest class centroid (no hyperparameter; a cheap baseline). Its probabilities, and so the
    predicted class (the most probable one, everywhere in this project), follow the nearest-centroid discriminant
    of scikit-learn's ``NearestCentroid(priors="empirical").predict_proba``: squared distances in
    within-class-standardised units plus twice the log class prior. Its own ``predict`` agrees, except when every
    class has exactly as many training images (scikit-learn then falls back to plain distances).

Standardisation (and every other fitted transform) lives inside each head's pipeline, so cross-validation never
leaks a statistic from the rows it scores. Saved scikit-learn heads contain scikit-learn and NumPy objects only
(loadable with ``joblib.load`` without this project); the dense head is saved as a plain ``.keras`` model.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, LabelEncoder, StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.errors import FitError

__all__ = [
    "DenseHead", "HeadContext", "HeadSpec", "HEADS", "head_names", "resolve_heads", "get_head", "flatten_features",
]

PCA_COMPONENTS = 512
PCA_MIN_ROWS = 1000


# ---- the dense (Keras) head ----------------------------------------------------------------------------------


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


# ---- registry ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadContext:
    """What a head factory needs to know about the data it will be fitted on.

    Attributes
    ----------
    n_features : int
        Columns of the 2-D input (spatial maps count ``h * w * c``).
    n_classes : int
    n_rows : int
        Training rows of the final fit (cross-validation folds see fewer).
    min_class_rows : int
        Rows of the smallest class in the final training set.
    class_weight : {None, "balanced"}
    seed : int
    input_shape : tuple of int
        Shape of one input row as cached (``(d,)`` or ``(h, w, c)``).
    """

    n_features: int
    n_classes: int
    n_rows: int
    min_class_rows: int
    class_weight: str | None = None
    seed: int = 0
    input_shape: tuple[int, ...] = ()


Builder = Callable[[HeadContext, dict[str, Any], bool], Any]


@dataclass(frozen=True)
class HeadSpec:
    """One registered head.

    Attributes
    ----------
    name : str
    summary : str
        One line for listings and the docs.
    build : callable
        ``build(ctx, params, search)`` -> unfitted estimator. ``search=True`` asks for the variant scored during the
        hyperparameter search (e.g. an SVM without its probability calibration, which does not change its
        decisions); ``search=False`` for the head that is refitted and saved.
    grid : callable
        ``grid(ctx)`` -> list of candidate parameter dicts, in order of preference for ties (simplest or most
        regularised first).
    kind : {"sklearn", "keras"}
        How the fitted head is saved (joblib Pipeline or ``.keras``).
    takes_maps : bool
        Whether it takes ``(n, h, w, c)`` maps as they are (otherwise maps are flattened first).
    uses_class_weight : bool
        Whether ``--class-weight balanced`` changes it.
    search_path : str
        ``"plain"`` (every candidate fitted from scratch), ``"warm"`` (candidates fitted in grid order on one
        estimator with ``warm_start``) or ``"kernel"`` (RBF candidates scored from one precomputed distance
        matrix per fold). All three score exactly the estimator ``build(ctx, params, True)``.
    warm_params : dict of str to str
        For ``"warm"``: grid key -> estimator parameter path (``{"C": "clf__C"}``).
    fixed : callable
        ``fixed(ctx)`` -> the settings that are not searched but shape the head (recorded with the chosen ones).
    """

    name: str
    summary: str
    build: Builder
    grid: Callable[[HeadContext], list[dict[str, Any]]]
    kind: str = "sklearn"
    takes_maps: bool = False
    uses_class_weight: bool = True
    search_path: str = "plain"
    warm_params: dict[str, str] = field(default_factory=dict)
    fixed: Callable[[HeadContext], dict[str, Any]] = field(default=lambda ctx: {})


def _calibration_folds(ctx: HeadContext) -> int:
    return max(2, min(3, ctx.min_class_rows))


def _cw(ctx: HeadContext) -> str | None:
    return "balanced" if ctx.class_weight == "balanced" else None


DENSE_WIDE_INPUTS = 4096


def _dense_lr(ctx: HeadContext) -> float:
    return 1e-3 if ctx.n_features <= DENSE_WIDE_INPUTS else 1e-4


def _build_dense(ctx: HeadContext, params: dict[str, Any], search: bool) -> DenseHead:
    return DenseHead(class_weight=_cw(ctx), random_state=ctx.seed, learning_rate=_dense_lr(ctx), **params)


def _build_logreg(ctx: HeadContext, params: dict[str, Any], search: bool) -> Pipeline:
    clf = LogisticRegression(C=float(params["C"]), max_iter=300, tol=1e-3, class_weight=_cw(ctx),
                             warm_start=search)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def _build_linear_svm(ctx: HeadContext, params: dict[str, Any], search: bool) -> Pipeline:
    svm = LinearSVC(C=float(params["C"]), dual=True, tol=1e-3, max_iter=2000, class_weight=_cw(ctx),
                    random_state=ctx.seed)
    clf = svm if search else CalibratedClassifierCV(svm, method="sigmoid", cv=_calibration_folds(ctx),
                                                    ensemble=False)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def _svm_uses_pca(ctx: HeadContext) -> bool:
    return ctx.n_features > PCA_COMPONENTS and ctx.n_rows >= PCA_MIN_ROWS


def _svm_gamma(ctx: HeadContext, factor: float) -> float:
    # 'scale' of standardised inputs is 1 / n_features; PCA keeps most of the variance of those inputs.
    return float(factor) / float(ctx.n_features)


def _build_svm(ctx: HeadContext, params: dict[str, Any], search: bool) -> Pipeline:
    steps: list[tuple[str, Any]] = [("cbrt", FunctionTransformer(np.cbrt)), ("scale", StandardScaler())]
    if _svm_uses_pca(ctx):
        steps.append(("pca", PCA(n_components=PCA_COMPONENTS, svd_solver="randomized", random_state=ctx.seed)))
    svm = SVC(C=float(params["C"]), kernel="rbf", gamma=_svm_gamma(ctx, params["gamma_factor"]),
              class_weight=_cw(ctx))
    clf = svm if search else CalibratedClassifierCV(svm, method="sigmoid", cv=_calibration_folds(ctx),
                                                    ensemble=False)
    steps.append(("clf", clf))
    return Pipeline(steps)


def _build_knn(ctx: HeadContext, params: dict[str, Any], search: bool) -> Pipeline:
    clf = KNeighborsClassifier(n_neighbors=int(params["k"]), metric="cosine", algorithm="brute", weights="distance")
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def _build_centroid(ctx: HeadContext, params: dict[str, Any], search: bool) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", NearestCentroid(priors="empirical"))])


def _knn_grid(ctx: HeadContext) -> list[dict[str, Any]]:
    # The smallest fit (a cross-validation fold) has at least half of the training rows.
    limit = max(1, ctx.n_rows // 2)
    ks = [k for k in (1, 5, 10, 20) if k <= limit]
    return [{"k": k} for k in ks]


LOGREG_C = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
LINEAR_SVM_C = (1e-4, 3e-4, 1e-3, 3e-3)
SVM_C = (1.0, 3.0, 10.0)
SVM_GAMMA_FACTORS = (0.5, 1.0, 2.0)

HEADS: dict[str, HeadSpec] = {
    "dense": HeadSpec(
        name="dense", kind="keras", takes_maps=True, build=_build_dense, grid=lambda ctx: [{}],
        summary="Keras Normalization -> Dense(256, relu) -> Dropout(0.5) -> softmax, early stopping (maps: flatten)",
        fixed=lambda ctx: {"hidden": 256, "dropout": 0.5, "learning_rate": _dense_lr(ctx), "batch_size": 64,
                           "patience": 5, "validation_fraction": 0.1, "class_weight": _cw(ctx)},
    ),
    "logreg": HeadSpec(
        name="logreg", build=_build_logreg, search_path="warm", warm_params={"C": "clf__C"},
        grid=lambda ctx: [{"C": c} for c in LOGREG_C],
        summary="standardise + multinomial logistic regression, C swept (linear probe)",
        fixed=lambda ctx: {"class_weight": _cw(ctx)},
    ),
    "linear_svm": HeadSpec(
        name="linear_svm", build=_build_linear_svm, grid=lambda ctx: [{"C": c} for c in LINEAR_SVM_C],
        summary="standardise + linear SVM, C swept; sigmoid-calibrated probabilities",
        fixed=lambda ctx: {"class_weight": _cw(ctx), "calibration_folds": _calibration_folds(ctx)},
    ),
    "svm": HeadSpec(
        name="svm", build=_build_svm, search_path="kernel",
        grid=lambda ctx: [{"C": c, "gamma_factor": g, "gamma": _svm_gamma(ctx, g)}
                          for c in SVM_C for g in SVM_GAMMA_FACTORS],
        summary="cube root + standardise (+ PCA 512) + RBF SVM, C x gamma swept; sigmoid-calibrated",
        fixed=lambda ctx: {"class_weight": _cw(ctx), "pca_components": PCA_COMPONENTS if _svm_uses_pca(ctx) else None,
                           "calibration_folds": _calibration_folds(ctx)},
    ),
    "knn": HeadSpec(
        name="knn", build=_build_knn, grid=_knn_grid, uses_class_weight=False,
        summary="standardise + k nearest neighbours (cosine, distance-weighted), k swept",
        fixed=lambda ctx: {"metric": "cosine", "weights": "distance"},
    ),
    "centroid": HeadSpec(
        name="centroid", build=_build_centroid, grid=lambda ctx: [{}], uses_class_weight=False,
        summary="standardise + nearest class centroid (baseline, nothing to tune)",
    ),
}


def head_names() -> list[str]:
    """Registered head names, in registry order."""
    return list(HEADS)


def get_head(name: str) -> HeadSpec:
    """The registered head called ``name``.

    Raises
    ------
    FitError
        Unknown name; the message lists the known heads.
    """
    try:
        return HEADS[name]
    except KeyError:
        raise FitError(f"unknown head {name!r}; known heads: {', '.join(HEADS)} (or 'all')") from None


def resolve_heads(names: list[str] | tuple[str, ...] | None) -> list[str]:
    """Expand ``all`` and check names: the heads to fit, in registry order, each once.

    Parameters
    ----------
    names : list of str or None
        Head names as given on the command line (``None`` or empty means ``all``). Comma-separated values are
        split.

    Returns
    -------
    list of str

    Raises
    ------
    FitError
        An unknown name (the message lists the known ones).
    """
    wanted: list[str] = []
    for item in names or ["all"]:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name == "all":
                wanted.extend(HEADS)
            else:
                get_head(name)
                wanted.append(name)
    if not wanted:
        raise FitError(f"no head given; known heads: {', '.join(HEADS)} (or 'all')")
    return [n for n in HEADS if n in set(wanted)]


def flatten_features(X: np.ndarray) -> np.ndarray:
    """2-D float32 view of features: spatial maps ``(n, h, w, c)`` become ``(n, h * w * c)``."""
    X = np.asarray(X)
    if X.ndim > 2:
        X = X.reshape(len(X), -1)
    return np.ascontiguousarray(X, dtype=np.float32)

