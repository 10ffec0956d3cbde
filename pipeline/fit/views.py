"""Augmented views in fitting: which view mode a head uses, chosen on the selection split like a hyperparameter.

A cache extracted with ``extract --views K`` holds, besides every image's centre view, the features of K augmented
views of it (:mod:`pipeline.views`). A head can use them in four **view modes**:

``none``
    Centre views only (what a cache without views gives).
``train``
    Its training rows are augmented by their views' features (each view with its image's label).
``tta``
    Test-time views: its probability for an image is the mean of its probabilities for the centre view and each of
    that image's K views.
``both``
    ``train`` and ``tta``.

Rule (docs/protocol.md, "Views")
--------------------------------
1. The hyperparameters are searched on centre views (mode ``none``), as without views.
2. At the chosen candidate, every offered mode is scored on the same selection folds (the cross-validation folds
   or ``val``): per fold, the head is fitted (as it is refitted for good, with ``predict_proba``) on the fold's
   training images without views and, when ``train`` is offered, once more with their views; the fold's scored
   images are predicted from the centre view (``none``, ``train``) and averaged over centre + views (``tta``,
   ``both``). Folds are over images: a view is only ever trained on when its image is on the fitting side of the
   fold, and no view of a scored (or test) image is ever trained on.
3. The mode with the highest mean accuracy wins; ties go to the simpler mode, in the order ``none``, ``train``,
   ``tta``, ``both``. The head is then refitted on the training split in that mode (and, for the record, without
   views) and the final splits are predicted both ways: results.json keeps the chosen mode's metrics as the head's
   metrics and the centre-view metrics beside them, so the report can say what views added.

What is offered: ``tta`` when the head's estimator has ``predict_proba`` (every registered head has; a head without
it is offered no test-time views, and the reason is recorded); ``train`` when the head fits in memory in its exact
form at (K + 1) times the training rows (otherwise the exact form's row limit would be crossed by the views alone;
recorded). Heads whose features are streamed from the cache, and spatial-map features (views of maps are never
stored), use no views, with the reason recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.fit.stream import ArraySource
from pipeline.results import first_best

__all__ = ["VIEW_MODES", "ViewChoice", "ViewsSource", "uses_train", "uses_tta", "augmented_source", "tta_proba", "offered_modes",
           "best_mode", "score_view_modes"]

VIEW_MODES = ("none", "train", "tta", "both")
"""The view modes, simplest first (the order that breaks ties)."""


def uses_train(mode: str) -> bool:
    """Whether ``mode`` trains on the views of the training rows."""
    return mode in ("train", "both")


def uses_tta(mode: str) -> bool:
    """Whether ``mode`` averages probabilities over each image's views."""
    return mode in ("tta", "both")


@dataclass
class ViewChoice:
    """What a head did with the cache's views (the ``views`` object of its results.json entry).

    Attributes
    ----------
    available : int
        Augmented views per image in the cache (K).
    spec : dict
        The cache's view spec (``n``, ``kinds``, ``seed``, ``rule``), what ``predict`` renders for new images.
    offered : list of str
        Modes scored (``["none"]`` when views could not be used).
    chosen : str
    notes : list of str
        Why a mode was not offered (one line each).
    selection : dict
        Per offered mode: ``mean``, ``std`` and the per-fold ``scores`` on the selection split.
    final : dict
        Per final split: the chosen mode's and the centre-view model's ``accuracy``, ``balanced_accuracy``,
        ``macro_f1`` and ``log_loss`` (``with`` and ``without``), and their differences (``added``: with minus
        without).
    seconds : float
        Time spent scoring the modes and on the extra refit.
    """

    available: int
    spec: dict[str, Any]
    offered: list[str] = field(default_factory=lambda: ["none"])
    chosen: str = "none"
    notes: list[str] = field(default_factory=list)
    selection: dict[str, dict[str, Any]] = field(default_factory=dict)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The ``views`` object of a results.json entry."""
        return {"available": int(self.available), "spec": dict(self.spec), "offered": list(self.offered),
                "chosen": self.chosen, "notes": list(self.notes), "selection": self.selection,
                "final": self.final, "seconds": float(self.seconds)}


class ViewsSource(ArraySource):
    """An :class:`ArraySource` of centre rows and view rows, with the image of each row (``groups``)."""

    def __init__(self, X: np.ndarray, labels: np.ndarray, classes: Sequence[str], groups: np.ndarray) -> None:
        super().__init__(X, labels, classes)
        self.groups = np.asarray(groups, dtype=np.int64)


def augmented_source(X: np.ndarray, V: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> "ViewsSource":
    """Centre rows followed by their views, each view with its image's label.

    Parameters
    ----------
    X : ndarray, shape (m, d)
        Centre views of the training images.
    V : ndarray, shape (m, K, d)
        Their augmented views.
    labels : ndarray of int, shape (m,)
        Class index (into ``classes``) of each image.
    classes : sequence of str

    Returns
    -------
    ViewsSource
        ``m * (K + 1)`` rows; its ``groups`` attribute gives each row's image (0..m-1), so that a head holding out
        rows of its own (the dense head's early stopping) can keep an image's views with it.
    """
    m, k = V.shape[0], V.shape[1]
    Xa = np.concatenate([np.asarray(X, np.float32).reshape(m, -1), np.asarray(V, np.float32).reshape(m * k, -1)])
    ya = np.concatenate([labels, np.repeat(labels, k)]).astype(np.int64)
    return ViewsSource(Xa, ya, classes, np.concatenate([np.arange(m), np.repeat(np.arange(m), k)]))


def tta_proba(proba: Callable[[np.ndarray], np.ndarray], X: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Mean of ``proba`` over the centre view ``X`` (m, d) and the views ``V`` (m, K, d) of each image."""
    m, k = V.shape[0], V.shape[1]
    out = np.asarray(proba(X), dtype=np.float64).copy()
    if k:
        pv = np.asarray(proba(np.asarray(V).reshape(m * k, -1)), dtype=np.float64)
        out += pv.reshape(m, k, -1).sum(axis=1)
    return out / (k + 1)


def offered_modes(n_views: int, has_proba: bool, train_ok: bool, train_reason: str = "") -> tuple[list[str], list[str]]:
    """The modes a head is scored in, and why the others are not offered.

    Parameters
    ----------
    n_views : int
        Views per image available to the head (0: none usable).
    has_proba : bool
        Whether the head's final estimator has ``predict_proba`` (needed to average over views).
    train_ok : bool
        Whether the head can be fitted on the training rows and their views.
    train_reason : str
        Why not, when ``train_ok`` is false.
    """
    if n_views <= 0:
        return ["none"], []
    modes, notes = ["none"], []
    if train_ok:
        modes.append("train")
    else:
        notes.append(f"training views not offered: {train_reason}")
    if has_proba:
        modes.append("tta")
        if train_ok:
            modes.append("both")
    else:
        notes.append("test-time views not offered: the head has no predict_proba to average")
    return modes, notes


def best_mode(scores: dict[str, list[float]]) -> str:
    """The mode of highest mean score; ties go to the simplest (order of :data:`VIEW_MODES`)."""
    modes = [m for m in VIEW_MODES if m in scores]
    return modes[first_best([np.mean(scores[m]) for m in modes])]


def score_view_modes(fit: Callable[[ArraySource], Any], proba: Callable[[Any, np.ndarray], np.ndarray],
                     X: np.ndarray, V: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                     folds: list[tuple[np.ndarray, np.ndarray]], modes: Sequence[str]) -> dict[str, list[float]]:
    """Accuracy of every mode in ``modes`` on every (fit images, scored images) fold.

    Parameters
    ----------
    fit : callable
        ``fit(source) -> estimator``: the head at its chosen hyperparameters, fitted on a source's rows.
    proba : callable
        ``proba(estimator, X) -> (m, n_classes)`` probabilities in ``classes`` order.
    X : ndarray, shape (n, d)
        Centre views of the rows the folds index into.
    V : ndarray, shape (n, K, d)
        Their views (same order).
    labels : ndarray of int, shape (n,)
        Class index of each row.
    classes : sequence of str
    folds : list of (ndarray, ndarray)
        Positions in ``X`` of each fold's fitting images and scored images (disjoint).
    modes : sequence of str
        The offered modes (``none`` always among them).

    Returns
    -------
    dict of str to list of float
        Per mode, one accuracy per fold.
    """
    out: dict[str, list[float]] = {m: [] for m in modes}
    for fit_idx, score_idx in folds:
        if len(np.intersect1d(fit_idx, score_idx)):
            raise ValueError("internal: a fold scores images it fits on")
        ys = labels[score_idx]
        Xs, Vs = X[score_idx], V[score_idx]
        for trained_on_views in ((False, True) if uses_train_any(modes) else (False,)):
            if trained_on_views:
                src = augmented_source(X[fit_idx], V[fit_idx], labels[fit_idx], classes)
            else:
                src = ArraySource(X, labels[fit_idx], classes, index=fit_idx)
            est = fit(src)
            centre = "train" if trained_on_views else "none"
            averaged = "both" if trained_on_views else "tta"
            if centre in out:
                out[centre].append(float(np.mean(np.argmax(proba(est, Xs), axis=1) == ys)))
            if averaged in out:
                p = tta_proba(lambda Z: proba(est, Z), Xs, Vs)
                out[averaged].append(float(np.mean(np.argmax(p, axis=1) == ys)))
    return out


def uses_train_any(modes: Sequence[str]) -> bool:
    """Whether any of ``modes`` trains on views."""
    return any(uses_train(m) for m in modes)
