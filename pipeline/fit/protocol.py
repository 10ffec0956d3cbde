"""The evaluation protocol: splits, selection folds and the hyperparameter search.

Protocol
--------
1. **Splits.** With split folders (``train/``, ``val/``, ``test/``) the folders are the splits. Without them, each
   image is assigned to ``train`` or ``test`` by a seeded hash of its path relative to the dataset root
   (:func:`hash_split`): ``sha1("headbench-split:<seed>:<relative path>")`` read as a number in [0, 1); below 0.30 is
   ``test``. Every class is split at the same 70/30 rate (stratified in expectation; the realised counts are
   reported), and an image's split depends only on its own path and the seed, so adding images later never moves
   the ones already there. A class with at least two images always keeps one on each side (its lowest-hash image
   goes to ``test`` if the hash sent none there, its highest to ``train`` if it sent all there).
2. **Selection.** Hyperparameters, and the run's pick among heads and backbones, are chosen by stratified k-fold
   cross-validation on the training split, shuffled with the run's seed: k = 5 below 2,000 training images and
   k = 3 from 2,000 on (every training image is scored once either way; with thousands of images a fold already
   scores over 600 of them, and a sweep costs k fits per candidate), never more than the number of training images
   of the smallest class. With a ``test`` split beside ``val`` (``--select-on auto``, the default), selection is on
   ``val`` instead (one score per candidate) and ``test`` gives the final numbers. With ``train`` + ``val`` and no
   ``test`` (the Keras tutorials' layout), selection is by cross-validation on ``train`` and ``val`` stays untouched
   for the final numbers: a number that chose the head is never its headline. ``--select-on val`` keeps selection
   on ``val`` then; every ``val`` number is then a selection score, and says so. The selection score is accuracy;
   among candidates with the same mean score the first in the head's grid order wins (grids list the simplest or
   most regularised candidate first). Every candidate's score is recorded. With more training images than the
   search allows (10,000 by default, fewer under a small memory budget: :mod:`pipeline.fit.plan`), the folds are
   drawn from a stratified, seeded subsample of the training images (and at most as many ``val`` images are
   scored); folds are drawn over images (:func:`search_rows`). The search scores the same form of a head (exact or
   batch) as the final fit uses.
3. **Refit.** The head with the chosen hyperparameters is refitted on every image of the training split, and on
   the training split only (also when selection used the validation split, so that validation numbers come from a
   model that never trained on those images).
4. **Final numbers.** The refitted head predicts the final splits once: ``val`` and ``test`` when they exist, or
   ``test`` for hash splits. Numbers of a split that took part in the selection are marked as such. The run's pick
   is made by a pick rule on the selection scores (:mod:`pipeline.fit.pick`); its reported value comes from the
   last final split (``test`` when there is one), with its interval (:mod:`pipeline.stats`).

5. **Views.** When the cache holds augmented views, each head then chooses its view mode (none, train, tta, both)
   at the chosen candidate on the same selection folds, ties to the simpler mode (:mod:`pipeline.fit.views`).

Every metric is stored under the name of the split it was computed on. The predicted class is the most probable
class of ``predict_proba`` (the same as ``predict`` for every registered head).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

from pipeline.errors import FitError
from pipeline.fit.heads import Form, HeadContext, HeadSpec
from pipeline.fit.pick import first_best
from pipeline.fit.stream import ArraySource, stratified_subsample
from pipeline.results import jsonable, report_split

__all__ = [
    "Protocol", "Candidate", "hash_split", "plan_protocol", "selection_folds", "search", "best_candidate",
    "TEST_FRACTION", "CV_FOLDS", "SELECT_ON", "EXCLUDED",
]

TEST_FRACTION = 0.3
CV_FOLDS = 5
CV_FOLDS_LARGE = 3
CV_LARGE_ROWS = 2000
SPLIT_SALT = "headbench-split"
SPLIT_ORDER = ("train", "val", "test")
EXCLUDED = "excluded"
"""The split of a final-split image that ``fit --exclude-leaks`` took out (it has a duplicate in train)."""
SELECT_ON = ("auto", "cv", "val")
"""Where hyperparameters and the pick are chosen (``fit --select-on``): ``auto`` is ``val`` when a ``test`` split
exists beside it and cross-validation on ``train`` otherwise; ``cv`` always cross-validates on ``train``; ``val``
selects on ``val`` even when it is also the last final split."""


# ---- splits and protocol ---------------------------------------------------------------------------------------


def _quiet_fit_warnings() -> None:
    """Silence warnings that fitting heads raises routinely and that change no result: solvers stopping at their
    iteration cap inside a sweep (the sweep scores what they reached), and nearest centroid noting features that are
    constant within a class (common with random or saturated features)."""
    warnings.simplefilter("ignore", ConvergenceWarning)
    warnings.filterwarnings("ignore", message=".*zero standard deviation.*", category=UserWarning)


def path_hash(rel_path: str, seed: int, salt: str = SPLIT_SALT) -> float:
    """``sha1('<salt>:<seed>:<relative path>')`` read as a number in [0, 1) (``\\`` and ``/`` hash alike)."""
    key = f"{salt}:{int(seed)}:{str(rel_path).replace(chr(92), '/')}"
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def hash_side(paths: Sequence[str], labels: np.ndarray, fraction: float, seed: int,
              salt: str = SPLIT_SALT) -> tuple[np.ndarray, np.ndarray]:
    """Which images fall on the small side of a seeded per-image hash split, and their hashes.

    An image is on the small side when :func:`path_hash` is below ``fraction``; a class with two or more images
    keeps at least one on each side (the lowest hash moved in, the highest moved out). Returns the boolean side and
    the hashes.
    """
    labels = np.asarray(labels)
    u = np.array([path_hash(p, seed, salt) for p in paths], dtype=np.float64)
    side = u < fraction
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            continue
        if not side[rows].any():
            side[rows[np.argmin(u[rows])]] = True
        if side[rows].all():
            side[rows[np.argmax(u[rows])]] = False
    return side, u


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
    test, _ = hash_side(paths, labels, test_fraction, seed)
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
    select_on : {"auto", "cv", "val"}
        What was asked (:data:`SELECT_ON`).
    """

    selection: str
    cv_folds: int | None
    final_splits: list[str]
    split_source: str
    split_rule: str
    description: str
    select_on: str = "auto"

    @property
    def report_split(self) -> str:
        """The split whose numbers represent a head (:func:`pipeline.results.report_split`)."""
        return report_split(self.final_splits)

    def to_json(self) -> dict[str, Any]:
        """The ``protocol`` object of results.json."""
        return {"selection": self.selection, "cv_folds": self.cv_folds, "final_splits": list(self.final_splits),
                "select_on": self.select_on, "description": self.description}


def _class_list(class_names: Sequence[str], idx: np.ndarray) -> str:
    return ", ".join(repr(class_names[int(i)]) for i in idx)


def plan_protocol(splits: np.ndarray, labels: np.ndarray, class_names: Sequence[str], paths: Sequence[str],
                  seed: int = 0, select_on: str = "auto") -> tuple[np.ndarray, Protocol]:
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
    select_on : {"auto", "cv", "val"}
        See :data:`SELECT_ON`.

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

    if select_on not in SELECT_ON:
        raise ValueError(f"internal: select_on {select_on!r} is not one of {SELECT_ON}")
    if select_on == "val" and "val" not in present:
        raise FitError("--select-on val needs a val/ split folder; the dataset has "
                       + (", ".join(s + "/" for s in SPLIT_ORDER if s in present) if source == "folders"
                          else "no split folders") + ": use --select-on auto")
    final = [s for s in ("val", "test") if s in present]
    on_val = "val" in present and (select_on == "val" or (select_on == "auto" and "test" in present))
    if on_val:
        description = ("Hyperparameters and the pick chosen by accuracy on the val split; the chosen head is "
                       "refitted on train only and evaluated once on " + " and ".join(final) + "."
                       + (" val numbers are those of the selection split (optimistic); test numbers are untouched "
                          "by any choice." if "test" in present else
                          " With no test split (--select-on val), every val number is a selection score: the "
                          "best of several heads on the split that chose it, optimistic by construction."))
        return splits, Protocol("val", None, final, source, rule, description, select_on)
    train_counts = np.bincount(labels[splits == "train"], minlength=n_classes)
    k = CV_FOLDS if train_counts.sum() < CV_LARGE_ROWS else CV_FOLDS_LARGE
    folds = int(min(k, train_counts.min()))
    if folds < 2:
        small = np.flatnonzero(train_counts < 2)
        raise FitError(f"class {_class_list(class_names, small)} has fewer than 2 training images; "
                       f"cross-validation needs at least 2 per class")
    untouched = " and ".join(final)
    description = (f"Hyperparameters and the pick chosen by {folds}-fold stratified cross-validation accuracy on "
                   f"the train split; the chosen head is refitted on all of train and evaluated once on {untouched}, "
                   f"which took no part in any choice.")
    return splits, Protocol("cv", folds, final, source, rule, description, select_on)


@dataclass
class SearchRows:
    """The rows of the hyperparameter search and its (fit rows, score rows) pairs.

    Attributes
    ----------
    folds : list of (ndarray, ndarray)
        Indices into the run's rows (image indices), shared by every head and backbone of the run.
    rows : ndarray
        Sorted union of the folds' rows (what the search reads).
    train_rows : int
        Training rows of the final fit (all of ``train``).
    fit_rows : int
        Training rows the search draws its folds from (``train_rows``, or the subsample).
    subsample : bool
        Whether the search runs on a stratified subsample of the training rows (and of ``val``).
    """

    folds: list[tuple[np.ndarray, np.ndarray]]
    rows: np.ndarray
    train_rows: int
    fit_rows: int
    subsample: bool

    def to_json(self) -> dict[str, Any]:
        """The ``search`` object of results.json's ``protocol``."""
        return {"train_rows": int(self.train_rows), "search_rows": int(self.fit_rows),
                "subsample": bool(self.subsample), "refit_rows": int(self.train_rows)}


def search_rows(protocol: Protocol, splits: np.ndarray, labels: np.ndarray, seed: int = 0,
                max_rows: int | None = None) -> SearchRows:
    """The search's folds, on a stratified subsample of ``max_rows`` training rows when there are more.

    The subsample is seeded and stratified per class; with a ``val`` split, at most ``max_rows`` of its rows are
    scored (the same way). The final refit always uses every training row. Folds are computed over image indices,
    so whatever rows of one image a head trains on, they stay on one side of a fold.

    Parameters
    ----------
    protocol : Protocol
    splits : ndarray of str
    labels : ndarray
    seed : int
        Seed of the subsample and of the cross-validation shuffling.
    max_rows : int, optional
        Most training rows the search fits on (None: all).

    Returns
    -------
    SearchRows
    """
    labels = np.asarray(labels)
    train = np.flatnonzero(splits == "train")
    n_train = len(train)
    sub = max_rows is not None and n_train > max_rows
    if sub:
        train = stratified_subsample(labels, train, int(max_rows), seed)
    if protocol.selection == "val":
        val = np.flatnonzero(splits == "val")
        if max_rows is not None and len(val) > max_rows:
            val = stratified_subsample(labels, val, int(max_rows), seed + 1)
            sub = True
        folds = [(train, val)]
    else:
        counts = np.bincount(labels[train])
        k = int(min(protocol.cv_folds or CV_FOLDS, counts[counts > 0].min()))
        if k < 2:
            raise FitError("the hyperparameter search's subsample has a class with a single training image; "
                           "pass a larger --memory-budget")
        skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=int(seed))
        folds = [(train[a], train[b]) for a, b in skf.split(np.zeros(len(train)), labels[train])]
    rows = np.unique(np.concatenate([np.concatenate(f) for f in folds]))
    return SearchRows(folds, rows, n_train, len(train), bool(sub))


def selection_folds(protocol: Protocol, splits: np.ndarray, labels: np.ndarray,
                    seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, score rows) pairs of the hyperparameter search over every training row (see :func:`search_rows`).

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
    return search_rows(protocol, splits, labels, seed).folds


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
        return {"params": jsonable(self.params), "mean": self.mean, "std": self.std,
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


def _score_neighbors_fold(spec: HeadSpec, ctx: HeadContext, form: Form, grid: list[dict[str, Any]],
                          source: ArraySource, Xs: np.ndarray, ys: np.ndarray) -> list[float]:
    """k-NN candidates of one fold from one neighbour search with the largest k (distance-weighted votes)."""
    ks = [int(p["k"]) for p in grid]
    kmax = max(ks)
    pipe = form.fit(ctx, {**grid[ks.index(kmax)], "k": kmax}, source, True, spec)
    knn = pipe[-1]
    if not isinstance(knn, KNeighborsClassifier) or knn.weights != "distance":
        raise TypeError(f"head {spec.name!r}: the neighbours search path needs a distance-weighted k-NN last")
    dist, ind = knn.kneighbors(pipe[:-1].transform(Xs), n_neighbors=kmax)
    fit_y = np.asarray(knn._y)
    out = []
    for k in ks:
        d = dist[:, :k]
        with np.errstate(divide="ignore"):
            w = 1.0 / d
        exact = np.isinf(w)
        hit = exact.any(axis=1)
        w[hit] = exact[hit]  # scikit-learn: a neighbour at distance 0 takes all the weight
        votes = np.zeros((len(d), len(knn.classes_)))
        np.add.at(votes, (np.repeat(np.arange(len(d)), k), fit_y[ind[:, :k]].ravel()), w.ravel())
        pred = knn.classes_[np.argmax(votes, axis=1)]
        out.append(float(accuracy_score(ys, pred)))
    return out


def _fold_source(X: np.ndarray, y: np.ndarray, fit_idx: np.ndarray) -> ArraySource:
    classes, codes = np.unique(y[fit_idx], return_inverse=True)
    return ArraySource(X, codes, classes, index=fit_idx)


def search(spec: HeadSpec, ctx: HeadContext, X: np.ndarray, y: np.ndarray,
           folds: list[tuple[np.ndarray, np.ndarray]], form: Form | None = None,
           reuse: dict[int, Any] | None = None) -> list[Candidate]:
    """Score every candidate of ``spec``'s grid on every (fit rows, score rows) pair by accuracy.

    Parameters
    ----------
    spec : HeadSpec
    ctx : HeadContext
    X : ndarray
        Rows the folds index into, in the form the head takes (2-D for scikit-learn heads).
    y : ndarray
        Class names of those rows.
    folds : list of (ndarray, ndarray)
    form : Form, optional
        How each candidate is fitted (default the head's exact form): the search scores the form the final head
        is fitted in.
    reuse : dict, optional
        For heads whose search path is ``"reuse"``: receives each candidate's instance (by grid index), refitted on
        every fold, so the final fit can reuse it too.

    Returns
    -------
    list of Candidate
        In grid order, each with one score per fold.
    """
    form = form or spec.exact_form
    grid = spec.grid(ctx)
    cands = [Candidate(dict(p)) for p in grid]
    y = np.asarray(y)
    reused: dict[int, Any] = {} if reuse is None else reuse
    with warnings.catch_warnings():
        _quiet_fit_warnings()
        for fit_idx, score_idx in folds:
            Xs, ys = X[score_idx], y[score_idx]
            source = _fold_source(X, y, fit_idx)
            if form.score_fold is not None:
                scores = form.score_fold(ctx, grid, source, Xs, ys)
            elif form.exact and spec.search_path == "kernel":
                scores = _score_kernel_fold(spec, ctx, grid, X[fit_idx], y[fit_idx], Xs, ys)
            elif spec.search_path == "neighbors":
                scores = _score_neighbors_fold(spec, ctx, form, grid, source, Xs, ys)
            else:
                scores = []
                est = None
                for i, cand in enumerate(cands):
                    if form.exact and spec.search_path == "warm" and est is not None:
                        est.set_params(**{spec.warm_params[k]: v for k, v in cand.params.items()
                                          if k in spec.warm_params})
                        est.fit(X[fit_idx], y[fit_idx])
                    elif spec.search_path == "reuse":
                        reused.setdefault(i, spec.build(ctx, cand.params, True))
                        est = form.fit(ctx, cand.params, source, True, spec, est=reused[i])
                    elif form.exact and spec.search_path == "warm":
                        est = spec.build(ctx, cand.params, True)
                        est.fit(X[fit_idx], y[fit_idx])
                    else:
                        est = form.fit(ctx, cand.params, source, True, spec)
                    scores.append(float(accuracy_score(ys, est.predict(Xs))))
            for cand, s in zip(cands, scores):
                cand.scores.append(s)
    return cands


def best_candidate(cands: list[Candidate]) -> int:
    """Index of the highest mean score; ties go to the earliest in grid order."""
    return first_best([c.mean for c in cands])
