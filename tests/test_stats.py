"""Intervals, paired tests and pick rules on constructed numbers (pipeline.stats, pipeline.fit.pick)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import stats
from pipeline.fit.pick import PICK_RULES, pick
from pipeline.fit.verdict import verdict


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(147, 153), (0, 10), (10, 10), (59, 65), (1, 2)])
def test_wilson_interval_is_scipys_and_the_textbook_formula(k, n):
    from scipy.stats import binomtest

    lo, hi = stats.wilson_interval(k, n)
    ci = binomtest(k, n).proportion_ci(method="wilson")
    assert (lo, hi) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert (lo, hi) == pytest.approx(_wilson_by_hand(k, n), abs=1e-12)
    assert stats.wilson_interval(0, 0) is None


def test_wilson_at_the_issue_figure():
    """0.961 on 153 val images is about 0.917-0.982."""
    lo, hi = stats.wilson_interval(147, 153)
    assert round(lo, 3) == 0.917 and round(hi, 3) == 0.982


def _two_sided_binomial(b: int, c: int) -> float:
    n, m = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(m + 1)) / 2 ** n)


@pytest.mark.parametrize("b,c", [(15, 5), (5, 15), (3, 3), (6, 0), (0, 20), (1, 0), (40, 28)])
def test_mcnemar_exact_is_the_two_sided_binomial(b, c):
    assert stats.mcnemar_exact(b, c) == pytest.approx(_two_sided_binomial(b, c), rel=1e-12)


def test_mcnemar_edges():
    assert stats.mcnemar_exact(0, 0) == 1.0  # no discordant image: no evidence either way
    assert stats.mcnemar_exact(6, 0) == pytest.approx(2 / 64)  # the smallest all-one-way count below 0.05
    assert stats.mcnemar_exact(5, 0) == pytest.approx(2 / 32) and stats.mcnemar_exact(5, 0) > 0.05
    assert stats.mcnemar_exact(15, 5) < 0.05 < stats.mcnemar_exact(14, 6)  # "15 of 20 one way for p < 0.05"
    assert stats.min_detectable_difference(153) == {"images": 6, "delta": 6 / 153}


def test_holm_on_a_known_set():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x with a running maximum
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and stats.holm([]) == []
    assert stats.holm([0.2]) == pytest.approx([0.2])


def test_paired_bootstrap_is_seeded_and_pairs_by_image():
    rng = np.random.default_rng(0)
    a = rng.random(200) < 0.9
    b = a.copy()
    b[rng.choice(200, 12, replace=False)] ^= True
    d1 = stats.paired_difference(a, b, 3)
    assert d1 == stats.paired_difference(a, b, 3)  # same seed, same interval
    x = rng.random(50)  # on continuous values, another seed draws other resamples
    assert stats.bootstrap_interval(stats._mean, (x,), 3) == stats.bootstrap_interval(stats._mean, (x,), 3)
    assert stats.bootstrap_interval(stats._mean, (x,), 3) != stats.bootstrap_interval(stats._mean, (x,), 4)
    assert d1["delta"] == pytest.approx(a.mean() - b.mean())
    assert d1["a_only_right"] + d1["b_only_right"] == 12
    assert d1["p_value"] == stats.mcnemar_exact(d1["a_only_right"], d1["b_only_right"])
    # paired: the same answers on every image differ by exactly 0 in every resample; an unpaired bootstrap of two
    # heads with these marginals would give an interval several points wide
    same = stats.paired_difference(a, a, 3)
    assert same["delta_interval"] == [0.0, 0.0] and same["tied"] and same["p_value"] == 1.0
    unpaired = stats.bootstrap_interval(lambda x, y, axis=-1: x.mean(axis) - y.mean(axis),
                                        (a.astype(float), a.astype(float)), 3, paired=False)
    assert unpaired[1] - unpaired[0] > 0.04
    # the interval is of the per-image differences: shuffling images jointly keeps the pairs, so the difference and
    # the discordant counts stay, while shuffling one head alone breaks them
    perm = rng.permutation(200)
    assert stats.paired_difference(a[perm], b[perm], 3)["a_only_right"] == d1["a_only_right"]
    assert stats.paired_difference(a[perm], b, 3)["a_only_right"] != d1["a_only_right"]


def test_a_clear_difference_is_not_tied():
    a = np.ones(300, bool)
    b = np.ones(300, bool)
    b[:30] = False
    d = stats.paired_difference(a, b, 0)
    assert not d["tied"] and d["delta_interval"][0] > 0 and d["p_value"] < 1e-8


def test_metric_intervals_hold_the_point_estimates_and_are_seeded():
    from pipeline.fit.metrics import compute_metrics

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    proba = np.clip(np.c_[1 - y, y] * 0.3 + rng.random((120, 2)), 0.01, None)
    proba /= proba.sum(axis=1, keepdims=True)
    m = compute_metrics(y, proba, ["a", "b"], seed=5)
    assert set(m["intervals"]) == {"accuracy", "balanced_accuracy", "macro_f1", "log_loss", "roc_auc"}
    for name, (lo, hi) in m["intervals"].items():
        assert lo <= m[name] <= hi and hi - lo > 0.01, name
    assert m == compute_metrics(y, proba, ["a", "b"], seed=5)
    assert "intervals" not in compute_metrics(y, proba, ["a", "b"])
    # the vectorised bootstrap statistics equal scikit-learn's metrics on the whole sample
    from sklearn.metrics import balanced_accuracy_score, f1_score

    pred = rng.integers(0, 4, 500)
    yy = rng.integers(0, 4, 500)
    assert stats._balanced_accuracy(4)(yy[None], pred[None])[0] == pytest.approx(balanced_accuracy_score(yy, pred))
    assert stats._macro_f1(4)(yy[None], pred[None])[0] == pytest.approx(f1_score(yy, pred, average="macro"))


def test_corrected_t_by_hand():
    a, b = [0.90, 0.92, 0.88, 0.91, 0.90], [0.85, 0.90, 0.87, 0.90, 0.86]
    d = np.subtract(a, b)
    se = math.sqrt((1 / 5 + 1 / 4) * d.var(ddof=1))
    t = stats.corrected_paired_t(a, b, 1 / 4)
    from scipy.stats import t as tdist

    assert t["se"] == pytest.approx(se) and t["delta"] == pytest.approx(d.mean())
    assert t["p_value"] == pytest.approx(2 * tdist.sf(d.mean() / se, 4))
    # the correction widens the naive paired t-test's standard error
    assert t["se"] > math.sqrt(d.var(ddof=1) / 5)
    assert stats.corrected_paired_t([0.8, 0.8], [0.8, 0.8], 1.0)["p_value"] == 1.0


def _entries(rows):
    return [{"key": k, "head": h, "selection": {"score": s, "se": se}} for k, h, s, se in rows]


def test_pick_rules_on_constructed_tables():
    table = _entries([("a__svm", "svm", 0.985, 0.018), ("a__logreg", "logreg", 0.978, 0.018),
                      ("a__centroid", "centroid", 0.970, 0.02), ("a__knn", "knn", 0.90, 0.03)])
    assert pick(table, "best").index == 0
    one_se = pick(table, "one_se")
    assert one_se.index == 1 and one_se.within == [0, 1, 2] and "within one standard error" in one_se.reason
    assert pick(table, "one_se_simple").index == 2
    # nothing within one standard error: every rule takes the best
    clear = _entries([("x__knn", "knn", 0.95, 0.005), ("x__logreg", "logreg", 0.90, 0.005)])
    assert {pick(clear, r).index for r in PICK_RULES} == {0}
    # exact ties go to the earlier result; one head only is picked with its own reason
    tie = _entries([("b1__svm", "svm", 0.9, 0.0), ("b2__svm", "svm", 0.9, 0.0)])
    assert pick(tie, "best").index == 0 and pick(tie, "one_se").index == 0
    only = pick(_entries([("o__dense", "dense", 0.7, 0.1)]), "one_se")
    assert only.index == 0 and "only result" in only.reason
    # two backbones within noise, same head: the higher score of that head
    two = _entries([("m1__logreg", "logreg", 0.91, 0.02), ("m2__logreg", "logreg", 0.92, 0.02),
                    ("m2__svm", "svm", 0.93, 0.02)])
    assert pick(two, "one_se").index == 1
    with pytest.raises(ValueError):
        pick(table, "nope")


def test_verdict_compares_every_result_with_the_pick_on_the_same_images():
    rng = np.random.default_rng(2)
    entries = _entries([("a__svm", "svm", 0.96, 0.01), ("a__logreg", "logreg", 0.955, 0.01),
                        ("a__knn", "knn", 0.80, 0.01)])
    base = rng.random(150) < 0.95
    correct = {"a__svm": {"test": base}, "a__logreg": {"test": base.copy()}, "a__knn": {"test": rng.random(150) < 0.7}}
    for e, k in zip(entries, correct):
        acc = float(correct[k]["test"].mean())
        e["metrics"] = {"test": {"n": 150, "accuracy": acc, "intervals": {"accuracy": stats.wilson_interval(
            int(correct[k]["test"].sum()), 150)}}}
        e["selection"]["scores"] = [e["selection"]["score"]] * 5
    best = verdict(entries, correct, "test", "cv", "one_se", seed=0)
    assert best["key"] == "a__logreg" and best["rule"] == "one_se" and best["n"] == 150
    assert best["tied_with"] == ["a__svm"] and best["within_one_se"] == ["a__svm"]
    assert best["min_detectable"]["images"] == 6
    assert "vs_pick" not in entries[1]
    svm, knn = entries[0]["vs_pick"], entries[2]["vs_pick"]
    assert svm["tied"] and svm["delta"] == 0 and svm["p_value"] == 1.0
    assert not knn["tied"] and knn["delta"] < 0 and knn["p_holm"] == pytest.approx(min(1.0, 2 * knn["p_value"]))
    assert knn["pick_only_right"] > knn["other_only_right"] and knn["selection"]["method"] == "nadeau_bengio"
