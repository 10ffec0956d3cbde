"""How each head is fitted at scale: the forms of the cost plan that learn from rows in batches.

Every function here takes ``(ctx, params, source, search, spec, est=None)`` -- the head's :class:`~pipeline.fit.
heads.HeadContext`, its hyperparameters, a :class:`~pipeline.fit.stream.RowSource` of training rows (in memory or
read in blocks from a cache), whether this fit is scored in the hyperparameter search, the head's
:class:`~pipeline.fit.heads.HeadSpec`, and optionally an instance of it to refit (the dense head reuses one) -- and
returns a fitted estimator whose ``predict_proba`` takes raw rows (flattened for scikit-learn heads). The fitted
objects are plain scikit-learn pipelines (or the dense head's network), so saved heads load without this project.

* :func:`fit_exact` -- the head's exact estimator on rows in memory (``spec.build(...).fit(X, y)``).
* :func:`fit_logreg_minibatch` -- multinomial logistic regression, same objective, mini-batch solver.
* :func:`fit_linear_svm_minibatch` -- one-vs-rest squared-hinge linear SVM, same objective as ``LinearSVC``,
  mini-batch solver; probabilities from a sigmoid fitted on held-out training rows.
* :func:`fit_svm_nystroem` -- RBF SVM approximated by a Nystroem feature map on landmark rows + the linear SVM.
* :func:`fit_knn_bounded` -- k nearest neighbours over a stratified subsample of the training rows (the index).
* :func:`fit_centroid` -- nearest centroid from per-class moments (exact, one pass).
* :func:`fit_dense_streamed` -- the dense head trained on blocks read from the cache.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.kernel_approximation import Nystroem
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from pipeline.fit.linear import linear_svc, logistic_regression, minibatch_linear, nearest_centroid, standard_scaler
from pipeline.fit.stream import ArraySource, RowSource, class_moments, stratified_subsample

__all__ = ["fit_exact", "fit_logreg_minibatch", "fit_linear_svm_minibatch", "fit_svm_nystroem", "fit_knn_bounded",
           "fit_centroid", "fit_dense_streamed", "CALIBRATION_FRACTION", "CALIBRATION_MAX_ROWS"]

CALIBRATION_FRACTION = 0.1
CALIBRATION_MAX_ROWS = 10_000
"""Held-out training rows that fit the sigmoid calibration of the mini-batch SVMs: 10 %, at most 10,000 (a
two-parameter sigmoid per class needs no more)."""


def _flat(X: np.ndarray) -> np.ndarray:
    return X.reshape(len(X), -1)


def _names(source: RowSource, rows: np.ndarray | None = None) -> np.ndarray:
    labels = source.labels if rows is None else source.labels[rows]
    return source.classes[labels]


def _cw(ctx: Any) -> str | None:
    return "balanced" if ctx.class_weight == "balanced" else None


def fit_exact(ctx: Any, params: dict[str, Any], source: RowSource, search: bool, spec: Any,
              est: Any = None) -> Any:
    """The head's exact estimator fitted on the source's rows in memory (``est`` refitted when given)."""
    if not isinstance(source, ArraySource):
        raise TypeError("the exact form needs its rows in memory")
    X = source.array()
    est = est if est is not None else spec.build(ctx, params, search)
    return est.fit(X if spec.takes_maps else _flat(X), _names(source))


def _scaler(source: RowSource, rows: np.ndarray | None = None, pre: Callable | None = None):
    moments = class_moments(source.chunks(rows), len(source.classes), pre=pre)
    return standard_scaler(moments), moments


def _calibration_split(source: RowSource, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows and held-out calibration rows (stratified, seeded)."""
    rows = np.arange(source.n)
    size = min(CALIBRATION_MAX_ROWS, int(math.ceil(CALIBRATION_FRACTION * source.n)))
    counts = np.bincount(source.labels, minlength=len(source.classes))
    if counts.min() < 2 or size < len(source.classes):
        return rows, rows[:0]
    cal = stratified_subsample(source.labels, rows, size, seed + 17)
    return np.setdiff1d(rows, cal), cal


def _calibrated(svc: Any, Z_cal: np.ndarray, y_cal: np.ndarray) -> Any:
    return CalibratedClassifierCV(FrozenEstimator(svc), method="sigmoid").fit(Z_cal, y_cal)


def fit_logreg_minibatch(ctx: Any, params: dict[str, Any], source: RowSource, search: bool, spec: Any,
                         est: Any = None) -> Pipeline:
    """Standardisation + multinomial logistic regression (the same objective as lbfgs), mini-batch solver."""
    scaler, _ = _scaler(source)
    C = float(params["C"])

    def transform(X: np.ndarray) -> np.ndarray:
        return scaler.transform(_flat(X))

    W, b = minibatch_linear(source, "log", C, _cw(ctx), ctx.seed, transform=transform)
    return Pipeline([("scale", scaler), ("clf", logistic_regression(W, b, source.classes, C, _cw(ctx)))])


def fit_linear_svm_minibatch(ctx: Any, params: dict[str, Any], source: RowSource, search: bool, spec: Any,
                             est: Any = None) -> Pipeline:
    """Standardisation + one-vs-rest squared-hinge linear SVM (``LinearSVC``'s objective), mini-batch solver.

    The searched variant is the bare SVM (its decisions are what the search scores); the final one holds out
    :data:`CALIBRATION_FRACTION` of the training rows (at most :data:`CALIBRATION_MAX_ROWS`, stratified) to fit a
    sigmoid calibration on, as ``CalibratedClassifierCV(..., method="sigmoid")`` does on held-out folds.
    """
    train, cal = (np.arange(source.n), np.arange(0)) if search else _calibration_split(source, ctx.seed)
    scaler, _ = _scaler(source, train)
    C = float(params["C"])

    def transform(X: np.ndarray) -> np.ndarray:
        return scaler.transform(_flat(X))

    W, b = minibatch_linear(source, "squared_hinge", C, _cw(ctx), ctx.seed, transform=transform, rows=train)
    clf: Any = linear_svc(W, b, source.classes, C, _cw(ctx))
    if len(cal):
        clf = _calibrated(clf, transform(source.take(cal)), _names(source, cal))
    return Pipeline([("scale", scaler), ("clf", clf)])


def fit_svm_nystroem(ctx: Any, params: dict[str, Any], source: RowSource, search: bool, spec: Any,
                     est: Any = None) -> Pipeline:
    """Signed cube root + standardisation + Nystroem RBF map + standardisation + linear SVM (mini-batch).

    The Nystroem map uses ``ctx.nystroem_components`` landmark rows (a stratified, seeded sample of the training
    rows) with the head's gamma, so a linear SVM on it approximates the RBF SVM with rank-``m`` kernel. Its features
    are standardised before the solver (they are tiny and unevenly scaled, which slows a first-order solver
    badly). Transformed rows are kept in memory when they fit ``ctx.work_bytes``, else recomputed every pass.
    """
    train, cal = (np.arange(source.n), np.arange(0)) if search else _calibration_split(source, ctx.seed)
    scaler, _ = _scaler(source, train, pre=np.cbrt)
    m = int(min(ctx.nystroem_components, len(train)))
    landmarks = stratified_subsample(source.labels, train, m, ctx.seed + 29)
    L = scaler.transform(np.cbrt(_flat(source.take(landmarks))))
    nys = Nystroem(kernel="rbf", gamma=float(params["gamma"]), n_components=len(landmarks),
                   random_state=ctx.seed).fit(L)

    def kernel_map(X: np.ndarray) -> np.ndarray:
        return np.asarray(nys.transform(scaler.transform(np.cbrt(_flat(X)))), dtype=np.float32)

    work = getattr(ctx, "work_bytes", None)
    mapped: RowSource = source
    mapped_rows = train
    if work is None or len(train) * len(landmarks) * 4 <= work:  # map once, keep in memory
        Z = np.concatenate([kernel_map(X) for X, _ in source.chunks(train)]) if len(train) else \
            np.zeros((0, len(landmarks)), np.float32)
        mapped = ArraySource(Z, source.labels[train], source.classes)
        mapped_rows = np.arange(len(train))
        first = None
    else:
        first = kernel_map
    moments = class_moments(mapped.chunks(mapped_rows), len(source.classes), pre=first)
    scaler2 = standard_scaler(moments)

    def transform(X: np.ndarray) -> np.ndarray:
        Z = X if first is None else first(X)
        return scaler2.transform(Z)

    C = float(params["C"])
    W, b = minibatch_linear(mapped, "squared_hinge", C, _cw(ctx), ctx.seed, transform=transform, rows=mapped_rows,
                            n_features=len(landmarks))
    clf: Any = linear_svc(W, b, source.classes, C, _cw(ctx))
    if len(cal):
        clf = _calibrated(clf, scaler2.transform(kernel_map(source.take(cal))), _names(source, cal))
    cbrt = FunctionTransformer(np.cbrt).fit(np.zeros((1, source.n_features)))
    return Pipeline([("cbrt", cbrt), ("scale", scaler), ("nystroem", nys), ("scale_map", scaler2), ("clf", clf)])


def knn_index(ctx: Any, source: RowSource) -> np.ndarray:
    """Rows of the bounded k-NN index: all rows, or a stratified seeded subsample of ``ctx.knn_index_rows``."""
    limit = getattr(ctx, "knn_index_rows", None)
    rows = np.arange(source.n)
    if limit is None or source.n <= limit:
        return rows
    return stratified_subsample(source.labels, rows, int(limit), ctx.seed + 41)


def fit_knn_bounded(ctx: Any, params: dict[str, Any], source: RowSource, search: bool, spec: Any,
                    est: Any = None) -> Pipeline:
    """Standardisation (fitted on every training row) + k-NN whose index is a stratified subsample of them."""
    scaler, _ = _scaler(source)
    index = knn_index(ctx, source)
    knn = spec.build(ctx, params, search)[-1]
    if not isinstance(knn, KNeighborsClassifier):
        raise TypeError("the bounded k-NN form needs a KNeighborsClassifier as last step")
    knn.fit(scaler.transform(_flat(source.take(index))), _names(source, index))
    return Pipeline([("scale", scaler), ("clf", knn)])


def fit_centroid(ctx: Any, params: dict[str, Any], source: RowSource, search: bool, spec: Any,
                 est: Any = None) -> Pipeline:
    """Standardisation + nearest centroid from per-class moments in one pass (the same as fitting in memory)."""
    moments = class_moments(source.chunks(), len(source.classes))
    scaler = standard_scaler(moments)
    return Pipeline([("scale", scaler), ("clf", nearest_centroid(moments, scaler, source.classes))])


def fit_dense_streamed(ctx: Any, params: dict[str, Any], source: RowSource, search: bool, spec: Any,
                       est: Any = None) -> Any:
    """The dense head trained on blocks read from the cache (:meth:`DenseHead.fit_source`)."""
    est = est if est is not None else spec.build(ctx, params, search)
    return est.fit_source(source)
