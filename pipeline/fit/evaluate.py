"""One head on one feature set: search, refit on train, evaluate on the final splits (see :mod:`.protocol`).

The rows come from a :class:`FitData`: a cache's labels, splits and paths in memory, and its features either in
memory or read in blocks from the open cache. The head is fitted in the form its :class:`~pipeline.fit.plan.
HeadPlan` says; the search scores that same form on the search rows (all training rows, or the subsample), the
chosen candidate is refitted on every training row, and the final splits are predicted block by block.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.fit.heads import HeadContext, HeadSpec, flatten_features
from pipeline.fit.metrics import compute_metrics, mistakes
from pipeline.fit.plan import CachePlan, CostPolicy, HeadPlan, MemoryBudget, plan_cache, plan_head
from pipeline.fit.protocol import Candidate, Protocol, SearchRows, _quiet_fit_warnings, best_candidate, search
from pipeline.fit.stream import ArraySource, ReaderSource, RowSource
from pipeline.fit.views import (ViewChoice, augmented_source, best_mode, offered_modes, score_view_modes, tta_proba,
                                uses_train, uses_tta)
from pipeline.results import jsonable
from pipeline.stats import selection_se

__all__ = ["HeadResult", "FitData", "evaluate_head", "evaluate_planned", "make_context", "proba_in_class_order"]


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
    selection_index: int = 0
    search_seconds: float = 0.0
    cost: dict[str, Any] = field(default_factory=dict)
    views: ViewChoice | None = None
    selection_rows: int = 0
    selection_fit_rows: int = 0

    def to_json(self) -> dict[str, Any]:
        """The per-head fields of a results.json entry (without key, cache and file names).

        ``selection.score`` is the selection score of what was chosen: the candidate's search score, or, when the
        head chose among view modes, the chosen mode's score (``views.selection``).
        """
        chosen = self.search[self.selection_index]
        score, std, scores = chosen.mean, chosen.std, list(chosen.scores)
        if self.views is not None and self.views.chosen in self.views.selection:
            score = self.views.selection[self.views.chosen]["mean"]
            std = self.views.selection[self.views.chosen]["std"]
            scores = list(self.views.selection[self.views.chosen]["scores"])
        se = selection_se(scores, self.selection_rows, self.selection_fit_rows)
        return {"head": self.head, "params": jsonable(self.params), "selection_split": self.selection_split,
                "selection": {"index": int(self.selection_index), "score": score, "std": std,
                              "se": se if np.isfinite(se) else None, "scores": [float(v) for v in scores],
                              "n": int(self.selection_rows)},
                "search": [c.to_json() for c in self.search], "cost": jsonable(self.cost),
                "search_seconds": float(self.search_seconds), "fit_seconds": float(self.fit_seconds),
                "predict_ms_per_1000": float(self.predict_ms_per_1000), "metrics": self.metrics,
                "history": self.history, "mistakes": self.mistakes,
                "views": self.views.to_json() if self.views is not None else None}


@dataclass
class FitData:
    """One cache's rows during a fit.

    Attributes
    ----------
    labels : ndarray of int
        Class index of every row of the run (rows aligned across the run's caches).
    class_names : list of str
    shape : tuple of int
        Shape of one row's features.
    X : ndarray or None
        Features of the rows in ``held`` (all rows used by the run when the features are in memory; the search
        rows when they are streamed).
    held : ndarray
        Sorted rows whose features are in ``X``.
    reader : FeatureReader or None
        The open cache, when features are streamed.
    reader_rows : ndarray or None
        Reader row (index into ``reader.paths``) of every row of the run.
    plan : CachePlan
    V : ndarray or None
        Augmented views ``(len(held), K, d)`` of the rows in ``held``, when the cache has views and they are used.
    view_spec : dict or None
        The cache's view spec (None: the cache has no views).
    views_note : str
        Why the cache's views are not used (empty when they are, or when there are none).
    """

    labels: np.ndarray
    class_names: list[str]
    shape: tuple[int, ...]
    X: np.ndarray | None
    held: np.ndarray
    plan: CachePlan
    reader: Any = None
    reader_rows: np.ndarray | None = None
    V: np.ndarray | None = None
    view_spec: dict[str, Any] | None = None
    views_note: str = ""

    def held_views(self, rows: np.ndarray) -> np.ndarray:
        """Views of rows held in memory (a copy in ``rows`` order)."""
        return self.V[self._pos(np.asarray(rows, dtype=np.int64))]

    def _pos(self, rows: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.held, rows)
        if len(rows) and (pos.max() >= len(self.held) or not np.array_equal(self.held[pos], rows)):
            raise ValueError("internal: rows asked for are not held in memory")
        return pos

    def held_features(self, rows: np.ndarray) -> np.ndarray:
        """Features of rows held in memory (a copy in ``rows`` order)."""
        return self.X[self._pos(np.asarray(rows, dtype=np.int64))]

    def source(self, rows: np.ndarray) -> RowSource:
        """The training rows ``rows`` as a source: from memory, or read from the cache in blocks."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.reader is None:
            return ArraySource(self.X, self.labels[rows], self.class_names, index=self._pos(rows))
        return ReaderSource(self.reader, self.reader_rows[rows], self.labels[rows], self.class_names,
                            block_rows=self.plan.block_rows,
                            buffer_blocks=max(1, self.plan.buffer_rows // self.plan.block_rows))

    def blocks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Features of ``rows`` in order, in blocks of at most the plan's buffer: ``(positions, features)``."""
        rows = np.asarray(rows, dtype=np.int64)
        step = self.plan.buffer_rows
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            if self.reader is None:
                yield np.arange(start, start + len(part)), self.X[self._pos(part)]
            else:
                src = ReaderSource(self.reader, self.reader_rows[part], self.labels[part], self.class_names,
                                   block_rows=self.plan.block_rows)
                yield np.arange(start, start + len(part)), src.take(np.arange(len(part)))


def proba_in_class_order(estimator: Any, X: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """``predict_proba`` with columns reordered to ``class_names`` (the estimator was fitted on class names)."""
    raw = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    index = {str(c): i for i, c in enumerate(class_names)}
    out = np.zeros((len(raw), len(class_names)), dtype=np.float64)
    for j, c in enumerate(estimator.classes_):
        out[:, index[str(c)]] = raw[:, j]
    return out


def make_context(shape: tuple[int, ...], labels: np.ndarray, splits: np.ndarray, n_classes: int, seed: int,
                 class_weight: str | None) -> HeadContext:
    """The :class:`HeadContext` of the final fit (the training split)."""
    train = splits == "train"
    counts = np.bincount(np.asarray(labels)[train], minlength=n_classes)
    shape = tuple(int(s) for s in shape)
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


def _working_memory(plan: CachePlan):
    """Bound scikit-learn's chunked pairwise computations (k-NN distances) to the budget's buffer share (an eighth)."""
    import sklearn

    mib = max(16, int(plan.budget.buffer_bytes // 2 ** 20))
    return sklearn.config_context(working_memory=min(256, mib))


def evaluate_planned(spec: HeadSpec, hp: HeadPlan, data: FitData, splits: np.ndarray, paths: Sequence[str],
                     protocol: Protocol, srows: SearchRows) -> HeadResult:
    """Search, refit on every training row and evaluate one head on the final splits, as ``hp`` plans it.

    Parameters
    ----------
    spec : HeadSpec
    hp : HeadPlan
        From :func:`pipeline.fit.plan.plan_head` (not skipped).
    data : FitData
    splits : ndarray of str
        Split of every row of the run.
    paths : sequence of str
        Relative path of every row of the run.
    protocol : Protocol
    srows : SearchRows
        The search's folds (shared by every head and cache of the run).

    Returns
    -------
    HeadResult
    """
    if hp.form is None:
        raise ValueError(f"internal: head {spec.name} is skipped: {hp.skipped}")
    ctx, form = hp.ctx, hp.form
    class_names = list(data.class_names)
    names = np.asarray([str(c) for c in class_names])
    labels = np.asarray(data.labels, dtype=np.int64)
    train = np.flatnonzero(splits == "train")
    final_rows = np.flatnonzero(np.isin(splits, protocol.final_splits))

    def as_input(X: np.ndarray) -> np.ndarray:
        return X if spec.takes_maps else flatten_features(X)

    reuse: dict[int, Any] = {}
    with _blas_threads(spec), _working_memory(data.plan), warnings.catch_warnings():
        _quiet_fit_warnings()
        t0 = time.perf_counter()
        Xs = as_input(data.held_features(srows.rows))
        local = [(np.searchsorted(srows.rows, f), np.searchsorted(srows.rows, s)) for f, s in srows.folds]
        cands = search(spec, ctx, Xs, names[labels[srows.rows]], local, form=form, reuse=reuse)
        del Xs
        search_seconds = time.perf_counter() - t0
        best = best_candidate(cands)
        chosen = dict(cands[best].params)

        est = None
        if spec.search_path == "reuse" and best in reuse:  # same network, compiled once: refit it on all rows
            est = reuse[best].set_params(**spec.build(ctx, chosen, False).get_params())
        t0 = time.perf_counter()
        est = form.fit(ctx, chosen, data.source(train), False, spec, est=est)
        fit_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        proba = np.zeros((len(final_rows), len(class_names)), dtype=np.float64)
        for pos, X in data.blocks(final_rows):
            proba[pos] = proba_in_class_order(est, as_input(X), class_names)
        elapsed = time.perf_counter() - t0

        views, proba_none = None, proba
        if data.view_spec is not None:
            views = _choose_views(spec, hp, data, srows, local, chosen, class_names, labels, len(train))
            if views.chosen != "none":
                t_views = time.perf_counter()
                if uses_train(views.chosen):
                    src = augmented_source(as_input(data.held_features(train)), data.held_views(train),
                                           labels[train], names)
                    t0 = time.perf_counter()
                    est = form.fit(ctx, chosen, src, False, spec)
                    fit_seconds = time.perf_counter() - t0
                    del src
                t0 = time.perf_counter()
                Xf = as_input(data.held_features(final_rows))
                if uses_tta(views.chosen):
                    proba = tta_proba(lambda Z: proba_in_class_order(est, Z, class_names), Xf,
                                      data.held_views(final_rows))
                else:
                    proba = proba_in_class_order(est, Xf, class_names)
                elapsed = time.perf_counter() - t0
                del Xf
                views.seconds += time.perf_counter() - t_views - elapsed
    ms_per_1000 = elapsed * 1000.0 * 1000.0 / max(1, len(final_rows))

    final_labels, final_splits = labels[final_rows], splits[final_rows]
    metrics = _final_metrics(final_labels, final_splits, proba, proba_none, protocol.final_splits, class_names,
                             ctx.seed, views)
    rep = final_splits == protocol.report_split
    wrong = mistakes(final_labels[rep], proba[rep], [paths[i] for i in final_rows[rep]], list(final_splits[rep]),
                     class_names)
    return HeadResult(head=spec.name, params=_recorded_params(spec, ctx, chosen, est),
                      selection_split=protocol.selection,
                      selection_score=cands[best].mean, search=cands, fit_seconds=fit_seconds,
                      predict_ms_per_1000=ms_per_1000, metrics=metrics, history=_history(est), mistakes=wrong,
                      estimator=est, final_rows=final_rows, proba=proba, selection_index=best,
                      search_seconds=search_seconds, cost=hp.to_json(srows.to_json()), views=views,
                      selection_rows=int(sum(len(sc) for _, sc in srows.folds)),
                      selection_fit_rows=int(sum(len(f) for f, _ in srows.folds)))


_VIEW_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss")
"""Final-split metrics recorded with and without views (``views.final``)."""


def _final_metrics(labels: np.ndarray, splits: np.ndarray, proba: np.ndarray, proba_none: np.ndarray,
                   final_splits: Sequence[str], class_names: list[str], seed: int,
                   views: ViewChoice | None) -> dict[str, dict[str, Any]]:
    """The metrics of each final split (``labels``, ``splits`` and ``proba`` of the final rows), and with views the
    same metrics without them into ``views.final`` (``proba_none``: the head's probabilities on centre views)."""
    metrics = {}
    for s in final_splits:
        m = splits == s
        metrics[s] = compute_metrics(labels[m], proba[m], class_names, seed=seed)
        if views is not None:
            without = compute_metrics(labels[m], proba_none[m], class_names)
            w = {k: metrics[s].get(k) for k in _VIEW_METRICS}
            wo = {k: without.get(k) for k in _VIEW_METRICS}
            views.final[s] = {"with": w, "without": wo,
                              "added": {k: (float(w[k]) - float(wo[k]) if w[k] is not None and wo[k] is not None
                                            else None) for k in _VIEW_METRICS}}
    return metrics


def _history(est: Any) -> dict[str, list[float]] | None:
    """A Keras head's training curves (None for heads without epochs)."""
    if not hasattr(est, "history_"):
        return None
    return {k: [float(v) for v in est.history_.get(k, [])] for k in ("loss", "val_loss", "accuracy", "val_accuracy")}


def _recorded_params(spec: HeadSpec, ctx: HeadContext, chosen: dict[str, Any], est: Any) -> dict[str, Any]:
    """The head's fixed and chosen hyperparameters, with what its fit learned of them (epochs run, the best epoch,
    what the number of epochs rests on: rule, held-out rows, folds)."""
    params = {**spec.fixed(ctx), **chosen}
    if hasattr(est, "n_epochs_"):
        params.update({"epochs_run": int(est.n_epochs_), "best_epoch": int(est.best_epoch_)})
    stopping = getattr(est, "early_stopping_", None)
    if isinstance(stopping, dict):
        params.update({"stopping": str(stopping["rule"]), "stopping_rows": int(stopping["rows"]),
                       "stopping_folds": int(stopping["folds"])})
    return params


def _choose_views(spec: HeadSpec, hp: HeadPlan, data: FitData, srows: SearchRows,
                  local: list[tuple[np.ndarray, np.ndarray]], chosen: dict[str, Any], class_names: list[str],
                  labels: np.ndarray, n_train: int) -> ViewChoice:
    """Score the offered view modes at the chosen candidate on the search folds and pick one (see
    :mod:`pipeline.fit.views`)."""
    vspec = dict(data.view_spec or {})
    k = int(vspec.get("n", 0))
    choice = ViewChoice(available=k, spec=vspec)
    if data.V is None:
        choice.notes.append(f"views not used: {data.views_note or 'no views of these features in the cache'}")
        return choice
    ctx, form = hp.ctx, hp.form
    limit = spec.exact_max_rows
    train_ok = not (form.exact and limit is not None and (k + 1) * n_train > limit)
    why = (f"{n_train:,} training rows with their {k} views each exceed the {limit:,} rows of the head's exact form"
           if not train_ok else "")
    has_proba = hasattr(spec.build(ctx, chosen, False), "predict_proba")
    modes, notes = offered_modes(k, has_proba, train_ok, why)
    choice.offered, choice.notes = modes, notes
    if len(modes) == 1:
        return choice
    t0 = time.perf_counter()
    X = data.held_features(srows.rows)
    X = X if spec.takes_maps else flatten_features(X)
    V = data.held_views(srows.rows)
    # heads refitted in place (the dense head: one compiled network) share one instance across the folds; each fold's
    # estimator is used before the next fold refits it
    shared = spec.build(ctx, chosen, False) if spec.search_path == "reuse" else None
    scores = score_view_modes(lambda src: form.fit(ctx, chosen, src, False, spec, est=shared),
                              lambda est, Z: proba_in_class_order(est, Z, class_names),
                              X, V, labels[srows.rows], class_names, local, modes)
    choice.selection = {m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "scores": [float(x) for x in v]}
                        for m, v in scores.items()}
    choice.chosen = best_mode(scores)
    choice.seconds = time.perf_counter() - t0
    return choice


def evaluate_head(spec: HeadSpec, X: np.ndarray, labels: np.ndarray, splits: np.ndarray,
                  class_names: Sequence[str], paths: Sequence[str], protocol: Protocol,
                  folds: list[tuple[np.ndarray, np.ndarray]], seed: int = 0,
                  class_weight: str | None = None, budget: MemoryBudget | None = None,
                  policy: CostPolicy | None = None, views: np.ndarray | None = None,
                  view_spec: dict[str, Any] | None = None) -> HeadResult:
    """Search, refit on train, and evaluate one head on features in memory, by the module's protocol.

    Parameters
    ----------
    spec : HeadSpec
    X : ndarray
        Features of all rows, ``(n, d)`` or ``(n, h, w, c)`` (flattened for heads that take 2-D input).
    labels : ndarray of int
        Class index of each row.
    splits : ndarray of str
        Split of each row (from :func:`~pipeline.fit.protocol.plan_protocol`).
    class_names, paths : sequence of str
    protocol : Protocol
    folds : list of (ndarray, ndarray)
        From :func:`~pipeline.fit.protocol.selection_folds` (shared by all heads of a run).
    seed : int
    class_weight : {None, "balanced"}
    budget : MemoryBudget, optional
        Default: large enough to hold ``X`` in memory.
    policy : CostPolicy, optional
    views : ndarray, optional
        Augmented views ``(n, K, d)`` of every row: the head then chooses its view mode (:mod:`.views`).
    view_spec : dict, optional
        The view spec recorded with the result (default ``{"n": K}``).

    Returns
    -------
    HeadResult
    """
    labels = np.asarray(labels, dtype=np.int64)
    shape = tuple(int(s) for s in X.shape[1:])
    n_train = int((splits == "train").sum())
    budget = budget or MemoryBudget(max(1 << 30, 8 * X.size * 4), "in memory")
    cplan = plan_cache(len(X), shape, budget, policy)
    rows = np.unique(np.concatenate([np.concatenate(f) for f in folds]))
    srows = SearchRows(folds, rows, n_train, int(len(np.unique(np.concatenate([f for f, _ in folds])))), False)
    ctx = make_context(shape, labels, splits, len(class_names), seed, class_weight)
    hp = plan_head(spec, ctx, cplan, srows.fit_rows, policy)
    if hp.skipped:
        raise ValueError(f"head {spec.name} is skipped: {hp.skipped}")
    spec_json = None if views is None else (view_spec or {"n": int(views.shape[1])})
    data = FitData(labels, list(class_names), shape, X, np.arange(len(X)), cplan, V=views, view_spec=spec_json)
    return evaluate_planned(spec, hp, data, np.asarray(splits).astype(str), paths, protocol, srows)
