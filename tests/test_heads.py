"""Heads: the registry, the scikit-learn estimator contract (the dense head passes sklearn's own checks),
determinism, saved files that load without this project, and searches that score exactly what they claim."""

from __future__ import annotations

import dataclasses
import sys

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.errors import FitError
from pipeline.fit.protocol import search
from pipeline.fit.heads import HEADS, DenseHead, HeadContext, get_head, resolve_heads

# Small and eager so that sklearn's ~50 checks (each fitting several times) take seconds; the contract they check
# does not depend on how Keras executes. check_classifiers_train needs > 0.83 training accuracy, and
# check_class_weight_classifiers a class weight that moves 87 % of predictions, in 4 epochs (3 was enough for the
# draw of weights the process-wide seed happened to give, not for the head's own seeded initializers).
CHECK_PARAMS = dict(hidden=8, epochs=4, learning_rate=0.03, batch_size=128, validation_fraction=0.0,
                    run_eagerly=True)

# Checks that cannot apply to this head, with the reason (none so far: every applicable check passes). sklearn
# itself skips the array-API and pandas checks when those optional packages are absent.
EXPECTED_FAILED_CHECKS: dict[str, str] = {}


def _data(n: int = 240, d: int = 12, k: int = 3, seed: int = 0, weights=None) -> tuple[np.ndarray, np.ndarray]:
    X, y = make_classification(n, d, n_informative=6, n_redundant=2, n_classes=k, random_state=seed, weights=weights)
    names = np.array(["alpha", "beta", "gamma", "delta", "eps"])[:k]
    return X.astype(np.float32), names[y]


def _ctx(X: np.ndarray, y: np.ndarray, **kw) -> HeadContext:
    _, counts = np.unique(y, return_counts=True)
    return HeadContext(n_features=X.shape[1], n_classes=len(counts), n_rows=len(y), min_class_rows=int(counts.min()),
                       input_shape=tuple(X.shape[1:]), **kw)


@parametrize_with_checks([DenseHead(**CHECK_PARAMS)], expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_dense_head_passes_sklearn_estimator_checks(estimator, check):
    check(estimator)


# ---- registry ----------------------------------------------------------------------------------------------------


def test_registry_has_the_promised_heads():
    assert {"dense", "logreg", "linear_svm", "svm", "knn", "centroid"} <= set(HEADS)
    assert resolve_heads(["all"]) == list(HEADS)
    assert resolve_heads(None) == list(HEADS)
    assert resolve_heads(["svm", "logreg", "svm"]) == ["logreg", "svm"]  # registry order, once each
    assert resolve_heads(["knn,dense"]) == ["dense", "knn"]


def test_unknown_head_error_lists_known_heads():
    with pytest.raises(FitError) as e:
        resolve_heads(["logreg", "random_forest"])
    msg = str(e.value)
    assert "random_forest" in msg and all(name in msg for name in HEADS) and "\n" not in msg
    with pytest.raises(FitError):
        get_head("nope")


# ---- scikit-learn heads ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n, s in HEADS.items() if s.kind == "sklearn"])
def test_sklearn_head_contract_and_standalone_file(name, tmp_path, monkeypatch):
    X, y = _data(weights=[0.45, 0.35, 0.2])  # unequal classes, as in real data (see the centroid note in heads.py)
    spec = HEADS[name]
    ctx = _ctx(X, y)
    grid = spec.grid(ctx)
    assert grid, name
    est = spec.build(ctx, grid[0], False)
    twin = clone(est)
    assert twin.get_params().keys() == est.get_params().keys()
    assert est.fit(X, y) is est
    proba = est.predict_proba(X)
    assert proba.shape == (len(y), 3) and np.allclose(proba.sum(axis=1), 1.0)
    assert list(est.classes_) == ["alpha", "beta", "gamma"]
    assert set(est.predict(X)) <= set(y)
    # predict is the most probable class (the protocol relies on it)
    assert (est.classes_[proba.argmax(axis=1)] == est.predict(X)).mean() > 0.98
    # the saved pipeline references scikit-learn / NumPy only: loadable without this project
    path = tmp_path / f"{name}.joblib"
    joblib.dump(est, path)
    for mod in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
        monkeypatch.setitem(sys.modules, mod, None)  # any reference to this project would now fail to import
    again = joblib.load(path)
    assert np.array_equal(again.predict_proba(X), proba)


def test_scaling_lives_inside_every_sklearn_head():
    X, y = _data()
    ctx = _ctx(X, y)
    for name, spec in HEADS.items():
        if spec.kind == "sklearn":
            est = spec.build(ctx, spec.grid(ctx)[0], False)
            assert "scale" in est.named_steps, name


def test_svm_uses_pca_only_on_large_wide_inputs():
    small = HeadContext(n_features=1280, n_classes=5, n_rows=300, min_class_rows=50)
    large = HeadContext(n_features=1280, n_classes=5, n_rows=3000, min_class_rows=500)
    narrow = HeadContext(n_features=64, n_classes=5, n_rows=3000, min_class_rows=500)
    p = HEADS["svm"].grid(large)[0]
    assert "pca" not in HEADS["svm"].build(small, p, False).named_steps
    assert "pca" in HEADS["svm"].build(large, p, False).named_steps
    assert "pca" not in HEADS["svm"].build(narrow, p, False).named_steps


def test_class_weight_reaches_heads_that_use_it():
    X, y = _data()
    ctx = _ctx(X, y, class_weight="balanced")
    for name in ("logreg", "linear_svm", "svm"):
        est = HEADS[name].build(ctx, HEADS[name].grid(ctx)[0], True)
        assert est.named_steps["clf"].class_weight == "balanced", name
    assert HEADS["dense"].build(ctx, {}, True).class_weight == "balanced"


@pytest.mark.parametrize("name, form", [("svm", "exact"), ("logreg", "exact"), ("knn", "exact"),
                                        ("knn", "batch"), ("svm", "batch")])
def test_fast_search_paths_score_what_a_plain_search_scores(name, form):
    """The precomputed-kernel (svm), warm-start (logreg), one-neighbour-search (knn) and map-once-per-gamma
    (Nystroem svm) sweeps give the plain per-candidate fit's scores."""
    X, y = _data(300, 20)
    spec = HEADS[name]
    ctx = dataclasses.replace(_ctx(X, y), knn_index_rows=150, nystroem_components=60)
    the_form = spec.exact_form if form == "exact" else spec.batch_form
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    folds = [(idx[:200], idx[200:]), (idx[100:], idx[:100])]
    fast = search(spec, ctx, X, y, folds, form=the_form)
    plain = search(dataclasses.replace(spec, search_path="plain"), ctx, X, y, folds,
                   form=dataclasses.replace(the_form, score_fold=None))
    for a, b in zip(fast, plain):
        assert a.params == b.params
        tol = 0.02 if (name, form) == ("logreg", "exact") else 1e-9  # warm starts stop at the same tolerance
        assert np.allclose(a.scores, b.scores, atol=tol), (a.params, a.scores, b.scores)


# ---- the dense head (graph mode, as used) -------------------------------------------------------------------------


def test_dense_head_takes_keyword_arguments_only_and_clones():
    with pytest.raises(TypeError):
        DenseHead(16)  # a positional width would be the scikit-learn contract's silent trap
    head = DenseHead(hidden=16, epochs=3, random_state=5)
    copy = clone(head)
    assert copy is not head and copy.get_params() == head.get_params()


def test_dense_head_is_deterministic_and_seeded():
    X, y = _data(200, 10)
    a = DenseHead(hidden=16, epochs=6, random_state=3).fit(X, y).predict_proba(X)
    b = DenseHead(hidden=16, epochs=6, random_state=3).fit(X, y).predict_proba(X)
    c = DenseHead(hidden=16, epochs=6, random_state=4).fit(X, y).predict_proba(X)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dense_head_leaves_the_process_generators_alone():
    import random

    X, y = _data(80, 12)
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    DenseHead(hidden=8, epochs=2, random_state=7, run_eagerly=True).fit(X, y)
    assert (np.random.random(), random.random()) == expected


def test_dense_head_early_stopping_history_and_saved_model(tmp_path):
    import keras

    X, y = _data(300, 10)
    head = DenseHead(hidden=16, epochs=200, patience=3, learning_rate=0.01, random_state=0,
                     validation_min_rows=30).fit(X, y)
    assert head.early_stopping_ == {"rule": "holdout", "rows": 30, "folds": 0}
    h = head.history_
    assert set(h) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(h["loss"]) == len(h["val_loss"]) == head.n_epochs_ < 200  # stopped early
    assert head.best_epoch_ == int(np.argmin(h["val_loss"])) + 1
    path = head.save(tmp_path / "dense.keras")
    model = keras.models.load_model(path)  # plain Keras: standardisation is inside, softmax over classes_
    p = model.predict(X, verbose=0)
    assert np.allclose(p, head.predict_proba(X), atol=1e-5)
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-5)


def test_dense_head_chooses_epochs_by_cross_validation_on_small_sets():
    # 60 rows: a 10 % held-out part would be 6 rows, too few to pick an epoch on (the floor is 50 rows)
    X, y = _data(60, 10)
    head = DenseHead(hidden=16, epochs=200, patience=3, learning_rate=0.01, random_state=0).fit(X, y)
    es = head.early_stopping_
    assert es["rule"] == "cv" and es["folds"] == 3 and es["rows"] == 20 and len(es["fold_best_epochs"]) == 3
    assert all(1 <= b < 200 for b in es["fold_best_epochs"])
    # then every row is trained on, for the median best epoch, without a held-out part
    assert head.n_epochs_ == head.best_epoch_ == int(round(float(np.median(es["fold_best_epochs"]))))
    assert "val_loss" not in head.history_ and len(head.history_["loss"]) == head.n_epochs_
    # the folds are disjoint, stratified and cover every row once
    codes = np.unique(y, return_inverse=True)[1]
    folds = head._epoch_folds(codes, None)
    held = np.concatenate([v for _, v in folds])
    assert sorted(held) == list(range(60))
    assert all(np.array_equal(np.bincount(codes[v]), [7, 7, 6]) or sorted(np.bincount(codes[v])) == [6, 7, 7]
               for _, v in folds)
    # a class with too few rows for two folds: no held-out part at all, recorded as such
    y_one = y.copy()
    y_one[:] = "a"
    y_one[0] = "b"
    tiny = DenseHead(hidden=8, epochs=3, random_state=0).fit(X, y_one)
    assert tiny.early_stopping_ == {"rule": "none", "rows": 0, "folds": 0} and tiny.n_epochs_ == 3


def test_dense_head_takes_spatial_maps_by_flattening(tmp_path):
    import keras

    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b"], 40)
    X = rng.normal(size=(80, 3, 3, 4)).astype(np.float16)
    X[y == "b", 1, 1, :] += 2.0  # the class lives in one spatial position
    head = DenseHead(hidden=8, epochs=30, learning_rate=0.01, validation_fraction=0.0).fit(X, y)
    assert head.input_shape_ == (3, 3, 4)
    assert (head.predict(X) == y).mean() > 0.9
    assert any(isinstance(layer, keras.layers.Flatten) for layer in head.model_.layers)
    norm = next(layer for layer in head.model_.layers if isinstance(layer, keras.layers.Normalization))
    assert np.size(norm.mean) == 4  # one mean per channel, shared by all positions
    with pytest.raises(ValueError):
        head.predict_proba(X.reshape(80, -1))


def test_dense_head_balanced_class_weight_runs():
    X, y = _data(200, 8, k=2)
    y = np.where(np.arange(len(y)) < 170, "alpha", "beta")
    head = DenseHead(hidden=8, epochs=4, class_weight="balanced").fit(X, y)
    assert head.predict_proba(X).shape == (200, 2)


def test_context_holds_the_class_weight_as_estimators_take_it():
    """HeadContext is the one place the class weight is checked: the heads hand it to their estimators as it is."""
    X, y = make_classification(n_samples=40, n_features=6, random_state=0)
    assert _ctx(X, y).class_weight is None and _ctx(X, y, class_weight="balanced").class_weight == "balanced"
    with pytest.raises(ValueError, match="class_weight must be None or 'balanced', got 'none'"):
        _ctx(X, y, class_weight="none")  # the CLI's spelling never reaches a head: FitConfig maps it
    spec = get_head("logreg")
    est = spec.build(_ctx(X, y, class_weight="balanced"), {"C": 1.0}, False)
    assert est.get_params()["clf__class_weight"] == "balanced"
