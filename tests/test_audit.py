"""The data audit: duplicates, leaks, suspect labels and outliers (pipeline/audit), alone and inside `fit`."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from sklearn.neighbors import KNeighborsClassifier

from pipeline.audit import AuditConfig, AuditImages, AuditSource, run_audit
from pipeline.audit.duplicates import find_duplicates, near_threshold
from pipeline.audit.labels import label_issues, out_of_fold_proba
from pipeline.audit.neighbors import choose_search, have_faiss, knn
from pipeline.audit.outliers import outlier_fence, outlier_scores
from pipeline.errors import FitError

from conftest import V2_WEIGHTS, run_extract


def _unit(X):
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def _blobs(n_per=40, d=24, k=3, seed=0, spread=0.35):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 3
    X = np.concatenate([centres[c] + spread * rng.standard_normal((n_per, d)) for c in range(k)])
    y = np.repeat(np.arange(k), n_per)
    return X.astype(np.float32), y


def _brute(Z, k):
    S = Z @ Z.T
    np.fill_diagonal(S, -np.inf)
    idx = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return idx, 1 - np.take_along_axis(S, idx, axis=1)


# ---- neighbours ------------------------------------------------------------------------------------------------

def test_exact_blocked_search_equals_brute_force_in_small_blocks():
    Z = _unit(np.random.default_rng(1).standard_normal((301, 17)))
    nn = knn(Z, 5, method="exact", block_bytes=1)  # the smallest block: 16 rows at a time
    idx, dist = _brute(Z, 5)
    assert nn.method == "exact" and (nn.index == idx).all()
    np.testing.assert_allclose(nn.distance, dist, atol=1e-5)
    # query rows against other reference rows; fewer rows than k pads with -1 / inf
    few = knn(Z[:3], 5, Z[3:10], method="exact")
    assert (few.index[:, 3:] == -1).all() and np.isinf(few.distance[:, 3:]).all()
    assert (few.index[:, :3] >= 0).all()


def test_faiss_indexes_agree_with_the_exact_search():
    if not have_faiss():
        pytest.skip("faiss-cpu is not installed (pip install 'headbench[audit]'); the test extra installs it")
    Z = _unit(np.random.default_rng(2).standard_normal((500, 32)))
    exact = knn(Z, 4, method="exact")
    flat = knn(Z, 4, method="faiss-flat")
    assert (flat.index[:, 0] == exact.index[:, 0]).mean() > 0.99
    np.testing.assert_allclose(flat.distance, exact.distance, atol=1e-4)
    hnsw = knn(Z, 4, method="faiss-hnsw")
    assert (hnsw.index[:, 0] == exact.index[:, 0]).mean() > 0.9  # approximate, never a wrong distance:
    real = 1 - np.einsum("ij,ij->i", Z, Z[hnsw.index[:, 0]])
    np.testing.assert_allclose(hnsw.distance[:, 0], real, atol=1e-4)
    assert (hnsw.index != np.arange(500)[:, None]).all()  # a row is never its own neighbour


def test_the_search_is_chosen_by_size_and_said_when_skipped():
    assert choose_search(1000, faiss_ok=False) == "exact" and choose_search(1000, faiss_ok=True) == "faiss-flat"
    assert choose_search(10**6, faiss_ok=True) == "faiss-hnsw" and choose_search(10**6, faiss_ok=False) == "skipped"
    X, y = _blobs()
    images = AuditImages([f"{i}.jpg" for i in range(len(y))], y, np.array(["train"] * len(y)), ["a", "b", "c"],
                         [""] * len(y), ["test"])
    a = run_audit(images, [AuditSource("toy", "toy.h5", lambda i: X[i])], AuditConfig(search="skipped"))
    assert a.duplicates.pairs == 0 and a.n_outliers == 0
    assert any("skipped" in ln and "headbench[audit]" in ln for ln in a.lines())
    assert a.to_json({})["skipped"]


# ---- duplicates, leaks ---------------------------------------------------------------------------------------------

def test_duplicate_clusters_are_told_apart_within_across_splits_and_across_classes():
    X, y = _blobs(n_per=30)
    rng = np.random.default_rng(5)
    splits = np.array(["train"] * 20 + ["test"] * 10 + ["train"] * 20 + ["test"] * 10 + ["train"] * 20 + ["test"] * 10)
    digests = [f"d{i}" for i in range(len(y))]
    # planted pairs: a near copy within train; a near copy of a train image in test; an exact copy in another class
    X[1] = X[0] + 0.01 * rng.standard_normal(X.shape[1])            # 0, 1: class 0, train, train
    X[25] = X[2] + 0.01 * rng.standard_normal(X.shape[1])           # 2 train, 25 test, class 0: a leak
    X[35] = X[3]
    digests[35] = digests[3]                                          # 3 (class 0) and 35 (class 1): same file
    Z = _unit(X - X.mean(0))
    nn = knn(Z, 5, method="exact")
    t, median = near_threshold(nn.distance[:, 0])
    assert 0 < t < median
    d = find_duplicates(Z, nn, digests, y, splits, t)
    kinds = {}
    for r in d.rows:
        kinds.setdefault(r["cluster"], set()).add((r["row"], r["kind"]))
    clusters = sorted(sorted(v) for v in kinds.values())
    assert clusters == [[(0, "within_split"), (1, "within_split")], [(2, "across_splits"), (25, "across_splits")],
                        [(3, "across_classes"), (35, "across_classes")]]
    assert d.rows[0]["kind"] == "across_classes" and d.rows[0]["distance"] == 0.0  # most suspicious first
    assert d.exact_pairs == 1 and d.pairs == 3 and d.counts == {"across_classes": 1, "across_splits": 1,
                                                                "within_split": 1}
    images = AuditImages([f"{i}.jpg" for i in range(len(y))], y, splits, ["a", "b", "c"], digests, ["test"])
    a = run_audit(images, [AuditSource("toy", "toy.h5", lambda i: X[i])])
    assert np.flatnonzero(a.leaked).tolist() == [25] and a.leak_counts() == {"test": 1}


# ---- suspect labels ------------------------------------------------------------------------------------------------

def test_a_flipped_label_is_ranked_first_among_label_issues():
    X, y = _blobs(seed=3)
    y = y.copy()
    y[7] = 2  # a class-0 image labelled 2
    oof = out_of_fold_proba(_unit(X), y, 3, seed=0)
    rows, suggested, score, _ = label_issues(oof, y)
    assert rows[0] == 7 and suggested[0] == 0 and score[0] > 0.5
    assert oof.folds == 5 and oof.scored.all()


class _Recorder:
    """A memorising classifier (1-NN) that records which rows it was fitted on and asked about."""

    log: list = []

    def __init__(self):
        self.model = KNeighborsClassifier(1)

    def fit(self, X, y):
        self.fitted = {tuple(np.round(r, 6)) for r in X}
        self.model.fit(X, y)
        self.classes_ = self.model.classes_
        return self

    def predict_proba(self, X):
        _Recorder.log.append(any(tuple(np.round(r, 6)) in self.fitted for r in X))
        return self.model.predict_proba(X)


def test_label_scores_come_only_from_models_that_never_saw_the_image():
    X, y = _blobs(seed=4)
    y = y.copy()
    y[50] = 0  # a class-1 image labelled 0
    _Recorder.log = []
    oof = out_of_fold_proba(_unit(X), y, 3, seed=0, make_model=_Recorder)
    assert _Recorder.log and not any(_Recorder.log)  # no predicted row was among the rows its model fitted
    rows, suggested, _, _ = label_issues(oof, y)
    # a memorising model would call every label right on its own rows; held out, it finds the flipped one
    assert 50 in rows.tolist() and suggested[rows.tolist().index(50)] == 1


def test_a_class_of_one_image_is_left_unscored_not_an_error():
    X, y = _blobs(n_per=10)
    y = y.copy()
    y[0] = 3  # a fourth class with a single image
    oof = out_of_fold_proba(_unit(X), y, 4)
    assert not oof.scored[0] and oof.scored[1:].all()
    rows, *_ = label_issues(oof, y)
    assert 0 not in rows.tolist()


# ---- outliers ------------------------------------------------------------------------------------------------------

def test_an_unrelated_image_is_ranked_first_among_outliers():
    X, y = _blobs(seed=6)
    X[17] = 40 * np.random.default_rng(9).standard_normal(X.shape[1])  # nothing like any class
    Z = _unit(X - X.mean(0))
    nn = knn(Z, 10, method="exact")
    s = outlier_scores(nn)
    assert int(np.argmax(s)) == 17 and s[17] > outlier_fence(s)
    images = AuditImages([f"{i}.jpg" for i in range(len(y))], y, np.array(["train"] * len(y)), ["a", "b", "c"],
                         [""] * len(y), ["test"])
    a = run_audit(images, [AuditSource("toy", "toy.h5", lambda i: X[i])])
    assert a.outlier_rows[0] == 17 and a.n_outliers >= 1


def test_several_sources_audit_the_one_with_the_best_out_of_fold_accuracy():
    X, y = _blobs(seed=7)
    noise = np.random.default_rng(0).standard_normal(X.shape).astype(np.float32)
    images = AuditImages([f"{i}.jpg" for i in range(len(y))], y, np.array(["train"] * len(y)), ["a", "b", "c"],
                         [""] * len(y), ["test"])
    a = run_audit(images, [AuditSource("noise", "n.h5", lambda i: noise[i]),
                           AuditSource("good", "g.h5", lambda i: X[i])])
    assert a.source.label == "good" and "noise" in a.chosen_by and a.oof.accuracy > 0.9


def test_large_inputs_are_reduced_before_the_search():
    X, y = _blobs(n_per=100, d=300)
    images = AuditImages([f"{i}.jpg" for i in range(len(y))], y, np.array(["train"] * len(y)), ["a", "b", "c"],
                         [""] * len(y), ["test"])
    a = run_audit(images, [AuditSource("toy", "t.h5", lambda i: X[i])], AuditConfig(full_dim_rows=100))
    assert a.embedding.reduced and a.embedding.Z.shape == (300, 128)
    np.testing.assert_allclose(np.linalg.norm(a.embedding.Z, axis=1), 1, atol=1e-5)
    assert a.to_json({})["embedding"]["source_dim"] == 300


# ---- in fit, on real photos ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted(shared_dir, tmp_path_factory):
    """A small train/val folder of real hymenoptera photos with planted copies, extracted with real weights."""
    src = shared_dir / "data/hymenoptera"
    root = tmp_path_factory.mktemp("planted") / "planted"
    take = {("train", "ants"): 14, ("train", "bees"): 14, ("val", "ants"): 7, ("val", "bees"): 7}
    files = {}
    for (split, cls), n in take.items():
        (root / split / cls).mkdir(parents=True)
        names = sorted(p for p in (src / split / cls).glob("*.jpg"))[:n]
        files[split, cls] = names
        for p in names:
            shutil.copy2(p, root / split / cls / p.name)
    ant, bee, val_bee = files["train", "ants"][0], files["train", "bees"][0], files["val", "bees"][0]
    shutil.copy2(ant, root / "val/ants/copy_of_train_ant.jpg")                # exact, across splits: a leak
    shutil.copy2(bee, root / "train/ants/bee_filed_as_ant.jpg")               # exact, across classes
    im = Image.open(val_bee).convert("RGB")
    im.resize((int(im.width * 0.9), int(im.height * 0.9))).save(root / "train/bees/reencoded_val_bee.jpg",
                                                                 quality=60)  # near, across splits: a leak
    a2 = Image.open(files["train", "ants"][1]).convert("RGB")
    ImageOps.mirror(a2).save(root / "train/ants/mirrored_ant.jpg", quality=90)  # near, within train
    cache = run_extract(root, tmp_path_factory.mktemp("planted_cache"), backbone="mobilenet_v2",
                        weights=str(shared_dir / V2_WEIGHTS)).path
    names = {"ant": f"train/ants/{ant.name}", "bee": f"train/bees/{bee.name}", "val_bee": f"val/bees/{val_bee.name}",
             "ant2": f"train/ants/{files['train', 'ants'][1].name}"}
    return cache, names


def _fit(cache, out, **kw):
    from pipeline.fit import FitConfig, run_fit

    return run_fit(FitConfig(caches=[cache], heads=["centroid", "logreg"], out=out, **kw), log=lambda m: None)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_fit_finds_planted_copies_and_leaks_in_real_photos(planted, tmp_path):
    cache, names = planted
    run = _fit(cache, tmp_path / "run")
    au = run.results["audit"]
    dups = _csv(tmp_path / "run/audit/duplicates.csv")
    assert set(dups[0]) == {"cluster", "path", "split", "class", "nearest", "distance", "kind"}
    by_path = {r["path"]: r for r in dups}
    assert by_path["val/ants/copy_of_train_ant.jpg"]["kind"] == "across_splits"
    assert by_path["val/ants/copy_of_train_ant.jpg"]["nearest"] == names["ant"]
    assert float(by_path["val/ants/copy_of_train_ant.jpg"]["distance"]) == 0.0
    assert by_path["train/ants/bee_filed_as_ant.jpg"]["kind"] == "across_classes"
    assert by_path["train/ants/bee_filed_as_ant.jpg"]["nearest"] == names["bee"]
    assert by_path["train/bees/reencoded_val_bee.jpg"]["nearest"] == names["val_bee"]  # re-encoded and resized
    assert by_path["train/bees/reencoded_val_bee.jpg"]["kind"] == "across_splits"
    assert by_path["train/ants/mirrored_ant.jpg"]["nearest"] == names["ant2"]  # mirrored
    assert by_path["train/ants/mirrored_ant.jpg"]["kind"] == "within_split"
    assert dups[0]["kind"] == "across_classes"  # ranked most suspicious first
    assert au["duplicates"]["exact_pairs"] == 2 and au["duplicates"]["clusters"] == {
        "across_classes": 1, "across_splits": 2, "within_split": 1}
    assert au["leaks"]["counts"] == {"val": 2} and not au["leaks"]["excluded"]
    # the final numbers are also given on the leak-free part of val
    b = run.results["best"]
    assert b["leak_free"]["n"] == b["n"] - 2 and b["leak_free"]["leaked"] == 2
    lo, hi = b["leak_free"]["interval"]
    assert lo <= b["leak_free"]["accuracy"] <= hi
    labels = _csv(tmp_path / "run/audit/label_issues.csv")
    assert set(labels[0] if labels else {"path", "split", "class", "suggested", "score"}) == {
        "path", "split", "class", "suggested", "score"}
    assert "train/ants/bee_filed_as_ant.jpg" in [r["path"] for r in labels]  # a bee filed as an ant
    assert all(r["class"] != r["suggested"] for r in labels)
    assert au["cache"]["file"] == Path(cache).name and au["cache"]["chosen_by"] == "the run's only cache"
    # the report's "Data audit" section: counts, the pairs side by side with thumbnails, the leak-free number
    from pipeline.report import write_report

    html = write_report([tmp_path / "run"], tmp_path / "report.html").read_text()
    section = html[html.index('<section id="audit">'):]
    section = section[:section.index("</section>")]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", section))
    assert "2 exact and 2 near pairs" in text and "1 across classes, 2 across splits, 1 within split" in text
    first_pair = section[section.index('class="pair"'):]
    first_pair = first_pair[:first_pair.index('class="pair-note"')]
    assert "bee_filed_as_ant.jpg" in first_pair and names["bee"] in first_pair
    assert first_pair.count("data:image/jpeg;base64,") == 2
    page = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))
    assert f"on the {b['leak_free']['n']} val images without a duplicate in train" in page


@pytest.mark.slow
def test_exclude_leaks_changes_only_the_final_split_and_no_audit_writes_none(planted, tmp_path):
    cache, _ = planted
    base = _fit(cache, tmp_path / "base")
    ex = _fit(cache, tmp_path / "ex", exclude_leaks=True)
    a, b = _csv(tmp_path / "base/splits.csv"), _csv(tmp_path / "ex/splits.csv")
    assert [r["path"] for r in a] == [r["path"] for r in b]
    changed = [(x["path"], x["split"], y["split"]) for x, y in zip(a, b) if x["split"] != y["split"]]
    assert sorted(changed) == [("val/ants/copy_of_train_ant.jpg", "val", "excluded"),
                               (f"val/bees/{Path(planted[1]['val_bee']).name}", "val", "excluded")]
    assert ex.results["audit"]["leaks"]["excluded"] is True
    assert ex.results["dataset"]["counts"]["train"] == base.results["dataset"]["counts"]["train"]
    assert ex.results["best"]["n"] == base.results["best"]["n"] - 2 and "leak_free" not in ex.results["best"]
    for r in ex.results["results"]:
        assert r["metrics"]["val"]["n"] == base.results["best"]["n"] - 2
        assert {p["path"] for p in _csv(tmp_path / "ex" / r["predictions_file"])}.isdisjoint(
            {c[0] for c in changed})
    none = _fit(cache, tmp_path / "none", audit=False)
    assert "audit" not in none.results and not (tmp_path / "none/audit").exists()
    assert json.loads((tmp_path / "none/results.json").read_text()).keys() == none.results.keys()
    with pytest.raises(FitError, match="needs the audit"):
        _fit(cache, tmp_path / "bad", audit=False, exclude_leaks=True)


def test_cli_refuses_exclude_leaks_without_the_audit_before_any_work(tmp_path):
    from typer.testing import CliRunner

    import cli

    res = CliRunner().invoke(cli.app, ["fit", "--cache-dir", str(tmp_path), "--no-audit", "--exclude-leaks"])
    assert res.exit_code == 2 and "--exclude-leaks needs the audit" in res.output
    assert "no complete feature caches" not in res.output  # refused before the caches are looked for


def test_a_search_over_the_memory_budget_is_skipped_with_one_line():
    X, y = _blobs()
    images = AuditImages([f"{i}.jpg" for i in range(len(y))], y, np.array(["train"] * len(y)), ["a", "b", "c"],
                         [""] * len(y), ["test"])
    a = run_audit(images, [AuditSource("toy", "toy.h5", lambda i: X[i])],
                  AuditConfig(search="exact", memory_bytes=1000, block_bytes=1 << 20))
    assert a.search == "skipped" and a.duplicates.pairs == 0
    assert [ln for ln in a.lines() if "over the memory budget" in ln and "--memory-budget" in ln]
    assert a.oof.scored.all() and a.oof.accuracy > 0.9  # suspect labels still ran
