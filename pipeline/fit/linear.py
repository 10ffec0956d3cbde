"""Linear models learned in mini-batches, and fitted scikit-learn objects built from streamed statistics.

:func:`minibatch_linear` minimises exactly the objective of scikit-learn's solvers, with their meaning of ``C``:

* ``loss="log"``: multinomial logistic regression, ``C * sum_i w_i * log_loss_i + 1/2 * ||W||^2``
  (:class:`~sklearn.linear_model.LogisticRegression`);
* ``loss="squared_hinge"``: one-vs-rest squared hinge, ``C * sum_i w_i * sum_k max(0, 1 - t_ik z_ik)^2 +
  1/2 * ||W||^2`` (:class:`~sklearn.svm.LinearSVC`'s default loss);

(intercepts unpenalised) by Adam on mini-batches of 256 rows streamed from a :class:`~pipeline.fit.stream.RowSource`,
with a step size of 0.01 decaying as ``1 / sqrt(1 + step / 100)`` and the weights averaged over the last two epochs
(Polyak averaging, which removes most of the noise the last steps leave). Adam moves each weight by about one step
size per step, so small data needs enough steps to reach weights of order 1: the schedule was chosen among step
sizes 0.003-0.03 decaying over 100-1,000 steps as the one within 2 % of lbfgs's objective on small 2- and 3-class
problems and on 6,700 x 1,280 real features at the C values searches pick.

It makes at least :data:`MIN_EPOCHS` passes and at least :data:`MIN_STEPS` steps (at most :data:`MAX_EPOCHS`
passes), so its cost is linear in the rows, where lbfgs needs 30 to 300 full passes and liblinear's dual solver more
and more passes as rows grow. Measured on 34,941 x 1,280 MobileNetV2 features (10 classes): test accuracy within 0.5
point of lbfgs's, 2-3x faster; on 6,700 rows (a search fold), within 0.6 point of lbfgs's and LinearSVC's in 1.5 s,
where LinearSVC takes 20-25 s. Rows in memory are transformed (standardised, kernel-mapped) once; streamed rows
block by block on every pass.

The results are plain scikit-learn objects with their fitted attributes set (:func:`logistic_regression`,
:func:`linear_svc`, :func:`standard_scaler`, :func:`nearest_centroid`), so a saved head loads with scikit-learn
alone and predicts exactly as if scikit-learn had fitted those parameters.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestCentroid
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from pipeline.fit.stream import ArraySource, ClassMoments, RowSource

__all__ = ["minibatch_linear", "logistic_regression", "linear_svc", "standard_scaler", "nearest_centroid",
           "MIN_EPOCHS", "MIN_STEPS", "MAX_EPOCHS", "BATCH_ROWS"]

BATCH_ROWS = 256
MIN_EPOCHS = 10
MIN_STEPS = 1000
MAX_EPOCHS = 1000
LEARNING_RATE = 1e-2
DECAY_STEPS = 100
AVERAGE_EPOCHS = 2


def _class_weights(labels: np.ndarray, n_classes: int, class_weight: str | None) -> np.ndarray:
    if class_weight != "balanced":
        return np.ones(n_classes, np.float32)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)


def epochs_for(n_rows: int, batch_rows: int = BATCH_ROWS) -> int:
    """Passes :func:`minibatch_linear` makes over ``n_rows`` rows."""
    steps = max(1, math.ceil(n_rows / batch_rows))
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(MIN_STEPS / steps))))


def minibatch_linear(source: RowSource, loss: str, C: float, class_weight: str | None = None, seed: int = 0,
                     transform: Callable[[np.ndarray], np.ndarray] | None = None,
                     rows: np.ndarray | None = None, n_features: int | None = None,
                     max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``(d, k)`` and intercepts ``(k,)`` of a linear classifier learned in mini-batches.

    Parameters
    ----------
    source : RowSource
        Training rows (their class indices are ``source.labels``; ``k = len(source.classes)``).
    loss : {"log", "squared_hinge"}
    C : float
        Inverse regularisation strength, with scikit-learn's meaning (see the module docstring).
    class_weight : {None, "balanced"}
    seed : int
        Seeds the order of rows.
    transform : callable, optional
        Applied to each block of raw rows (standardisation, a kernel map...); its output has ``n_features``
        columns.
    rows : ndarray of int, optional
        Rows of ``source`` to train on (default all).
    n_features : int, optional
        Columns after ``transform`` (default: the source's).
    max_bytes : int, optional
        Rows held in memory (an :class:`~pipeline.fit.stream.ArraySource`) are transformed once and kept when their
        transformed copy takes at most this much (default: always); otherwise every pass transforms block by block.

    Returns
    -------
    W : ndarray of float32, shape (d, k)
    b : ndarray of float32, shape (k,)
    """
    if loss not in ("log", "squared_hinge"):
        raise ValueError(f"unknown loss {loss!r}")
    rows = np.arange(source.n) if rows is None else np.asarray(rows, dtype=np.int64)
    k = len(source.classes)
    d = int(n_features or source.n_features)
    n = len(rows)
    # scikit-learn's binary logistic regression penalises w = W[:, 1] - W[:, 0], whose norm is twice that of each
    # (antisymmetric) column of the two-column form used here
    lam = np.float32((2.0 if loss == "log" and k == 2 else 1.0) / (float(C) * n))
    cw = _class_weights(source.labels[rows], k, class_weight)
    epochs = epochs_for(n)
    W = np.zeros((d, k), np.float32)
    b = np.zeros(k, np.float32)
    mW, vW = np.zeros_like(W), np.zeros_like(W)
    mb, vb = np.zeros_like(b), np.zeros_like(b)
    Wavg, bavg, n_avg = np.zeros_like(W), np.zeros_like(b), 0
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    eye = np.eye(k, dtype=np.float32)
    t = 0
    def batches(epoch: int):
        """Mini-batches of one pass: from the rows transformed once when they are in memory, else block by block."""
        if Z is not None:
            order = shuffler.permutation(n)
            for start in range(0, n, BATCH_ROWS):
                idx = order[start:start + BATCH_ROWS]
                yield Z[idx], yz[idx]
            return
        for Xc, yc in source.chunks(rows, seed=seed * 1_000_003 + epoch):
            Xc = np.asarray(Xc.reshape(len(Xc), -1) if transform is None else transform(Xc), dtype=np.float32)
            for start in range(0, len(yc), BATCH_ROWS):
                yield Xc[start:start + BATCH_ROWS], yc[start:start + BATCH_ROWS]

    Z = yz = None
    if isinstance(source, ArraySource) and (max_bytes is None or n * d * 4 <= max_bytes):
        parts = [np.asarray(X.reshape(len(X), -1) if transform is None else transform(X), dtype=np.float32)
                 for X, _ in source.chunks(rows)]
        Z = np.concatenate(parts) if parts else np.zeros((0, d), np.float32)
        yz = source.labels[rows]
    shuffler = np.random.default_rng(seed)
    for epoch in range(epochs):
        averaging = epoch >= epochs - AVERAGE_EPOCHS
        for xb, yb in batches(epoch):
            z = xb @ W + b
            wb = cw[yb][:, None]
            if loss == "log":
                z -= z.max(axis=1, keepdims=True)
                p = np.exp(z)
                p /= p.sum(axis=1, keepdims=True)
                g = (p - eye[yb]) * (wb / len(yb))
            else:
                sign = 2.0 * eye[yb] - 1.0
                margin = np.maximum(0.0, 1.0 - sign * z)
                g = (-2.0 * sign * margin) * (wb / len(yb))
            gW = xb.T @ g
            gW += lam * W
            gb = g.sum(axis=0)
            t += 1
            lr = LEARNING_RATE / math.sqrt(1.0 + t / DECAY_STEPS)
            mW *= beta1
            mW += (1 - beta1) * gW
            vW *= beta2
            vW += (1 - beta2) * gW * gW
            mb = beta1 * mb + (1 - beta1) * gb
            vb = beta2 * vb + (1 - beta2) * gb * gb
            c1, c2 = 1 - beta1 ** t, 1 - beta2 ** t
            W -= (lr / c1) * mW / (np.sqrt(vW / c2) + eps)
            b -= (lr / c1) * mb / (np.sqrt(vb / c2) + eps)
            if averaging:
                Wavg += W
                bavg += b
                n_avg += 1
    if n_avg:
        W, b = Wavg / n_avg, bavg / n_avg
    return W.astype(np.float32), b.astype(np.float32)


def logistic_regression(W: np.ndarray, b: np.ndarray, classes: np.ndarray, C: float,
                        class_weight: str | None = None) -> LogisticRegression:
    """A fitted multinomial :class:`~sklearn.linear_model.LogisticRegression` with weights ``W`` (d, k)."""
    est = LogisticRegression(C=float(C), class_weight=class_weight)
    classes = np.asarray(classes)
    if len(classes) == 2:  # scikit-learn's binary form: one column, the log-odds of classes[1]
        est.coef_ = np.asarray((W[:, 1] - W[:, 0])[None, :], dtype=np.float64)
        est.intercept_ = np.asarray([b[1] - b[0]], dtype=np.float64)
    else:
        est.coef_ = np.asarray(W.T, dtype=np.float64)
        est.intercept_ = np.asarray(b, dtype=np.float64)
    est.classes_ = classes
    est.n_features_in_ = int(W.shape[0])
    est.n_iter_ = np.asarray([0], dtype=np.int32)
    return est


def linear_svc(W: np.ndarray, b: np.ndarray, classes: np.ndarray, C: float,
               class_weight: str | None = None) -> LinearSVC:
    """A fitted one-vs-rest :class:`~sklearn.svm.LinearSVC` with weights ``W`` (d, k)."""
    est = LinearSVC(C=float(C), class_weight=class_weight)
    classes = np.asarray(classes)
    if len(classes) == 2:  # binary: one decision function, positive for classes[1]
        est.coef_ = np.asarray(((W[:, 1] - W[:, 0]) / 2)[None, :], dtype=np.float64)
        est.intercept_ = np.asarray([(b[1] - b[0]) / 2], dtype=np.float64)
    else:
        est.coef_ = np.asarray(W.T, dtype=np.float64)
        est.intercept_ = np.asarray(b, dtype=np.float64)
    est.classes_ = classes
    est.n_features_in_ = int(W.shape[0])
    est.n_iter_ = 0
    return est


def standard_scaler(moments: ClassMoments) -> StandardScaler:
    """A fitted :class:`~sklearn.preprocessing.StandardScaler` from the pooled moments of the training rows."""
    mean, var = moments.pooled()
    scaler = StandardScaler()
    scaler.mean_ = mean
    scaler.var_ = var
    scale = np.sqrt(var)
    scale[scale < 10 * np.finfo(scale.dtype).eps] = 1.0  # scikit-learn's rule for constant features
    scaler.scale_ = scale
    scaler.n_samples_seen_ = int(round(moments.total_count))
    scaler.n_features_in_ = int(len(mean))
    return scaler


def nearest_centroid(moments: ClassMoments, scaler: StandardScaler, classes: np.ndarray) -> NearestCentroid:
    """A fitted ``NearestCentroid(priors="empirical")`` on standardised features, from per-class moments.

    Gives the attributes :meth:`sklearn.neighbors.NearestCentroid.fit` computes on ``scaler.transform(X)``:
    class centroids, the within-class standard deviation (pooled over classes, ``n - k`` degrees of freedom) and
    the empirical priors.
    """
    est = NearestCentroid(priors="empirical")
    scale = scaler.scale_
    count = moments.count
    n = float(count.sum())
    k = len(count)
    centroids = (moments.mean - scaler.mean_) / scale
    within = np.sqrt(moments.m2.sum(axis=0) / (scale ** 2) / max(1.0, n - k))
    est.classes_ = np.asarray(classes)
    est.class_prior_ = count / n
    est.centroids_ = centroids
    est.within_class_std_dev_ = within
    overall = (count[:, None] * centroids).sum(axis=0) / n
    m = np.sqrt(np.maximum(1.0 / np.maximum(count, 1) - 1.0 / n, 0.0))[:, None]
    s = within + np.median(within)
    est.deviations_ = (centroids - overall) / np.where(m * s == 0, 1.0, m * s)
    est.n_features_in_ = int(centroids.shape[1])
    return est
