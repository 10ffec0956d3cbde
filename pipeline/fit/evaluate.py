"""One head on one feature set: search, refit on train, evaluate on the final splits (see :mod:`.protocol`)."""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.fit.heads import HeadContext, HeadSpec, flatten_features
from pipeline.fit.metrics import compute_metrics, mistakes
from pipeline.fit.protocol import Candidate, Protocol, _quiet_fit_warnings, best_candidate, search
from pipeline.results import jsonable

__all__ = ["HeadResult", "evaluate_head", "make_context", "proba_in_class_order"]


@dataclass
class HeadResult:
    """Everything measured about one head on one feature set (JSON parts via :meth:`to_json`)."""

    head: str
    params: dict[str, Any]
    selection_split: str
    selection_score: float
    search: list[Candidate]
    fit_seconds: float
    predict_ms_per_1000: float
    metrics: dict[str, dict[str, Any]]
    history: dict[str, list[float]] | None
    mistakes: list[dict[str, Any]]
    estimator: Any
    final_rows: np.ndarray
    proba: np.ndarray

    def to_json(self) -> dict[str, Any]:
        """The per-head fields of a results.json entry (without key, cache and file names)."""
        return {"head": self.head, "params": jsonable(self.params), "selection_split": self.selection_split,
                "search": [c.to_json() for c in self.search], "fit_seconds": float(self.fit_seconds),
                "predict_ms_per_1000": float(self.predict_ms_per_1000), "metrics": self.metrics,
                "history": self.history, "mistakes": self.mistakes}


def proba_in_class_order(estimator: Any, X: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """``predict_proba`` with columns reordered to ``class_names`` (the estimator was fitted on class names)."""
    raw = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    index = {str(c): i for i, c in enumerate(class_names)}
    out = np.zeros((len(raw), len(class_names)), dtype=np.float64)
    for j, c in enumerate(estimator.classes_):
        out[:, index[str(c)]] = raw[:, j]
    return out


def make_context(X: np.ndarray, labels: np.ndarray, splits: np.ndarray, n_classes: int, seed: int,
                 class_weight: str | None) -> HeadContext:
    """The :class:`HeadContext` of the final fit (the training split)."""
    train = splits == "train"
    counts = np.bincount(np.asarray(labels)[train], minlength=n_classes)
    shape = tuple(int(s) for s in X.shape[1:])
    return HeadContext(n_features=int(np.prod(shape)) if shape else 1, n_classes=n_classes, n_rows=int(train.sum()),
                       min_class_rows=int(counts.min()), class_weight=class_weight, seed=int(seed),
                       input_shape=shape)


def _blas_threads(spec: HeadSpec):
    """One BLAS thread for scikit-learn heads, whose many small products lose more to thread hand-offs than they
    gain (a logistic-regression sweep on 2,400 x 1,280 features measured 10x slower with two threads on a busy
    2-core machine); the Keras head keeps TensorFlow's own threading."""
    if spec.kind != "sklearn":
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def evaluate_head(spec: HeadSpec, X: np.ndarray, labels: np.ndarray, splits: np.ndarray,
                  class_names: Sequence[str], paths: Sequence[str], protocol: Protocol,
                  folds: list[tuple[np.ndarray, np.ndarray]], seed: int = 0,
                  class_weight: str | None = None) -> HeadResult:
    """Search, refit on train, and evaluate one head on the final splits, by the module's protocol.

    Parameters
    ----------
    spec : HeadSpec
    X : ndarray
        Features of all rows, ``(n, d)`` or ``(n, h, w, c)`` (flattened for heads that take 2-D input).
    labels : ndarray of int
        Class index of each row.
    splits : ndarray of str
        Split of each row (from :func:`plan_protocol`).
    class_names, paths : sequence of str
    protocol : Protocol
    folds : list of (ndarray, ndarray)
        From :func:`selection_folds` (shared by all heads of a run, so they are compared on the same folds).
    seed : int
    class_weight : {None, "balanced"}

    Returns
    -------
    HeadResult
    """
    Xh = X if spec.takes_maps else flatten_features(X)
    if Xh.dtype != np.float32:
        Xh = Xh.astype(np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    names = np.asarray([str(c) for c in class_names])
    y = names[labels]
    ctx = make_context(Xh, labels, splits, len(class_names), seed, class_weight)

    train = np.flatnonzero(splits == "train")
    final_rows = np.flatnonzero(np.isin(splits, protocol.final_splits))
    with _blas_threads(spec), warnings.catch_warnings():
        _quiet_fit_warnings()
        cands = search(spec, ctx, Xh, y, folds)
        best = best_candidate(cands)
        chosen = dict(cands[best].params)

        est = spec.build(ctx, chosen, False)
        t0 = time.perf_counter()
        est.fit(Xh[train], y[train])
        fit_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        proba = proba_in_class_order(est, Xh[final_rows], class_names)
        elapsed = time.perf_counter() - t0
    ms_per_1000 = elapsed * 1000.0 * 1000.0 / max(1, len(final_rows))

    metrics = {}
    for s in protocol.final_splits:
        m = splits[final_rows] == s
        metrics[s] = compute_metrics(labels[final_rows][m], proba[m], class_names)
    rep = splits[final_rows] == protocol.report_split
    wrong = mistakes(labels[final_rows][rep], proba[rep], [paths[i] for i in final_rows[rep]],
                     list(splits[final_rows][rep]), class_names)
    history = None
    if hasattr(est, "history_"):
        history = {k: [float(v) for v in est.history_.get(k, [])]
                   for k in ("loss", "val_loss", "accuracy", "val_accuracy")}
    params = {**spec.fixed(ctx), **chosen}
    if hasattr(est, "n_epochs_"):
        params.update({"epochs_run": int(est.n_epochs_), "best_epoch": int(est.best_epoch_)})
    return HeadResult(head=spec.name, params=params, selection_split=protocol.selection,
                      selection_score=cands[best].mean, search=cands, fit_seconds=fit_seconds,
                      predict_ms_per_1000=ms_per_1000, metrics=metrics, history=history, mistakes=wrong,
                      estimator=est, final_rows=final_rows, proba=proba)
