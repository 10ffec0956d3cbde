"""How sure a number is: intervals, paired tests and multiple-comparison correction (pure functions, no I/O).

Every rule here is the one the results, the pick box, ``compare`` and ``bench/pick.py`` use:

- **Accuracy** (a proportion of images right): Wilson score interval, 95 % (scipy's
  ``binomtest(k, n).proportion_ci(method="wilson")``). It keeps its coverage near 95 % at small ``n`` and at
  accuracies near 1, where the normal ("Wald") interval collapses.
- **Balanced accuracy, macro-F1, log-loss** (functions of the whole split): a seeded percentile bootstrap over
  images, :data:`N_RESAMPLES` resamples (``scipy.stats.bootstrap``, paired: an image's true class and prediction are
  resampled together). **ROC AUC** (binary): the same with positives and negatives resampled separately (a
  stratified bootstrap, so no resample lacks a class).
- **Two heads on the same images**: the exact McNemar test (a two-sided binomial test of the discordant images, ``b``
  only the first right, ``c`` only the second right, ``p = 1`` when ``b + c = 0``) and a paired bootstrap interval of
  the accuracy difference (images resampled once for both heads). Tests over several heads are Holm-corrected.
- **Two heads on the same cross-validation folds**: the corrected resampled t-test of Nadeau & Bengio (2003), whose
  variance ``(1/J + n_test/n_train) s^2`` accounts for the overlap of the folds' training sets (a plain paired t-test
  over folds is overconfident).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["CONFIDENCE", "N_RESAMPLES", "BOOTSTRAP_METHOD", "wilson_interval", "bootstrap_interval",
           "metric_intervals", "mcnemar_exact", "holm", "paired_difference", "corrected_paired_t", "cv_se",
           "proportion_se", "selection_se", "min_detectable_difference", "interval_spec", "per_image_log_loss"]

CONFIDENCE = 0.95
"""Confidence level of every interval."""

N_RESAMPLES = 1000
"""Bootstrap resamples per interval: the percentile interval's end points then move by well under a point between
seeds on splits of 50 or more images, at a cost of milliseconds per head."""

BOOTSTRAP_METHOD = "percentile"
"""scipy.stats.bootstrap's method. BCa needs a jackknife over every image (n extra evaluations per interval), too
slow for splits of 100,000 images; the percentile interval needs none."""

_BATCH_ELEMENTS = 1 << 22
"""Resampled values generated at a time (bounds the bootstrap's memory at tens of MB, whatever the split's size)."""


def interval_spec(seed: int) -> dict[str, Any]:
    """How the intervals of a run were computed (results.json's ``statistics``)."""
    return {"confidence": CONFIDENCE, "accuracy": "wilson",
            "bootstrap": {"method": BOOTSTRAP_METHOD, "n_resamples": N_RESAMPLES, "seed": int(seed), "unit": "image",
                          "metrics": ["balanced_accuracy", "macro_f1", "log_loss", "roc_auc (stratified by class)"]},
            "paired": {"final_split": "exact McNemar on the discordant images, Holm-corrected over the heads "
                                      "compared; paired bootstrap interval of the accuracy difference",
                       "cv": "Nadeau-Bengio corrected resampled t-test over the folds",
                       "val": "paired bootstrap over the val images"}}


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> list[float] | None:
    """Wilson score interval of ``k`` successes in ``n`` trials, or None when ``n`` is 0.

    Parameters
    ----------
    k, n : int
    confidence : float, default 0.95

    Returns
    -------
    [low, high] or None
    """
    from scipy.stats import binomtest

    k, n = int(k), int(n)
    if n <= 0:
        return None
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


def proportion_se(p: float, n: int) -> float:
    """Standard error of a proportion ``p`` of ``n`` images, ``sqrt(p (1 - p) / n)``: the exact standard deviation
    of the bootstrap distribution of the mean of ``n`` zeros and ones."""
    return float(math.sqrt(max(0.0, p * (1.0 - p)) / n)) if n > 0 else float("nan")


def _rng(seed: int | Sequence[int]) -> np.random.Generator:
    return np.random.default_rng(list(seed) if isinstance(seed, (list, tuple)) else int(seed))


def bootstrap_interval(statistic: Callable[..., np.ndarray], data: Sequence[np.ndarray], seed: int | Sequence[int],
                       paired: bool = True, n_resamples: int = N_RESAMPLES,
                       confidence: float = CONFIDENCE) -> list[float] | None:
    """Percentile bootstrap interval of ``statistic`` (vectorised: ``statistic(*arrays, axis=-1)``).

    Parameters
    ----------
    statistic : callable
        Takes the resampled arrays (resamples along the last axis) and ``axis``; returns one value per resample.
    data : sequence of ndarray
        One-dimensional samples. ``paired=True``: aligned by image (resampled together).
    seed : int or sequence of int
        Seed of the resampling (the same seed gives the same interval).
    paired : bool, default True
    n_resamples : int
    confidence : float

    Returns
    -------
    [low, high] or None
        None when a sample has fewer than two values or the statistic is undefined on some resample.
    """
    from scipy.stats import bootstrap

    arrays = [np.asarray(a) for a in data]
    if any(len(a) < 2 for a in arrays):  # one image: no spread to resample
        return None
    n = max(len(a) for a in arrays)
    batch = max(1, min(int(n_resamples), _BATCH_ELEMENTS // max(1, n)))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        res = bootstrap(tuple(arrays), statistic, n_resamples=int(n_resamples), batch=batch, vectorized=True,
                        paired=paired, confidence_level=confidence, method=BOOTSTRAP_METHOD, rng=_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return [lo, hi]


# ---- vectorised metrics (resamples along the last axis) --------------------------------------------------------


def _class_counts(y: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per resample and class: true positives, support and predicted count, each ``(B, k)``."""
    n = y.shape[-1]
    y2 = y.reshape(-1, n).astype(np.int64)
    p2 = pred.reshape(-1, n).astype(np.int64)
    b = len(y2)
    off = (np.arange(b, dtype=np.int64) * k)[:, None]
    yi, pi = (y2 + off).ravel(), (p2 + off).ravel()
    support = np.bincount(yi, minlength=b * k).reshape(b, k)
    tp = np.bincount(yi, weights=(y2 == p2).ravel(), minlength=b * k).reshape(b, k)
    predicted = np.bincount(pi, minlength=b * k).reshape(b, k)
    return tp, support, predicted


def _balanced_accuracy(k: int) -> Callable[..., np.ndarray]:
    def stat(y: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
        tp, support, _ = _class_counts(y, pred, k)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(support > 0, tp / np.maximum(support, 1), np.nan)
        return np.nanmean(recall, axis=-1).reshape(y.shape[:-1])
    return stat


def _macro_f1(k: int) -> Callable[..., np.ndarray]:
    def stat(y: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
        tp, support, predicted = _class_counts(y, pred, k)
        denom = support + predicted
        f1 = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)
        return f1.mean(axis=-1).reshape(y.shape[:-1])
    return stat


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _auc(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mann-Whitney AUC of positive vs negative scores (ties count a half)."""
    from scipy.stats import rankdata

    n1, n2 = pos.shape[-1], neg.shape[-1]
    ranks = rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)
    return (ranks[..., :n1].sum(axis=-1) - n1 * (n1 + 1) / 2.0) / (n1 * n2)


def per_image_log_loss(y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Each image's log-loss as scikit-learn's ``log_loss`` computes it (probabilities clipped to [1e-15, 1] and
    renormalised per row), so that their mean is that metric."""
    p = np.clip(np.asarray(proba, dtype=np.float64), 1e-15, 1.0)
    p = p / p.sum(axis=1, keepdims=True)
    return -np.log(p[np.arange(len(p)), np.asarray(y_true, dtype=np.int64)])


def metric_intervals(y_true: np.ndarray, proba: np.ndarray, n_classes: int, seed: int) -> dict[str, list[float] | None]:
    """95 % intervals of one split's metrics (see the module docstring for the method of each).

    Parameters
    ----------
    y_true : ndarray of int, shape (n,)
    proba : ndarray, shape (n, n_classes)
        The prediction is the most probable class (as :func:`pipeline.fit.metrics.compute_metrics`).
    n_classes : int
    seed : int
        Seed of the bootstraps (each metric draws from its own stream of it).

    Returns
    -------
    dict
        ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``log_loss``, and ``top5_accuracy`` (5 or more classes)
        and ``roc_auc`` (2 classes, None when the split holds one class) when those metrics exist.
    """
    y = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    pred = np.argmax(proba, axis=1) if len(proba) else np.zeros(0, np.int64)
    n = len(y)
    out: dict[str, list[float] | None] = {
        "accuracy": wilson_interval(int((pred == y).sum()), n),
        "balanced_accuracy": bootstrap_interval(_balanced_accuracy(n_classes), (y, pred), (seed, 1)),
        "macro_f1": bootstrap_interval(_macro_f1(n_classes), (y, pred), (seed, 2)),
        "log_loss": bootstrap_interval(_mean, (per_image_log_loss(y, proba),), (seed, 3)) if n else None,
    }
    if n_classes >= 5 and n:
        top5 = np.argsort(-proba, axis=1, kind="stable")[:, :5]
        out["top5_accuracy"] = wilson_interval(int((top5 == y[:, None]).any(axis=1).sum()), n)
    if n_classes == 2:
        pos, neg = proba[y == 1, 1], proba[y == 0, 1]
        out["roc_auc"] = (bootstrap_interval(_auc, (pos, neg), (seed, 4), paired=False)
                          if len(pos) and len(neg) else None)
    return out


# ---- paired comparisons ----------------------------------------------------------------------------------------


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of ``b`` vs ``c`` discordant images (1.0 when there are none).

    It is the two-sided binomial test of ``min(b, c)`` successes in ``b + c`` trials at 1/2:
    ``min(1, 2 * P(X <= min(b, c)))``.
    """
    from scipy.stats import binomtest

    b, c = int(b), int(c)
    if b + c == 0:
        return 1.0
    return float(min(1.0, binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order (each capped at 1, never below an earlier one)."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return [float(v) for v in adjusted]


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, seed: int | Sequence[int]) -> dict[str, Any]:
    """Accuracy of ``a`` minus accuracy of ``b`` on the same images, with the exact McNemar test and a paired
    bootstrap interval (images resampled once for both).

    Parameters
    ----------
    correct_a, correct_b : ndarray of bool, shape (n,)
        Whether each head got each image right, aligned by image.
    seed : int or sequence of int

    Returns
    -------
    dict
        ``n``, ``a_only_right``, ``b_only_right``, ``p_value``, ``delta`` (a - b), ``delta_interval`` ([low, high]
        or None) and ``tied`` (the interval contains 0).
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError("internal: paired correctness vectors of different lengths")
    n = len(a)
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    delta = float((a_only - b_only) / n) if n else float("nan")
    if n and a_only + b_only == 0:
        interval: list[float] | None = [0.0, 0.0]  # every resample has the same zero difference
    else:
        interval = bootstrap_interval(_mean, (a.astype(np.float64) - b.astype(np.float64),), seed)
    tied = interval is None or interval[0] <= 0.0 <= interval[1]
    return {"n": n, "a_only_right": a_only, "b_only_right": b_only, "p_value": mcnemar_exact(a_only, b_only),
            "delta": delta, "delta_interval": interval, "tied": bool(tied)}


def corrected_paired_t(scores_a: Sequence[float], scores_b: Sequence[float], test_train_ratio: float) -> dict[str, Any]:
    """Nadeau-Bengio corrected resampled t-test of ``a - b`` over paired fold scores.

    Parameters
    ----------
    scores_a, scores_b : sequence of float
        One score per fold, the same folds in the same order.
    test_train_ratio : float
        Scored over fitted images per fold (``1 / (k - 1)`` for k-fold cross-validation).

    Returns
    -------
    dict
        ``delta`` (mean difference), ``se`` (corrected standard error), ``p_value`` (two-sided, t with J - 1 degrees
        of freedom), ``folds``. With one fold, or no variation between folds, ``se`` is 0 and ``p_value`` is 1 when
        the difference is 0 and 0 otherwise.
    """
    from scipy.stats import t as t_dist

    d = np.asarray(scores_a, dtype=np.float64) - np.asarray(scores_b, dtype=np.float64)
    j = len(d)
    if j == 0:
        raise ValueError("internal: no fold scores to compare")
    mean = float(d.mean())
    var = float(d.var(ddof=1)) if j > 1 else 0.0
    se = math.sqrt((1.0 / j + float(test_train_ratio)) * var)
    if se == 0.0:
        p = 1.0 if abs(mean) < 1e-12 else 0.0
    else:
        p = float(2.0 * t_dist.sf(abs(mean) / se, j - 1))
    return {"delta": mean, "se": se, "p_value": min(1.0, p), "folds": j}


def cv_se(scores: Sequence[float], test_train_ratio: float) -> float:
    """Standard error of a cross-validation mean with the Nadeau-Bengio correction,
    ``sqrt((1/J + n_test/n_train) s^2)`` (0 with a single fold)."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) < 2:
        return 0.0
    return float(math.sqrt((1.0 / len(s) + float(test_train_ratio)) * s.var(ddof=1)))


def selection_se(scores: Sequence[float], scored_rows: int, fit_rows: int) -> float:
    """Standard error of a selection score: over cross-validation folds with the Nadeau-Bengio correction
    (:func:`cv_se`, ``n_test / n_train`` = ``scored_rows / fit_rows`` per fold), or, for one score on a val split,
    the binomial standard error over its ``scored_rows`` images (:func:`proportion_se`).

    Parameters
    ----------
    scores : sequence of float
        One accuracy per fold (one on val).
    scored_rows : int
        Images scored in all folds together.
    fit_rows : int
        Images fitted in all folds together.
    """
    s = [float(v) for v in scores]
    if not s:
        return float("nan")
    if len(s) > 1:
        return cv_se(s, scored_rows / max(1, fit_rows))
    return proportion_se(s[0], int(scored_rows))


def min_detectable_difference(n: int, alpha: float = 0.05) -> dict[str, Any]:
    """The smallest accuracy difference that an exact McNemar test on ``n`` images can call at ``alpha``.

    A difference is only ever called when at least ``m`` images are discordant and all go the same way, with ``m``
    the smallest count whose two-sided p-value ``2 / 2^m`` is below ``alpha`` (6 at 0.05); so no difference below
    ``m / n`` can be called, however the images fall.

    Returns
    -------
    dict
        ``images`` (m) and ``delta`` (m / n; None when n is 0).
    """
    m = 1
    while mcnemar_exact(m, 0) >= alpha:
        m += 1
    return {"images": m, "delta": (m / n) if n > 0 else None}
