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

Forms at scale
--------------
Each head has an **exact** form (the estimators above, fitted on rows in memory) and, where that form does not scale,
a **batch** form that learns from rows in blocks (in memory, or read from the cache out of core; see
:mod:`pipeline.fit.forms`). :attr:`HeadSpec.exact_max_rows` is the number of training rows above which the batch form
replaces the exact one even in memory; out of core every head uses its batch form. The reasons for each threshold
are with the constants below and in docs/protocol.md; :mod:`pipeline.fit.plan` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from pipeline.errors import FitError
from pipeline.fit import forms
from pipeline.fit.context import NYSTROEM_COMPONENTS, HeadContext
from pipeline.fit.dense import DENSE_DEFAULTS, HOLDOUT_MAX_ROWS, DenseHead
from pipeline.fit.linear import AVERAGE_EPOCHS, BATCH_ROWS
from pipeline.sizes import fmt_bytes

PCA_COMPONENTS = 512
PCA_MIN_ROWS = 1000

__all__ = [
    "DenseHead", "HeadContext", "HeadSpec", "Form", "HEADS", "head_names", "resolve_heads", "get_head",
    "flatten_features", "LOGREG_EXACT_MAX_ROWS", "LINEAR_SVM_EXACT_MAX_ROWS", "SVM_EXACT_MAX_ROWS",
    "KNN_EXACT_MAX_ROWS", "NYSTROEM_COMPONENTS",
]

LOGREG_EXACT_MAX_ROWS = 100_000
"""Above this many training rows logistic regression uses the mini-batch solver instead of lbfgs: lbfgs makes 30 to
300 full passes over the rows (7-22 s for 35,000 x 1,280 on 2 loaded cores), the mini-batch solver of the same
objective 10 (1-3 s there, the same accuracy to 0.3 point); from 100,000 rows one lbfgs fit takes minutes."""

LINEAR_SVM_EXACT_MAX_ROWS = 5_000
"""Above this many training rows the linear SVM uses the mini-batch solver of ``LinearSVC``'s objective: liblinear's
dual solver grows faster than linearly with the rows (measured on 2 loaded cores, 1,280 features: 4.5 s per fit on
2,400 rows, 20-25 s on 6,700, 42-275 s on 35,000; the search fits it 3 times per candidate and the calibration 4
times), while the mini-batch solver takes 1.5 s on 6,700 rows for the same test accuracy within 0.4 point."""

SVM_EXACT_MAX_ROWS = 5 * NYSTROEM_COMPONENTS
"""Above this many training rows the RBF SVM is approximated (Nystroem map + linear SVM): libsvm's fit time grows
with the square of the rows or faster and its prediction with the support vectors (10,000 rows: 47-64 s to fit, 150-
240 s to predict 15,000 images; 35,000 rows: 417 s and 453 s), and a rank-1,000 kernel approximation only saves
work once the rows outnumber its landmarks several times."""

KNN_EXACT_MAX_ROWS = 20_000
"""Most training rows in the k-NN index; above it the index is a stratified, seeded subsample of this many rows.
A prediction costs index rows x features multiply-adds (20,000 x 1,280 = 26 million per image), while accuracy grows
slowly with the index (0.736, 0.744, 0.737, 0.740 with 5,000, 10,000, 20,000 and 34,941 rows, 10 classes)."""


# ---- registry ------------------------------------------------------------------------------------------------


Builder = Callable[[HeadContext, dict[str, Any], bool], Any]


@dataclass(frozen=True)
class Form:
    """One way of fitting a head (see :mod:`pipeline.fit.forms`).

    Attributes
    ----------
    name : str
        ``exact``, or the batch form's name (``minibatch``, ``nystroem``, ``bounded_index``, ``streamed``...).
    summary : str
        What it is, in one line (recorded in results.json as the approximation when it is not exact).
    fit : callable
        ``fit(ctx, params, source, search, spec, est=None)`` -> fitted estimator.
    streams : bool
        Whether it can learn from rows read in blocks from a cache (out of core).
    exact : bool
        Whether it computes the exact head (the same parameters up to float rounding), not an approximation.
    score_fold : callable, optional
        ``score_fold(ctx, grid, source, Xs, ys)`` -> every candidate's accuracy on one search fold, sharing work
        between candidates; it must score exactly what ``fit`` with ``search=True`` would.
    """

    name: str
    summary: str
    fit: Callable[..., Any]
    streams: bool = True
    exact: bool = False
    score_fold: Callable[..., list[float]] | None = None


EXACT = Form("exact", "the exact estimator, fitted on rows in memory", forms.fit_exact, streams=False, exact=True)


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
        estimator with ``warm_start``), ``"kernel"`` (RBF candidates scored from one precomputed distance
        matrix per fold), ``"neighbors"`` (every k scored from one neighbour search per fold) or ``"reuse"`` (one
        instance refitted on every fold and for the final fit, which it makes cheaper, not different). All score
        exactly the estimator ``build(ctx, params, True)``; the warm and kernel paths apply to the exact form only.
    warm_params : dict of str to str
        For ``"warm"``: grid key -> estimator parameter path (``{"C": "clf__C"}``).
    fixed : callable
        ``fixed(ctx)`` -> the settings that are not searched but shape the head (recorded with the chosen ones).
    exact_form : Form
        How the head is fitted up to :attr:`exact_max_rows` training rows, in memory.
    batch_form : Form or None
        How it is fitted above them, or out of core (None: it cannot learn in batches and is then skipped).
    exact_max_rows : int or None
        Training rows above which :attr:`batch_form` replaces :attr:`exact_form` (None: exact at any size that fits
        in memory).
    strength_rank : int
        Place in the order of the ``one_se`` pick rule (:mod:`pipeline.fit.pick`): among heads whose selection
        scores are within noise of the best, the lowest rank is picked. Strong, well-regularised heads first.
    simplicity_rank : int
        Place in the order of the ``one_se_simple`` pick rule: simplest (fewest parameters, cheapest to predict)
        first, the classic one-standard-error rule.
    memory : callable or None
        ``memory(spec, room)`` -> :class:`MemoryFit`: the head's own rule for what its bounded structures (a k-NN
        index, Nystroem landmarks, a network with its optimizer state and held-out rows) take of the plan's
        :class:`MemoryRoom`, and what it then changes (its context, form, recorded details). None: it keeps
        nothing beyond its rows.
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
    exact_form: Form = EXACT
    batch_form: Form | None = None
    exact_max_rows: int | None = None
    strength_rank: int = 99
    simplicity_rank: int = 99
    memory: Callable[["HeadSpec", "MemoryRoom"], "MemoryFit"] | None = None


def _calibration_folds(ctx: HeadContext) -> int:
    return max(2, min(3, ctx.min_class_rows))


DENSE_WIDE_INPUTS = 4096


def _dense_lr(ctx: HeadContext) -> float:
    return 1e-3 if ctx.n_features <= DENSE_WIDE_INPUTS else 1e-4


def _build_dense(ctx: HeadContext, params: dict[str, Any], search: bool) -> DenseHead:
    return DenseHead(class_weight=ctx.class_weight, random_state=ctx.seed, learning_rate=_dense_lr(ctx),
                     validation_max_rows=ctx.holdout_max_rows, **params)


def _build_logreg(ctx: HeadContext, params: dict[str, Any], search: bool) -> Pipeline:
    clf = LogisticRegression(C=float(params["C"]), max_iter=300, tol=1e-3, class_weight=ctx.class_weight,
                             warm_start=search)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def _build_linear_svm(ctx: HeadContext, params: dict[str, Any], search: bool) -> Pipeline:
    svm = LinearSVC(C=float(params["C"]), dual=True, tol=1e-3, max_iter=2000, class_weight=ctx.class_weight,
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
              class_weight=ctx.class_weight)
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


# ---- each head's memory rule (the plan hands in the room; :func:`pipeline.fit.plan.plan_head`) -----------------

MIN_KNN_INDEX_PER_CLASS = 10
"""Fewest k-NN index rows per class worth fitting: below it a k swept up to its grid has too few neighbours per class
to vote, and the head is skipped rather than fitted on a sliver."""


@dataclass(frozen=True)
class MemoryRoom:
    """What the cost plan gives one head to fit in.

    Attributes
    ----------
    ctx : HeadContext
        The head's context, its form and ``work_bytes`` set.
    form : Form
        The form the plan chose.
    row_bytes : int
        Bytes of one training row as float32.
    pass_rows : int
        Rows one pass maps at once (the streamed pass's buffer, at most one read block).
    max_rows : int or None
        Training rows above which the exact form gives way (the cost policy's limit for this head).
    """

    ctx: HeadContext
    form: Form
    row_bytes: int
    pass_rows: int
    max_rows: int | None

    @property
    def work_bytes(self) -> int:
        """The budget's share for one head's bounded structures, as its context holds it
        (:attr:`pipeline.fit.plan.MemoryBudget.work_bytes`)."""
        return int(self.ctx.work_bytes or 0)


@dataclass(frozen=True)
class MemoryFit:
    """A head's answer to its :class:`MemoryRoom`.

    Attributes
    ----------
    ctx : HeadContext
        The context to fit with (e.g. the index size or held-out rows it may keep).
    form : Form
        The form to fit in (a k-NN index cut below the training rows is the bounded form).
    details : dict
        What the plan records (``index_rows``, ``nystroem_components``, ``calibration_rows``).
    note : str
        Appended to the plan's reason (e.g. an index cut by the budget).
    too_big : str or None
        What does not fit the work share (``"a k-NN index of at least 20 rows (2.0 MB) does not fit"``): the head is
        skipped with this line.
    """

    ctx: HeadContext
    form: Form
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    too_big: str | None = None


def _knn_memory(spec: HeadSpec, room: MemoryRoom) -> MemoryFit:
    """The index and its standardised copy must fit the work share; an index cut below the training rows is the
    bounded form."""
    ctx, form, n = room.ctx, room.form, room.ctx.n_rows
    index = n if (form.exact or not room.max_rows) else min(n, room.max_rows)
    fit_rows = int(room.work_bytes // (2 * room.row_bytes))
    note = ""
    if index > fit_rows:
        index = fit_rows
        note = f"; index cut to {index:,} rows by the memory budget"
    least = MIN_KNN_INDEX_PER_CLASS * ctx.n_classes
    if index < min(n, least):
        return MemoryFit(ctx, form, too_big=f"a k-NN index of at least {least} rows "
                                            f"({fmt_bytes(2 * least * room.row_bytes)}) does not fit")
    if index < n and form.exact:
        form = spec.batch_form or form
    ctx = replace(ctx, form=form.name, knn_index_rows=index if index < n else None)
    return MemoryFit(ctx, form, {"index_rows": int(index)}, note)


def _calibration_memory(spec: HeadSpec, room: MemoryRoom) -> MemoryFit:
    """Batch forms of the SVMs calibrate on held-out training rows (:func:`forms.calibration_rows`), recorded with
    the plan."""
    details = {}
    if not room.form.exact:
        details["calibration_rows"] = forms.calibration_rows(room.ctx.n_rows)
    return MemoryFit(room.ctx, room.form, details)


def _svm_memory(spec: HeadSpec, room: MemoryRoom) -> MemoryFit:
    """The Nystroem map's landmark rows, their kernel matrix and one pass's mapped rows must fit the work share."""
    calibrated = _calibration_memory(spec, room)
    if room.form.name != "nystroem":
        return calibrated
    m = min(room.ctx.nystroem_components, room.ctx.n_rows)
    need = m * room.row_bytes * 2 + m * m * 8 + room.pass_rows * m * 4
    if need > room.work_bytes:
        return MemoryFit(room.ctx, room.form, too_big=f"the Nystroem map's {m:,} landmark rows ({fmt_bytes(need)} "
                                                      f"with their work arrays) do not fit")
    return MemoryFit(room.ctx, room.form, {"nystroem_components": int(m), **calibrated.details})


def _dense_memory(spec: HeadSpec, room: MemoryRoom) -> MemoryFit:
    """The network's weights with Adam's two moments and the best epoch's copy, and its held-out rows (at most
    :data:`HOLDOUT_MAX_ROWS`, kept in memory), must fit the work share."""
    ctx = room.ctx
    weights = ctx.n_features * int(DENSE_DEFAULTS["hidden"]) * 4 * 4
    holdout = int(min(HOLDOUT_MAX_ROWS, room.work_bytes // room.row_bytes))
    if weights > room.work_bytes or holdout < min(ctx.n_classes * 2, ctx.n_rows):
        return MemoryFit(ctx, room.form, too_big=f"the dense head's weights with its optimizer state "
                                                 f"({fmt_bytes(weights)}) and its held-out rows do not fit")
    return MemoryFit(replace(ctx, holdout_max_rows=holdout), room.form)


MINIBATCH_SUMMARY = (f"the same objective (C as in scikit-learn) minimised by Adam on mini-batches of {BATCH_ROWS} "
                     f"rows read in blocks, weights averaged over the last {AVERAGE_EPOCHS} passes")
CALIBRATION_SUMMARY = (f"sigmoid calibration on {forms.CALIBRATION_FRACTION:.0%} of the training rows held out (at "
                       f"most {forms.CALIBRATION_MAX_ROWS:,})")

HEADS: dict[str, HeadSpec] = {
    "dense": HeadSpec(
        name="dense", kind="keras", takes_maps=True, build=_build_dense, grid=lambda ctx: [{}], search_path="reuse",
        summary=f"Keras Normalization -> Dense({DENSE_DEFAULTS['hidden']}, relu) -> "
                f"Dropout({DENSE_DEFAULTS['dropout']}) -> softmax, early stopping (maps: flatten)",
        fixed=lambda ctx: {**{k: DENSE_DEFAULTS[k] for k in ("hidden", "dropout", "batch_size", "patience",
                                                             "validation_fraction")},
                           "learning_rate": _dense_lr(ctx), "class_weight": ctx.class_weight},
        memory=_dense_memory,
        strength_rank=2, simplicity_rank=5,
        batch_form=Form("streamed", "the same network, trained on blocks of rows read from the cache (rows shuffled "
                        "within buffers of random blocks, sized by the cost plan)", forms.fit_dense_streamed,
                        exact=False),
    ),
    "logreg": HeadSpec(
        name="logreg", build=_build_logreg, search_path="warm", warm_params={"C": "clf__C"},
        grid=lambda ctx: [{"C": c} for c in LOGREG_C],
        summary="standardise + multinomial logistic regression, C swept (linear probe)",
        fixed=lambda ctx: {"class_weight": ctx.class_weight, "solver": "lbfgs" if ctx.form == "exact" else "minibatch"},
        batch_form=Form("minibatch", "multinomial logistic regression: " + MINIBATCH_SUMMARY,
                        forms.fit_logreg_minibatch),
        exact_max_rows=LOGREG_EXACT_MAX_ROWS, strength_rank=0, simplicity_rank=1,
    ),
    "linear_svm": HeadSpec(
        name="linear_svm", build=_build_linear_svm, grid=lambda ctx: [{"C": c} for c in LINEAR_SVM_C],
        summary="standardise + linear SVM, C swept; sigmoid-calibrated probabilities",
        fixed=lambda ctx: {"class_weight": ctx.class_weight,
                           **({"calibration_folds": _calibration_folds(ctx)} if ctx.form == "exact" else
                              {"calibration": "held-out", "solver": "minibatch"})},
        batch_form=Form("minibatch", "one-vs-rest squared-hinge linear SVM (LinearSVC's objective): "
                        + MINIBATCH_SUMMARY + "; " + CALIBRATION_SUMMARY, forms.fit_linear_svm_minibatch),
        exact_max_rows=LINEAR_SVM_EXACT_MAX_ROWS, strength_rank=3, simplicity_rank=2,
        memory=_calibration_memory,
    ),
    "svm": HeadSpec(
        name="svm", build=_build_svm, search_path="kernel",
        grid=lambda ctx: [{"C": c, "gamma_factor": g, "gamma": _svm_gamma(ctx, g)}
                          for c in SVM_C for g in SVM_GAMMA_FACTORS],
        summary="cube root + standardise (+ PCA 512) + RBF SVM, C x gamma swept; sigmoid-calibrated",
        fixed=lambda ctx: {"class_weight": ctx.class_weight,
                           **({"pca_components": PCA_COMPONENTS if _svm_uses_pca(ctx) else None,
                               "calibration_folds": _calibration_folds(ctx)} if ctx.form == "exact" else
                              {"nystroem_components": min(ctx.nystroem_components, ctx.n_rows),
                               "calibration": "held-out"})},
        batch_form=Form("nystroem", f"RBF kernel approximated by a Nystroem map on {NYSTROEM_COMPONENTS:,} landmark "
                        "training rows (stratified, seeded), standardised, then the mini-batch linear SVM; "
                        + CALIBRATION_SUMMARY, forms.fit_svm_nystroem, score_fold=forms.score_svm_nystroem_fold),
        exact_max_rows=SVM_EXACT_MAX_ROWS, strength_rank=1, simplicity_rank=4,
        memory=_svm_memory,
    ),
    "knn": HeadSpec(
        name="knn", build=_build_knn, grid=_knn_grid, uses_class_weight=False, search_path="neighbors",
        summary="standardise + k nearest neighbours (cosine, distance-weighted), k swept",
        fixed=lambda ctx: {"metric": "cosine", "weights": "distance",
                           "index_rows": min(ctx.n_rows, ctx.knn_index_rows or ctx.n_rows)},
        batch_form=Form("bounded_index", "k-NN over a stratified, seeded subsample of the training rows (the "
                        "index); standardisation fitted on every training row", forms.fit_knn_bounded),
        exact_max_rows=KNN_EXACT_MAX_ROWS, strength_rank=4, simplicity_rank=3,
        memory=_knn_memory,
    ),
    "centroid": HeadSpec(
        name="centroid", build=_build_centroid, grid=lambda ctx: [{}], uses_class_weight=False,
        summary="standardise + nearest class centroid (baseline, nothing to tune)",
        strength_rank=5, simplicity_rank=0,
        exact_form=Form("exact", "class means and the pooled within-class deviation from per-class moments, one "
                        "pass over the rows (the same as NearestCentroid.fit)", forms.fit_centroid, exact=True),
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

