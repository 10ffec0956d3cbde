"""The protocol (splits, selection, refit, final numbers) and the metrics, on synthetic arrays."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from pipeline.errors import FitError
from pipeline.fit.evaluate import evaluate_head
from pipeline.fit.heads import HEADS
from pipeline.fit.metrics import compute_metrics, mistakes
from pipeline.fit.protocol import CV_FOLDS, hash_split, plan_protocol, selection_folds

NAMES = ["cat", "dog", "fox"]


def _paths(labels, prefix="") -> list[str]:
    return [f"{prefix}{NAMES[c]}/img_{i:04d}.jpg" for i, c in enumerate(labels)]


# ---- the hash split ------------------------------------------------------------------------------------------------


def test_hash_split_is_stable_when_images_are_added():
    labels = np.repeat([0, 1, 2], 200)
    paths = _paths(labels)
    before = dict(zip(paths, hash_split(paths, labels, 0.3, seed=0)))
    more_labels = np.concatenate([labels, np.repeat([0, 1, 2], 50)])
    more_paths = paths + [f"{NAMES[c]}/new_{i}.jpg" for i, c in enumerate(more_labels[600:])]
    after = dict(zip(more_paths, hash_split(more_paths, more_labels, 0.3, seed=0)))
    assert all(after[p] == s for p, s in before.items())
    # about 30 % per class, every class on both sides
    for c in range(3):
        frac = np.mean([before[p] == "test" for p, lab in zip(paths, labels) if lab == c])
        assert 0.2 < frac < 0.4
    # seeded: another seed is another split; path separators do not matter
    assert list(hash_split(paths, labels, 0.3, seed=1)) != list(before.values())
    win = [p.replace("/", "\\") for p in paths]
    assert list(hash_split(win, labels, 0.3, seed=0)) == list(before.values())


def test_hash_split_keeps_each_class_on_both_sides():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    splits = hash_split(_paths(labels), labels, 0.3, seed=0)
    for c in range(3):
        assert {"train", "test"} == set(splits[labels == c])


# ---- protocol planning and its errors ----------------------------------------------------------------------------


def test_protocol_without_split_folders_is_hash_then_cv():
    labels = np.repeat([0, 1, 2], 40)
    splits, p = plan_protocol(np.array([""] * 120), labels, NAMES, _paths(labels), seed=0)
    assert p.split_source == "hash" and p.selection == "cv" and p.final_splits == ["test"]
    assert p.cv_folds == CV_FOLDS and "sha1" in p.split_rule and set(splits) == {"train", "test"}
    folds = selection_folds(p, splits, labels, seed=0)
    assert len(folds) == CV_FOLDS
    train = set(np.flatnonzero(splits == "train"))
    scored = np.concatenate([s for _, s in folds])
    assert sorted(scored) == sorted(train)  # every training row scored once, no test row ever
    for f, s in folds:
        assert set(f) <= train and not set(f) & set(s)


def test_large_training_sets_use_three_folds_and_tiny_classes_fewer():
    labels = np.repeat([0, 1, 2], 1000)
    _, p = plan_protocol(np.array([""] * 3000), labels, NAMES, _paths(labels), seed=0)
    assert p.cv_folds == 3
    labels = np.array([0] * 30 + [1] * 30 + [2] * 4)
    splits = np.array(["train"] * 64)
    splits[[0, 30, 60]] = "test"  # 3 training images of the smallest class
    _, p = plan_protocol(splits, labels, NAMES, _paths(labels), seed=0)
    assert p.cv_folds == 3


def test_protocol_with_val_folder_selects_on_val_and_reports_val_and_test():
    labels = np.tile([0, 1, 2], 30)
    splits = np.array(["train"] * 60 + ["val"] * 15 + ["test"] * 15)
    s, p = plan_protocol(splits, labels, NAMES, _paths(labels), seed=0)
    assert p.selection == "val" and p.cv_folds is None and p.final_splits == ["val", "test"]
    assert p.split_source == "folders" and p.report_split == "test"
    (fit, score), = selection_folds(p, s, labels)
    assert set(s[fit]) == {"train"} and set(s[score]) == {"val"}
    _, p2 = plan_protocol(np.where(splits == "test", "val", splits), labels, NAMES, _paths(labels))
    assert p2.final_splits == ["val"]


@pytest.mark.parametrize("case, message", [
    ("one_class_train", "one class only"),
    ("class_missing_from_val", "no images in val/"),
    ("class_missing_from_train", "no training images"),
    ("single_image_class", "single image"),
    ("val_without_train", "no train/ folder"),
])
def test_protocol_errors_are_one_actionable_line(case, message):
    labels = np.tile([0, 1, 2], 20)
    splits = np.array(["train"] * 45 + ["val"] * 15)
    if case == "one_class_train":
        labels = np.where(splits == "train", 0, labels)
    elif case == "class_missing_from_val":
        labels = np.where((splits == "val") & (labels == 2), 1, labels)
    elif case == "class_missing_from_train":
        labels = np.where((splits == "train") & (labels == 2), 1, labels)
    elif case == "single_image_class":
        splits = np.array([""] * 60)
        labels = np.array([0] * 30 + [1] * 29 + [2])
    elif case == "val_without_train":
        splits = np.where(splits == "train", "test", splits)
    with pytest.raises(FitError) as e:
        plan_protocol(splits, labels, NAMES, _paths(labels), seed=0)
    assert message in str(e.value) and "\n" not in str(e.value)


# ---- metrics ------------------------------------------------------------------------------------------------------


def test_binary_metrics_have_auc_and_short_curves():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    p1 = np.clip(y * 0.6 + rng.random(1000) * 0.5, 0, 1)
    m = compute_metrics(y, np.c_[1 - p1, p1], ["neg", "pos"])
    assert m["n"] == 1000 and 0.5 < m["roc_auc"] <= 1 and "top5_accuracy" not in m
    assert 2 <= len(m["roc"]["fpr"]) == len(m["roc"]["tpr"]) <= 200
    assert 2 <= len(m["pr"]["precision"]) == len(m["pr"]["recall"]) <= 200
    assert m["roc"]["fpr"][0] == 0.0 and m["roc"]["fpr"][-1] == 1.0
    assert np.array(m["confusion_matrix"]).sum() == 1000
    assert set(m["per_class"]) == {"neg", "pos"}


def test_multiclass_metrics_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2, 3, 4])
    proba = np.full((8, 5), 0.05)
    pred = np.array([0, 1, 1, 1, 2, 0, 3, 4])
    proba[np.arange(8), pred] = 0.8
    m = compute_metrics(y, proba, list("abcde"))
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx(np.mean([0.5, 1, 0.5, 1, 1]))
    assert m["top5_accuracy"] == 1.0 and "roc_auc" not in m
    assert m["confusion_matrix"][0] == [1, 1, 0, 0, 0] and m["confusion_matrix"][2] == [1, 0, 1, 0, 0]
    assert m["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                   "support": 2}
    assert m["log_loss"] == pytest.approx(-np.mean(np.log(np.where(pred == y, 0.8, 0.05))), rel=1e-6)


def test_mistakes_are_the_most_confident_wrong_predictions():
    y = np.array([0, 1, 0, 1])
    proba = np.array([[0.1, 0.9], [0.3, 0.7], [0.4, 0.6], [0.95, 0.05]])
    out = mistakes(y, proba, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], ["test"] * 4, ["x", "y"])
    assert [m["path"] for m in out] == ["d.jpg", "a.jpg", "c.jpg"]
    assert out[0] == {"path": "d.jpg", "split": "test", "true": "y", "pred": "x", "prob": 0.95}


# ---- one head through the protocol ---------------------------------------------------------------------------------


class _Spy(ClassifierMixin, BaseEstimator):
    """Logistic regression that records the first feature of every row it was fitted on."""

    seen: list = []

    def fit(self, X, y):
        _Spy.seen.append(set(np.round(X[:, 0], 6)))
        self.inner_ = LogisticRegression(max_iter=200).fit(X, y)
        self.classes_ = self.inner_.classes_
        return self

    def predict_proba(self, X):
        return self.inner_.predict_proba(X)

    def predict(self, X):
        return self.inner_.predict(X)


@pytest.mark.parametrize("has_val", [True, False])
def test_test_rows_are_never_fitted_on_and_metrics_name_their_split(has_val):
    X, y = make_classification(300, 6, n_informative=4, n_classes=3, random_state=0)
    X[:, 0] = np.arange(300)  # a row id the spy can see
    X = X.astype(np.float32)
    if has_val:
        splits = np.array(["train"] * 150 + ["val"] * 75 + ["test"] * 75)
    else:
        splits = np.array([""] * 300)
    splits, protocol = plan_protocol(splits, y, NAMES, _paths(y), seed=0)
    spec = dataclasses.replace(HEADS["logreg"], name="spy", build=lambda ctx, p, s: _Spy(),
                               grid=lambda ctx: [{"a": 1}, {"a": 2}], search_path="plain", fixed=lambda ctx: {})
    _Spy.seen = []
    folds = selection_folds(protocol, splits, y, seed=0)
    res = evaluate_head(spec, X, y, splits, NAMES, _paths(y), protocol, folds, seed=0)
    test_ids = set(np.flatnonzero(splits == "test").astype(float))
    val_ids = set(np.flatnonzero(splits == "val").astype(float))
    assert _Spy.seen and all(not (seen & test_ids) for seen in _Spy.seen)
    assert all(not (seen & val_ids) for seen in _Spy.seen)  # refit on train only, also with a val split
    assert set(res.metrics) == set(protocol.final_splits)
    assert res.selection_split == ("val" if has_val else "cv")
    assert [len(c.scores) for c in res.search] == [len(folds)] * 2
    assert res.mistakes and all(m["split"] == protocol.report_split for m in res.mistakes)
    assert res.proba.shape == (len(res.final_rows), 3)


def test_evaluate_head_records_search_and_timings():
    X, y = make_classification(240, 10, n_informative=5, n_classes=2, random_state=1)
    splits, protocol = plan_protocol(np.array([""] * 240), y, ["no", "yes"], _paths(y), seed=0)
    folds = selection_folds(protocol, splits, y, seed=0)
    res = evaluate_head(HEADS["logreg"], X.astype(np.float32), y, splits, ["no", "yes"], _paths(y), protocol, folds)
    assert [c.params["C"] for c in res.search] == sorted(c.params["C"] for c in res.search)
    best = max(res.search, key=lambda c: c.mean)
    assert res.params["C"] == best.params["C"] and res.selection_score == best.mean
    assert res.fit_seconds > 0 and res.predict_ms_per_1000 > 0
    m = res.metrics["test"]
    assert 0.5 < m["accuracy"] <= 1 and m["roc_auc"] is not None and m["n"] == int((splits == "test").sum())
    j = res.to_json()
    assert j["history"] is None and j["selection_split"] == "cv" and len(j["search"][0]["scores"]) == len(folds)
