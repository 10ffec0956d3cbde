"""The evaluation protocol and the metrics of one head on one feature set.

Protocol
--------
1. **Splits.** With split folders (``train/``, ``val/``, ``test/``) the folders are the splits. Without them, each
   image is assigned to ``train`` or ``test`` by a seeded hash of its path relative to the dataset root
   (:func:`hash_split`): ``sha1("headbench-split:<seed>:<relative path>")`` read as a number in [0, 1); below 0.30 is
   ``test``. Every class is split at the same 70/30 rate (stratified in expectation; the realised counts are
   reported), and an image's split depends only on its own path and the seed, so adding images later never moves
   the ones already there. A class with at least two images always keeps one on each side (its lowest-hash image
   goes to ``test`` if the hash sent none there, its highest to ``train`` if it sent all there).
2. **Selection.** Hyperparameters are chosen on the validation split when there is one (one score per candidate),
   otherwise by stratified k-fold cross-validation on the training split, shuffled with the run's seed: k = 5
   below 2,000 training images and k = 3 from 2,000 on (every training image is scored once either way; with
   thousands of images a fold already scores over 600 of them, and a sweep costs k fits per candidate), never
   more than the number of training images of the smallest class. The selection score is accuracy; among
   candidates with the same mean score the first in the head's grid order wins (grids list the simplest or most
   regularised candidate first). Every candidate's score is recorded.
3. **Refit.** The head with the chosen hyperparameters is refitted on the training split only (also when selection
   used the validation split, so that validation numbers come from a model that never trained on those images).
4. **Final numbers.** The refitted head predicts the final splits once: ``val`` and ``test`` when they exist
   (``val`` numbers are those of the selection split, reported for comparison; ``test`` numbers are untouched by
   any choice), or ``test`` for hash splits. The best head of a run is the one with the highest selection score;
   its reported value comes from the last final split (``test`` when there is one).

Every metric is stored under the name of the split it was computed on. The predicted class is the most probable
class of ``predict_proba`` (the same as ``predict`` for every registered head).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning, UndefinedMetricWarning
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, log_loss,
                             precision_recall_curve, precision_recall_fscore_support, roc_auc_score, roc_curve,
                             top_k_accuracy_score)
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC

from pipeline.errors import FitError
from pipeline.heads import HeadContext, HeadSpec, flatten_features

__all__ = [
    "Protocol", "Candidate", "HeadResult", "hash_split", "plan_protocol", "selection_folds", "search",
    "evaluate_head", "compute_metrics", "mistakes", "TEST_FRACTION", "CV_FOLDS",
]

TEST_FRACTION = 0.3
CV_FOLDS = 5
CV_FOLDS_LARGE = 3
CV_LARGE_ROWS = 2000
SPLIT_SALT = "headbench-split"
MAX_CURVE_POINTS = 200
MAX_MISTAKES = 12
SPLIT_ORDER = ("train", "val", "test")


# ---- splits and protocol ---------------------------------------------------------------------------------------


def _quiet_fit_warnings() -> None:
    """Silence warnings that fitting heads raises routinely and that change no result: solvers stopping at their
    iteration cap inside a sweep (the sweep scores what they reached), and nearest centroid noting features that are
    constant within a class (common with random or saturated features)."""
    warnings.simplefilter("ignore", ConvergenceWarning)
    warnings.filterwarnings("ignore", message=".*zero standard deviation.*", category=UserWarning)


def _path_hash(rel_path: str, seed: int) -> float:
    key = f"{SPLIT_SALT}:{int(seed)}:{str(rel_path).replace(chr(92), '/')}"
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def hash_split(paths: Sequence[str], labels: np.ndarray, test_fraction: float = TEST_FRACTION,
               seed: int = 0) -> np.ndarray:
    """Assign each image to ``train`` or ``test`` by a seeded hash of its relative path.

    Parameters
    ----------
    paths : sequence of str
        Image paths relative to the dataset root (``/`` or ``\\`` separators give the same hash).
    labels : ndarray of shape (n,)
        Class index of each image.
    test_fraction : float, default=0.3
    seed : int, default=0

    Returns
    -------
    splits : ndarray of str, shape (n,)
        ``"train"`` or ``"test"``. An image's split depends only on its path and the seed (stable when images are
        added); a class with two or more images keeps at least one on each side.
    """
    labels = np.asarray(labels)
    u = np.array([_path_hash(p, seed) for p in paths], dtype=np.float64)
    test = u < test_fraction
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            continue
        if not test[rows].any():
            test[rows[np.argmin(u[rows])]] = True
        if test[rows].all():
            test[rows[np.argmax(u[rows])]] = False
    return np.where(test, "test", "train").astype(str)


@dataclass
class Protocol:
    """How a run splits, selects and reports.

    Attributes
    ----------
    selection : {"val", "cv"}
        Split used to choose hyperparameters.
    cv_folds : int or None
        Folds of the cross-validation (``None`` when selection is on ``val``).
    final_splits : list of str
        Splits the refitted heads are evaluated on, in order (``["val"]``, ``["val", "test"]`` or ``["test"]``).
    split_source : {"folders", "hash"}
    split_rule : str
        Human-readable rule of how images were assigned to splits.
    description : str
        The whole protocol in one paragraph (copied into results.json).
    """

    selection: str
    cv_folds: int | None
    final_splits: list[str]
    split_source: str
    split_rule: str
    description: str

    @property
    def report_split(self) -> str:
        """The split whose numbers represent a head (``test`` when there is one)."""
        return self.final_splits[-1]

    def to_json(self) -> dict[str, Any]:
        """The ``protocol`` object of results.json."""
        return {"selection": self.selection, "cv_folds": self.cv_folds, "final_splits": list(self.final_splits),
                "description": self.description}


def _class_list(class_names: Sequence[str], idx: np.ndarray) -> str:
    return ", ".join(repr(class_names[int(i)]) for i in idx)


def plan_protocol(splits: np.ndarray, labels: np.ndarray, class_names: Sequence[str], paths: Sequence[str],
                  seed: int = 0) -> tuple[np.ndarray, Protocol]:
    """Decide the splits and the protocol of a run, and check the data can support it.

    Parameters
    ----------
    splits : ndarray of str, shape (n,)
        Split of each row as cached (``train``/``val``/``test``, or ``""`` without split folders).
    labels : ndarray of shape (n,)
        Class index of each row.
    class_names : sequence of str
    paths : sequence of str
        Relative image paths (used by the hash split).
    seed : int

    Returns
    -------
    splits : ndarray of str
        The splits used (hash-made ones without split folders).
    protocol : Protocol

    Raises
    ------
    FitError
        Fewer than two classes to train on, a class without training images, a class absent from ``val`` or
        ``test``, a class with a single image (hash split), or no split to evaluate on.
    """
    splits = np.asarray(splits).astype(str)
    labels = np.asarray(labels)
    n_classes = len(class_names)
    if len(labels) == 0:
        raise FitError("the cache holds no usable rows; check the dataset and extract again")
    present = set(np.unique(splits)) - {""}
    if present & {"val", "test"}:
        source = "folders"
        rule = "split folders (" + ", ".join(s + "/" for s in SPLIT_ORDER if s in present) + ")"
        if "train" not in present:
            raise FitError("the dataset has val/test folders but no train/ folder: add train/<class>/ images")
    else:
        counts = np.bincount(labels, minlength=n_classes)
        single = np.flatnonzero(counts == 1)
        if len(single):
            raise FitError(f"class {_class_list(class_names, single)} has a single image; a held-out split needs "
                           f"at least 2 per class: add images or remove the class folder")
        splits = hash_split(paths, labels, TEST_FRACTION, seed)
        source = "hash"
        rule = (f"{int(round((1 - TEST_FRACTION) * 100))}/{int(round(TEST_FRACTION * 100))} train/test, stratified "
                f"per class in expectation: sha1('{SPLIT_SALT}:{seed}:<relative path>') < {TEST_FRACTION} is test; "
                f"stable when images are added")
        present = set(np.unique(splits))

    train_classes = np.unique(labels[splits == "train"])
    if len(train_classes) < 2:
        only = class_names[int(train_classes[0])] if len(train_classes) else "none"
        raise FitError(f"the training split has images of one class only ({only!r}); a classifier needs at least "
                       f"two classes")
    missing_train = np.setdiff1d(np.arange(n_classes), train_classes)
    if len(missing_train):
        raise FitError(f"class {_class_list(class_names, missing_train)} has no training images; add some under "
                       f"train/ or remove the class")
    for s in ("val", "test"):
        if s in present:
            missing = np.setdiff1d(np.arange(n_classes), np.unique(labels[splits == s]))
            if len(missing):
                raise FitError(f"class {_class_list(class_names, missing)} has no images in {s}/; add some, or "
                               f"remove the {s}/ folder (selection then uses cross-validation on train)")

    if "val" in present:
        final = ["val"] + (["test"] if "test" in present else [])
        description = ("Hyperparameters chosen by accuracy on the val split; the chosen head is refitted on "
                       "train only and evaluated once on " + " and ".join(final) + "."
                       + (" val numbers are those of the selection split (optimistic); test numbers are untouched "
                          "by any choice." if "test" in present else
                          " With no test split, val numbers are those of the selection split (mildly optimistic "
                          "for the best of several heads)."))
        return splits, Protocol("val", None, final, source, rule, description)
    train_counts = np.bincount(labels[splits == "train"], minlength=n_classes)
    k = CV_FOLDS if train_counts.sum() < CV_LARGE_ROWS else CV_FOLDS_LARGE
    folds = int(min(k, train_counts.min()))
    if folds < 2:
        small = np.flatnonzero(train_counts < 2)
        raise FitError(f"class {_class_list(class_names, small)} has fewer than 2 training images; "
                       f"cross-validation needs at least 2 per class")
    description = (f"Hyperparameters chosen by {folds}-fold stratified cross-validation accuracy on the train split "
                   f"(no val split); the chosen head is refitted on all of train and evaluated once on test.")
    return splits, Protocol("cv", folds, ["test"], source, rule, description)


def selection_folds(protocol: Protocol, splits: np.ndarray, labels: np.ndarray,
                    seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, score rows) pairs of the hyperparameter search, as indices into the full arrays.

    Parameters
    ----------
    protocol : Protocol
    splits : ndarray of str
    labels : ndarray
    seed : int
        Shuffling seed of the cross-validation folds.

    Returns
    -------
    list of (ndarray, ndarray)
    """
    train = np.flatnonzero(splits == "train")
    if protocol.selection == "val":
        return [(train, np.flatnonzero(splits == "val"))]
    skf = StratifiedKFold(n_splits=int(protocol.cv_folds or CV_FOLDS), shuffle=True, random_state=int(seed))
    return [(train[a], train[b]) for a, b in skf.split(np.zeros(len(train)), np.asarray(labels)[train])]


# ---- hyperparameter search -------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """Scores of one hyperparameter candidate (one per fold, or one on ``val``)."""

    params: dict[str, Any]
    scores: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        """Mean accuracy over folds (the selection score)."""
        return float(np.mean(self.scores)) if self.scores else float("nan")

    @property
    def std(self) -> float:
        """Standard deviation of the fold accuracies (0 with a single val score)."""
        return float(np.std(self.scores)) if self.scores else float("nan")

    def to_json(self) -> dict[str, Any]:
        """The ``search`` entry of results.json."""
        return {"params": _jsonable(self.params), "mean": self.mean, "std": self.std,
                "scores": [float(s) for s in self.scores]}


def _sq_distances(A: np.ndarray, B: np.ndarray, b_norms: np.ndarray) -> np.ndarray:
    a_norms = np.einsum("ij,ij->i", A, A)
    D = a_norms[:, None] + b_norms[None, :] - 2.0 * (A @ B.T)
    np.maximum(D, 0.0, out=D)
    return D


def _score_kernel_fold(spec: HeadSpec, ctx: HeadContext, grid: list[dict[str, Any]], Xf: np.ndarray,
                       yf: np.ndarray, Xs: np.ndarray, ys: np.ndarray) -> list[float]:
    """RBF-SVM candidates of one fold from one pair of squared-distance matrices (precomputed kernels)."""
    pre = spec.build(ctx, grid[0], True)[:-1]
    Zf = np.asarray(pre.fit_transform(Xf, yf), dtype=np.float64)
    Zs = np.asarray(pre.transform(Xs), dtype=np.float64)
    f_norms = np.einsum("ij,ij->i", Zf, Zf)
    Dff = _sq_distances(Zf, Zf, f_norms)
    Dsf = _sq_distances(Zs, Zf, f_norms)
    out = []
    for params in grid:
        svc = spec.build(ctx, params, True)[-1]
        if not isinstance(svc, SVC) or svc.kernel != "rbf":
            raise TypeError(f"head {spec.name!r}: the kernel search path needs an RBF SVC as last step")
        gamma = float(svc.gamma)
        model = SVC(kernel="precomputed", C=svc.C, class_weight=svc.class_weight)
        model.fit(np.exp(-gamma * Dff), yf)
        out.append(float(accuracy_score(ys, model.predict(np.exp(-gamma * Dsf)))))
    return out


def search(spec: HeadSpec, ctx: HeadContext, X: np.ndarray, y: np.ndarray,
           folds: list[tuple[np.ndarray, np.ndarray]]) -> list[Candidate]:
    """Score every candidate of ``spec``'s grid on every (fit rows, score rows) pair by accuracy.

    Parameters
    ----------
    spec : HeadSpec
    ctx : HeadContext
    X : ndarray
        All rows (the folds index into it), in the form the head takes.
    y : ndarray
        Labels of all rows.
    folds : list of (ndarray, ndarray)

    Returns
    -------
    list of Candidate
        In grid order, each with one score per fold.
    """
    grid = spec.grid(ctx)
    cands = [Candidate(dict(p)) for p in grid]
    with warnings.catch_warnings():
        _quiet_fit_warnings()
        for fit_idx, score_idx in folds:
            Xf, yf, Xs, ys = X[fit_idx], y[fit_idx], X[score_idx], y[score_idx]
            if spec.search_path == "kernel":
                for cand, s in zip(cands, _score_kernel_fold(spec, ctx, grid, Xf, yf, Xs, ys)):
                    cand.scores.append(s)
                continue
            est = None
            for cand in cands:
                if spec.search_path == "warm" and est is not None:
                    est.set_params(**{spec.warm_params[k]: v for k, v in cand.params.items()
                                      if k in spec.warm_params})
                else:
                    est = spec.build(ctx, cand.params, True)
                est.fit(Xf, yf)
                cand.scores.append(float(accuracy_score(ys, est.predict(Xs))))
    return cands


def best_candidate(cands: list[Candidate]) -> int:
    """Index of the highest mean score; ties go to the earliest in grid order."""
    means = np.array([c.mean for c in cands])
    top = np.nanmax(means)
    return int(np.flatnonzero(means >= top - 1e-12)[0])


# ---- metrics -----------------------------------------------------------------------------------------------------


def _downsample(*arrays: np.ndarray, limit: int = MAX_CURVE_POINTS) -> list[list[float]]:
    n = len(arrays[0])
    idx = np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(int)) if n else np.zeros(0, int)
    return [[float(v) for v in np.asarray(a)[idx]] for a in arrays]


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Metrics of one split from true class indices and class probabilities.

    Parameters
    ----------
    y_true : ndarray of int, shape (n,)
        True class indices into ``class_names``.
    proba : ndarray of shape (n, n_classes)
        Probabilities, columns in ``class_names`` order. The prediction is the most probable class.
    class_names : sequence of str

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


# ---- one head on one feature set ---------------------------------------------------------------------------------


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
        return {"head": self.head, "params": _jsonable(self.params), "selection_split": self.selection_split,
                "search": [c.to_json() for c in self.search], "fit_seconds": float(self.fit_seconds),
                "predict_ms_per_1000": float(self.predict_ms_per_1000), "metrics": self.metrics,
                "history": self.history, "mistakes": self.mistakes}


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


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
