"""Metrics of one head on one split, computed from true classes and predicted probabilities."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, log_loss,
                             precision_recall_curve, precision_recall_fscore_support, roc_auc_score, roc_curve,
                             top_k_accuracy_score)

from pipeline.stats import metric_intervals

__all__ = ["compute_metrics", "mistakes", "MAX_CURVE_POINTS", "MAX_MISTAKES"]

MAX_CURVE_POINTS = 200
MAX_MISTAKES = 12


def _downsample(*arrays: np.ndarray, limit: int = MAX_CURVE_POINTS) -> list[list[float]]:
    n = len(arrays[0])
    idx = np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(int)) if n else np.zeros(0, int)
    return [[float(v) for v in np.asarray(a)[idx]] for a in arrays]


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str],
                    seed: int | None = None) -> dict[str, Any]:
    """Metrics of one split from true class indices and class probabilities.

    Parameters
    ----------
    y_true : ndarray of int, shape (n,)
        True class indices into ``class_names``.
    proba : ndarray of shape (n, n_classes)
        Probabilities, columns in ``class_names`` order. The prediction is the most probable class.
    class_names : sequence of str
    seed : int, optional
        When given, ``intervals`` holds the 95 % interval of each metric (:func:`pipeline.stats.metric_intervals`,
        its bootstraps seeded with it).

    Returns
    -------
    dict
        ``n``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``log_loss``, ``top5_accuracy`` (5 or more
        classes), ``roc_auc``, ``roc`` and ``pr`` (binary; the positive class is ``class_names[1]``; ``roc_auc``
        is ``None`` when the split holds one class only), ``confusion_matrix`` (rows true, columns predicted) and
        ``per_class`` precision/recall/F1/support. Curves hold at most 200 points.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    k = len(class_names)
    labels = np.arange(k)
    pred = np.argmax(proba, axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", UserWarning)
        out: dict[str, Any] = {
            "n": int(len(y_true)),
            "accuracy": float(accuracy_score(y_true, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
            "macro_f1": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
            "log_loss": float(log_loss(y_true, np.clip(proba, 1e-15, 1.0), labels=labels)),
        }
        if k >= 5:
            out["top5_accuracy"] = float(top_k_accuracy_score(y_true, proba, k=5, labels=labels))
        if k == 2:
            both = len(np.unique(y_true)) == 2
            out["roc_auc"] = float(roc_auc_score(y_true, proba[:, 1])) if both else None
            if both:
                fpr, tpr, _ = roc_curve(y_true, proba[:, 1])
                prec, rec, _ = precision_recall_curve(y_true, proba[:, 1])
                f, t = _downsample(fpr, tpr)
                p, r = _downsample(prec, rec)
                out["roc"] = {"fpr": f, "tpr": t}
                out["pr"] = {"precision": p, "recall": r}
            else:
                out["roc"] = {"fpr": [], "tpr": []}
                out["pr"] = {"precision": [], "recall": []}
        out["confusion_matrix"] = confusion_matrix(y_true, pred, labels=labels).astype(int).tolist()
        p, r, f, s = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    out["per_class"] = {str(name): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                    "support": int(s[i])} for i, name in enumerate(class_names)}
    if seed is not None:
        intervals = metric_intervals(y_true, proba, k, int(seed))
        out["intervals"] = {name: iv for name, iv in intervals.items() if name in out}
    return out


def mistakes(y_true: np.ndarray, proba: np.ndarray, paths: Sequence[str], splits: Sequence[str],
             class_names: Sequence[str], limit: int = MAX_MISTAKES) -> list[dict[str, Any]]:
    """The most confident wrong predictions, most confident first.

    Parameters
    ----------
    y_true : ndarray of int
    proba : ndarray of shape (n, n_classes)
    paths, splits : sequence of str
        Relative path and split of each row.
    class_names : sequence of str
    limit : int, default=12

    Returns
    -------
    list of dict
        ``{"path", "split", "true", "pred", "prob"}`` where ``prob`` is the probability of the wrong class.
    """
    pred = np.argmax(proba, axis=1)
    wrong = np.flatnonzero(pred != np.asarray(y_true))
    conf = proba[wrong, pred[wrong]]
    order = wrong[np.argsort(-conf, kind="stable")][:limit]
    return [{"path": str(paths[i]), "split": str(splits[i]), "true": str(class_names[int(y_true[i])]),
             "pred": str(class_names[int(pred[i])]), "prob": float(proba[i, pred[i]])} for i in order]
