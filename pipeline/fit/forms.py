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
from typing import Any, Callable, Protocol

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.kernel_approximation import Nystroem
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from pipeline.fit.context import HeadContext
from pipeline.fit.linear import linear_svc, logistic_regression, minibatch_linear, nearest_centroid, standard_scaler
from pipeline.fit.stream import ArraySource, RowSource, class_moments, stratified_subsample

__all__ = ["calibration_rows", "fit_exact", "fit_logreg_minibatch", "fit_linear_svm_minibatch", "fit_svm_nystroem",
           "fit_knn_bounded", "fit_centroid", "fit_dense_streamed", "CALIBRATION_FRACTION", "CALIBRATION_MAX_ROWS",
           "HeadEntry"]

CALIBRATION_FRACTION = 0.1
CALIBRATION_MAX_ROWS = 10_000
"""Held-out training rows that fit the sigmoid calibration of the mini-batch SVMs: 10 %, at most 10,000 (a
two-parameter sigmoid per class needs no more)."""


def _flat(X: np.ndarray) -> np.ndarray:
    return X.reshape(len(X), -1)


def _names(source: RowSource, rows: np.ndarray | None = None) -> np.ndarray:
    labels = source.labels if rows is None else source.labels[rows]
    return source.classes[labels]


class HeadEntry(Protocol):
    """What a form needs of its head's registry entry (:class:`pipeline.fit.heads.HeadSpec`, which imports this
    module, so it is described here rather than imported)."""

    kind: str
    takes_maps: bool
    build: Callable[[HeadContext, dict[str, Any], bool], Any]


def fit_exact(ctx: HeadContext, params: dict[str, Any], source: RowSource, search: bool, spec: HeadEntry,
              est: Any = None) -> Any:
    """The head's exact estimator fitted on the source's rows in memory (``est`` refitted when given)."""
    if not isinstance(source, ArraySource):
        raise TypeError("the exact form needs its rows in memory")
    X = source.array()
    est = est if est is not None else spec.build(ctx, params, search)
    kw = {"groups": source.groups} if source.groups is not None and spec.kind == "keras" else {}
    return est.fit(X if spec.takes_maps else _flat(X), _names(source), **kw)


def _scaler(source: RowSource, rows: np.ndarray | None = None, pre: Callable | None = None):
    moments = class_moments(source.chunks(rows), len(source.classes), pre=pre)
    return standard_scaler(moments), moments


def calibration_rows(n_rows: int) -> int:
    """How many of ``n_rows`` training rows a batch form's SVM holds out to calibrate its probabilities on
    (:data:`CALIBRATION_FRACTION`, at most :data:`CALIBRATION_MAX_ROWS`)."""
    return int(min(CALIBRATION_MAX_ROWS, math.ceil(CALIBRATION_FRACTION * n_rows)))


def _calibration_split(source: RowSource, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows and held-out calibration rows (stratified, seeded)."""
    rows = np.arange(source.n)
    size = calibration_rows(source.n)
    counts = np.bincount(source.labels, minlength=len(source.classes))
    if counts.min() < 2 or size < len(source.classes):
        return rows, rows[:0]
    cal = stratified_subsample(source.labels, rows, size, seed + 17)
    return np.setdiff1d(rows, cal), cal


def _calibrated(svc: Any, Z_cal: np.ndarray, y_cal: np.ndarray) -> Any:
    return CalibratedClassifierCV(FrozenEstimator(svc), method="sigmoid").fit(Z_cal, y_cal)


def fit_logreg_minibatch(ctx: HeadContext, params: dict[str, Any], source: RowSource, search: bool, spec: HeadEntry,
                         est: Any = None) -> Pipeline:
    """Standardisation + multinomial logistic regression (the same objective as lbfgs), mini-batch solver."""
    scaler, _ = _scaler(source)
    C = float(params["C"])

    def transform(X: np.ndarray) -> np.ndarray:
        return scaler.transform(_flat(X))

    W, b = minibatch_linear(source, "log", C, ctx.class_weight, ctx.seed, transform=transform, max_bytes=ctx.work_bytes)
    return Pipeline([("scale", scaler), ("clf", logistic_regression(W, b, source.classes, C, ctx.class_weight))])


def fit_linear_svm_minibatch(ctx: HeadContext, params: dict[str, Any], source: RowSource, search: bool, spec: HeadEntry,
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

    W, b = minibatch_linear(source, "squared_hinge", C, ctx.class_weight, ctx.seed, transform=transform, rows=train,
                            max_bytes=ctx.work_bytes)
    clf: Any = linear_svc(W, b, source.classes, C, ctx.class_weight)
    if len(cal):
        clf = _calibrated(clf, transform(source.take(cal)), _names(source, cal))
    return Pipeline([("scale", scaler), ("clf", clf)])


class _KernelMap:
    """The fitted steps of the approximate RBF SVM up to the linear model, and its training rows mapped."""

    def __init__(self, ctx: HeadContext, gamma: float, source: RowSource, train: np.ndarray) -> None:
        self.scaler, _ = _scaler(source, train, pre=np.cbrt)
        m = int(min(ctx.nystroem_components, len(train)))
        landmarks = stratified_subsample(source.labels, train, m, ctx.seed + 29)
        L = self.scaler.transform(np.cbrt(_flat(source.take(landmarks))))
        self.nys = Nystroem(kernel="rbf", gamma=float(gamma), n_components=len(landmarks),
                            random_state=ctx.seed).fit(L)
        self.m = len(landmarks)
        work = ctx.work_bytes
        if work is None or len(train) * self.m * 4 <= work:  # map once, keep in memory
            Z = np.concatenate([self.kernel_map(X) for X, _ in source.chunks(train)]) if len(train) else \
                np.zeros((0, self.m), np.float32)
            self.mapped: RowSource = ArraySource(Z, source.labels[train], source.classes)
            self.rows = np.arange(len(train))
            self.first: Callable | None = None
        else:  # map every block of every pass
            self.mapped, self.rows, self.first = source, train, self.kernel_map
        self.scaler2 = standard_scaler(class_moments(self.mapped.chunks(self.rows), len(source.classes),
                                                     pre=self.first))

    def kernel_map(self, X: np.ndarray) -> np.ndarray:
        """Raw rows -> Nystroem features."""
        return np.asarray(self.nys.transform(self.scaler.transform(np.cbrt(_flat(X)))), dtype=np.float32)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Rows of :attr:`mapped` -> the linear model's input."""
        return self.scaler2.transform(X if self.first is None else self.first(X))

    def solve(self, ctx: HeadContext, C: float) -> tuple[np.ndarray, np.ndarray]:
        return minibatch_linear(self.mapped, "squared_hinge", C, ctx.class_weight, ctx.seed, transform=self.transform,
                                rows=self.rows, n_features=self.m, max_bytes=ctx.work_bytes)


def fit_svm_nystroem(ctx: HeadContext, params: dict[str, Any], source: RowSource, search: bool, spec: HeadEntry,
                     est: Any = None) -> Pipeline:
    """Signed cube root + standardisation + Nystroem RBF map + standardisation + linear SVM (mini-batch).

    The Nystroem map uses ``ctx.nystroem_components`` landmark rows (a stratified, seeded sample of the training
    rows) with the head's gamma, so a linear SVM on it approximates the RBF SVM with a rank-``m`` kernel. Its
    features are standardised before the solver (they are tiny and unevenly scaled, which slows a first-order solver
    badly). Mapped rows are kept in memory when they fit ``ctx.work_bytes``, else recomputed every pass.
    """
    train, cal = (np.arange(source.n), np.arange(0)) if search else _calibration_split(source, ctx.seed)
    km = _KernelMap(ctx, float(params["gamma"]), source, train)
    C = float(params["C"])
    W, b = km.solve(ctx, C)
    clf: Any = linear_svc(W, b, source.classes, C, ctx.class_weight)
    if len(cal):
        clf = _calibrated(clf, km.scaler2.transform(km.kernel_map(source.take(cal))), _names(source, cal))
    cbrt = FunctionTransformer(np.cbrt).fit(np.zeros((1, source.n_features)))
    return Pipeline([("cbrt", cbrt), ("scale", km.scaler), ("nystroem", km.nys), ("scale_map", km.scaler2),
                     ("clf", clf)])


def score_svm_nystroem_fold(ctx: HeadContext, grid: list[dict[str, Any]], source: RowSource, Xs: np.ndarray,
                            ys: np.ndarray) -> list[float]:
    """Accuracy of every (C, gamma) candidate on one fold, mapping the rows once per gamma (the same fits as
    :func:`fit_svm_nystroem` with ``search=True``)."""
    scores: dict[int, float] = {}
    for gamma in dict.fromkeys(float(p["gamma"]) for p in grid):
        km = _KernelMap(ctx, gamma, source, np.arange(source.n))
        Zs = km.scaler2.transform(km.kernel_map(Xs))
        for i, p in enumerate(grid):
            if float(p["gamma"]) == gamma:
                W, b = km.solve(ctx, float(p["C"]))
                pred = source.classes[np.argmax(Zs @ W + b, axis=1)]
                scores[i] = float(np.mean(pred == np.asarray(ys)))
    return [scores[i] for i in range(len(grid))]


def knn_index(ctx: HeadContext, source: RowSource) -> np.ndarray:
    """Rows of the bounded k-NN index: all rows, or a stratified seeded subsample of ``ctx.knn_index_rows``."""
    limit = ctx.knn_index_rows
    rows = np.arange(source.n)
    if limit is None or source.n <= limit:
        return rows
    return stratified_subsample(source.labels, rows, int(limit), ctx.seed + 41)


def fit_knn_bounded(ctx: HeadContext, params: dict[str, Any], source: RowSource, search: bool, spec: HeadEntry,
                    est: Any = None) -> Pipeline:
    """Standardisation (fitted on every training row) + k-NN whose index is a stratified subsample of them."""
    scaler, _ = _scaler(source)
    index = knn_index(ctx, source)
    knn = spec.build(ctx, params, search)[-1]
    if not isinstance(knn, KNeighborsClassifier):
        raise TypeError("the bounded k-NN form needs a KNeighborsClassifier as last step")
    knn.fit(scaler.transform(_flat(source.take(index))), _names(source, index))
    return Pipeline([("scale", scaler), ("clf", knn)])


def fit_centroid(ctx: HeadContext, params: dict[str, Any], source: RowSource, search: bool, spec: HeadEntry,
                 est: Any = None) -> Pipeline:
    """Standardisation + nearest centroid from per-class moments in one pass (the same as fitting in memory)."""
    moments = class_moments(source.chunks(), len(source.classes))
    scaler = standard_scaler(moments)
    return Pipeline([("scale", scaler), ("clf", nearest_centroid(moments, scaler, source.classes))])


def fit_dense_streamed(ctx: HeadContext, params: dict[str, Any], source: RowSource, search: bool, spec: HeadEntry,
                       est: Any = None) -> Any:
    """The dense head trained on blocks read from the cache (:meth:`DenseHead.fit_source`)."""
    est = est if est is not None else spec.build(ctx, params, search)
    return est.fit_source(source)
