"""Fit at scale on small data: the cost plan's switch-over rules, the recorded search subsample, streaming from a
real cache file equal (or within a stated tolerance) to fitting in memory, heads skipped with the reason, one open
per cache, and the batch forms against the exact estimators they stand for.

Every cache here is tiny and written with the project's own writer (the benchmark's ``write_cache``); the memory
budget is made tiny to force streaming. Real-data accuracy at scale is in bench/fit_scale.py.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import pipeline.cache as cache_mod
from pipeline.errors import FitError
from pipeline.fit import CacheSource, FitConfig, run_fit
from pipeline.fit import forms
from pipeline.fit.heads import (HEADS, KNN_EXACT_MAX_ROWS, LINEAR_SVM_EXACT_MAX_ROWS, LOGREG_EXACT_MAX_ROWS,
                                SVM_EXACT_MAX_ROWS, DenseHead, HeadContext)
from pipeline.fit.linear import minibatch_linear
from pipeline.fit.plan import SEARCH_MAX_ROWS, CostPolicy, MemoryBudget, parse_memory, plan_cache, plan_head
from pipeline.fit.stream import ArraySource, ReaderSource, class_moments, stratified_subsample

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["ant", "bee", "wasp"]


def _bench():
    if str(REPO / "bench") not in sys.path:  # the script imports bench/_start.py by name, as `python bench/...` can
        sys.path.append(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("fit_scale_bench", REPO / "bench" / "fit_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _meta(name: str = "toy") -> dict:
    from pipeline.backbones import get_spec

    spec = get_spec("mobilenet_v2")
    return {"format": cache_mod.FORMAT_NAME, "schema_version": cache_mod.SCHEMA_VERSION, "dataset_name": name,
            "dataset_root": f"/data/{name}", "dataset_id": cache_mod.dataset_id(f"/data/{name}"), "has_splits": False,
            "backbone": "mobilenet_v2", "backbone_label": "mobilenet_v2-a0.35-32", "alpha": 0.35, "input_size": 32,
            "resize": "crop", "preprocess": spec.preprocess, "preprocess_mode": spec.preprocess_mode,
            "weights_source": "none", "weights_sha256": "", "weights_path": "", "pixel_rule": "test",
            "feature_kinds": ["avg"], "maps_dtype": "", "views": {"n": 0}, "versions": {}, "command": "test",
            "created": "2026-01-01T00:00:00", "extract_seconds": 1.0}


def _cache(tmp_path: Path, n: int = 300, d: int = 16, name: str = "toy", shape: tuple | None = None,
           kind: str = "avg", seed: int = 0) -> Path:
    X, y = make_classification(n, d, n_informative=min(8, d), n_redundant=0, n_classes=3, class_sep=1.2,
                               random_state=seed)
    X = X.astype(np.float32)
    if shape is not None:
        X = X.reshape(n, *shape)
    meta = _meta(name)
    if kind == "maps":
        meta.update(feature_kinds=["avg", "maps"], maps_dtype="float32")
    folder = tmp_path / "cache"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.h5"
    write = _bench().write_cache
    if kind == "maps":  # a maps cache also holds the pooled vectors, as extract writes it
        X_avg = X.reshape(n, -1, X.shape[-1]).mean(axis=1)
        from pipeline import cache

        m = dict(meta, class_names=CLASSES)
        writer = cache.PartWriter(path, m, {"avg": X_avg.shape[1:], "maps": X.shape[1:]}, flush_rows=64)
        order = []
        for i in range(n):
            rel = f"{CLASSES[y[i]]}/{i:05d}.jpg"
            writer.add({"path": rel, "label": int(y[i]), "split": "", "size": 1, "mtime_ns": 0,
                        "sha256": f"{i:064x}", "ok": True, "error": ""}, {"avg": X_avg[i], "maps": X[i]})
            order.append((rel, int(y[i]), ""))
            writer.maybe_flush()
        writer.flush()
        cache.assemble(path, m, order, cache.scan_existing(path, m), {"avg": X_avg.shape[1:], "maps": X.shape[1:]})
        return path
    splits = np.array([""] * n)
    return write(path, X, y, splits, CLASSES, meta, flush_rows=64)


def _quiet(_m: str) -> None:
    pass


# ---- the switch-over rules -----------------------------------------------------------------------------------------


def _ctx(n: int, d: int = 1280, k: int = 10) -> HeadContext:
    return HeadContext(n_features=d, n_classes=k, n_rows=n, min_class_rows=n // k, input_shape=(d,))


def _form(head: str, n: int, budget: float = 1e12, d: int = 1280, policy: CostPolicy | None = None) -> str:
    cplan = plan_cache(int(n / 0.7), (d,), MemoryBudget(int(budget), "test"), policy)
    hp = plan_head(HEADS[head], _ctx(n, d), cplan, min(n, SEARCH_MAX_ROWS), policy)
    return "skipped" if hp.skipped else f"{hp.form.name}/{hp.data}"


def test_switch_over_rules_at_the_stated_sizes():
    assert (LOGREG_EXACT_MAX_ROWS, LINEAR_SVM_EXACT_MAX_ROWS, SVM_EXACT_MAX_ROWS, KNN_EXACT_MAX_ROWS) == \
        (100_000, 5_000, 5_000, 20_000)
    for head, limit, batch in (("logreg", 100_000, "minibatch"), ("linear_svm", 5_000, "minibatch"),
                               ("svm", 5_000, "nystroem"), ("knn", 20_000, "bounded_index")):
        assert _form(head, limit) == "exact/memory", head
        assert _form(head, limit + 1) == f"{batch}/memory", head
    for n in (100, 50_000, 700_000):
        assert _form("dense", n) == "exact/memory" and _form("centroid", n) == "exact/memory"
    # features that do not fit the budget: every head learns in batches from the cache
    streamed = {h: _form(h, 700_000, budget=2e9) for h in HEADS}
    assert streamed == {"dense": "streamed/streamed", "logreg": "minibatch/streamed",
                        "linear_svm": "minibatch/streamed", "svm": "nystroem/streamed",
                        "knn": "bounded_index/streamed", "centroid": "exact/streamed"}
    # a policy can force the batch form (the benchmark measures each approximation that way)
    assert _form("logreg", 1_000, policy=CostPolicy(exact_max_rows={"logreg": 0})) == "minibatch/memory"


def test_bounded_structures_follow_the_budget():
    cplan = plan_cache(1_000_000, (1280,), MemoryBudget(2_000_000_000, "test"))
    assert not cplan.in_memory and cplan.search_max_rows == SEARCH_MAX_ROWS
    knn = plan_head(HEADS["knn"], _ctx(700_000), cplan, SEARCH_MAX_ROWS)
    assert knn.ctx.knn_index_rows == KNN_EXACT_MAX_ROWS and knn.details["index_rows"] == KNN_EXACT_MAX_ROWS
    small = plan_cache(1_000_000, (1280,), MemoryBudget(100_000_000, "test"))
    knn = plan_head(HEADS["knn"], _ctx(700_000), small, small.search_max_rows)
    assert 100 <= knn.ctx.knn_index_rows < KNN_EXACT_MAX_ROWS and "cut" in knn.reason
    assert small.search_max_rows == 100_000_000 // 2 // (3 * 1280 * 4)
    assert 16 <= small.buffer_rows * 1280 * 4 <= 100_000_000 // 8



def test_each_head_carries_its_memory_rule_and_the_plan_knows_no_head_by_name():
    """plan_head reads a head's rule from its registry entry: the same entry under another name plans the same, and
    a head with a rule of its own is sized or skipped by that rule alone."""
    import dataclasses

    from pipeline.fit.heads import MemoryFit

    small = plan_cache(1_000_000, (1280,), MemoryBudget(100_000_000, "test"))
    for name in ("knn", "svm", "linear_svm", "dense"):
        renamed = dataclasses.replace(HEADS[name], name=f"my_{name}")
        a = plan_head(HEADS[name], _ctx(700_000), small, small.search_max_rows)
        b = plan_head(renamed, _ctx(700_000), small, small.search_max_rows)
        assert (a.form, a.ctx, a.details, a.reason, a.skipped) == (b.form, b.ctx, b.details, b.reason, b.skipped), name
    roomy = plan_cache(1_000_000, (1280,), MemoryBudget(10 ** 12, "test"))
    svm = plan_head(HEADS["svm"], _ctx(700_000), roomy, SEARCH_MAX_ROWS)
    assert svm.form.name == "nystroem" and svm.details == {"nystroem_components": 1_000, "calibration_rows": 10_000}
    assert plan_head(HEADS["svm"], _ctx(700_000), small, small.search_max_rows).skipped.startswith(
        "the Nystroem map's 1,000 landmark rows")
    seen = []

    def greedy(spec, room):
        seen.append((room.work_bytes, room.row_bytes, room.form.name))
        return MemoryFit(room.ctx, room.form, too_big="my 10 GB table does not fit")

    own = dataclasses.replace(HEADS["centroid"], name="mine", memory=greedy)
    hp = plan_head(own, _ctx(1_000), small, 1_000)
    assert seen == [(small.budget.work_bytes, 1280 * 4, "exact")] and small.budget.work_bytes == 25_000_000
    assert hp.skipped == "my 10 GB table does not fit a quarter of the memory budget (100.0 MB)"
    assert not plan_head(HEADS["centroid"], _ctx(1_000), small, 1_000).skipped  # no rule: nothing kept beyond rows

def test_memory_sizes_parse_and_bad_ones_are_one_line():
    assert parse_memory("2GB") == 2_000_000_000 and parse_memory("1.5GiB") == int(1.5 * 2 ** 30)
    assert parse_memory("500MB") == 500_000_000 and parse_memory("123") == 123
    for bad in ("lots", "2 parsecs", "-1GB", "0"):
        with pytest.raises(FitError) as e:
            parse_memory(bad)
        assert "--memory-budget" in str(e.value) and "\n" not in str(e.value)
    from typer.testing import CliRunner

    import cli

    res = CliRunner().invoke(cli.app, ["fit", "--memory-budget", "lots"])
    assert res.exit_code == 2 and "2GB" in res.output  # a usage error, before anything runs


# ---- the batch forms against their exact estimators ----------------------------------------------------------------


def _data(n=400, d=12, k=3, seed=0):
    X, y = make_classification(n, d, n_informative=6, n_redundant=0, n_classes=k, random_state=seed)
    return X.astype(np.float32), y


def test_centroid_from_streamed_moments_is_nearest_centroid():
    X, y = _data()
    names = np.array(CLASSES)[y]
    exact = Pipeline([("scale", StandardScaler()), ("clf", NearestCentroid(priors="empirical"))]).fit(X, names)
    ctx = _ctx(len(y), X.shape[1], 3)
    streamed = forms.fit_centroid(ctx, {}, ArraySource(X, y, CLASSES), False, HEADS["centroid"])
    assert np.allclose(streamed.predict_proba(X), exact.predict_proba(X), atol=1e-9)
    assert np.allclose(streamed[-1].centroids_, exact[-1].centroids_, atol=1e-9)
    assert np.allclose(streamed[-1].within_class_std_dev_, exact[-1].within_class_std_dev_, atol=1e-9)


@pytest.mark.parametrize("k", [2, 3])
def test_minibatch_logistic_regression_solves_lbfgs_objective(k):
    X, y = _data(600, 10, k)
    Z = StandardScaler().fit_transform(X).astype(np.float32)
    C = 0.05
    exact = LogisticRegression(C=C, max_iter=1000, tol=1e-8).fit(Z, y)
    W, b = minibatch_linear(ArraySource(Z, y, [str(c) for c in range(k)]), "log", C)
    est = forms.logistic_regression(W, b, np.arange(k), C)

    def objective(coef, intercept):
        z = Z @ coef.T + intercept
        if k == 2:
            z = np.c_[np.zeros(len(z)), z]
        z = z - z.max(axis=1, keepdims=True)
        nll = -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).sum()
        return C * nll + 0.5 * (coef ** 2).sum()

    assert objective(est.coef_, est.intercept_) <= 1.01 * objective(exact.coef_, exact.intercept_)
    assert np.mean(est.predict(Z) == exact.predict(Z)) >= 0.97
    assert np.allclose(est.predict_proba(Z), exact.predict_proba(Z), atol=0.05)


# ---- whole fits on real cache files --------------------------------------------------------------------------------


def test_search_runs_on_a_recorded_subsample_and_refits_on_every_row(tmp_path):
    import joblib

    path = _cache(tmp_path, n=400)
    run = run_fit(FitConfig(caches=[path], heads=["logreg", "knn"], out=tmp_path / "run",
                            policy=CostPolicy(search_max_rows=90)), log=_quiet)
    doc = run.results
    train = sum(doc["dataset"]["counts"]["train"].values())
    assert doc["protocol"]["search"] == {"train_rows": train, "search_rows": 90, "subsample": True,
                                         "refit_rows": train}
    for r in doc["results"]:
        assert r["cost"]["subsample"] and r["cost"]["search_rows"] == 90 and r["cost"]["refit_rows"] == train
        assert all(len(c["scores"]) == 5 for c in r["search"])  # 90 rows: 5 folds (under 2,000)
    pipe = joblib.load(tmp_path / "run" / doc["results"][0]["model_file"])
    assert pipe.named_steps["scale"].n_samples_seen_ == train  # the refit saw every training row
    assert pipe[-1].n_features_in_ == 16
    # the leaderboard and the report say so
    from rich.console import Console

    console = Console(width=250, record=True)
    console.print(run.leaderboard())
    assert f"search 90/{train}" in console.export_text()
    from pipeline.report import render_report
    from pipeline.results import load_run

    assert f"subsample of 90 of the {train} training rows" in render_report([load_run(tmp_path / "run")])


def test_streamed_fit_equals_the_in_memory_fit(tmp_path):
    """The same batch forms with features in memory and streamed from the cache (a 64 kB budget)."""
    path = _cache(tmp_path, n=360)
    heads = ["logreg", "knn", "centroid"]  # the linear SVM's batch form is the same solver as logreg's
    forced = CostPolicy(exact_max_rows={"logreg": 0, "knn": 100})
    mem = run_fit(FitConfig(caches=[path], heads=heads, out=tmp_path / "mem", policy=forced), log=_quiet).results
    lines: list[str] = []
    streamed = run_fit(FitConfig(caches=[path], heads=heads, out=tmp_path / "str", memory_budget="64kB",
                                 policy=forced), log=lines.append).results
    assert mem["caches"][0]["data"] == "memory" and streamed["caches"][0]["data"] == "streamed"
    assert any("streamed from the cache" in ln for ln in lines)
    assert streamed["memory_budget"] == {"bytes": 64_000, "source": "--memory-budget 64kB"}
    for a, b in zip(mem["results"], streamed["results"]):
        assert a["head"] == b["head"] and b["cost"]["data"] == "streamed" and a["cost"]["form"] == b["cost"]["form"]
        pa = [r.split(",")[3] for r in (tmp_path / "mem" / a["predictions_file"]).read_text().splitlines()[1:]]
        pb = [r.split(",")[3] for r in (tmp_path / "str" / b["predictions_file"]).read_text().splitlines()[1:]]
        agree = np.mean(np.array(pa) == np.array(pb))
        if a["head"] in ("knn", "centroid"):  # one pass of sufficient statistics / the same index rows: identical
            strip = lambda m: {s: {k: v for k, v in x.items() if k != "intervals"} for s, x in m.items()}  # noqa: E731
            assert agree == 1.0 and strip(a["metrics"]) == strip(b["metrics"]), a["head"]
            for s in a["metrics"]:  # intervals of the same predictions: equal up to float noise in probabilities
                for k, iv in a["metrics"][s]["intervals"].items():
                    assert iv == pytest.approx(b["metrics"][s]["intervals"][k], abs=0.02), (a["head"], k)
        else:  # mini-batch solvers see the rows in another shuffled order: the same model within a tolerance
            assert agree >= 0.95, (a["head"], agree)
            assert abs(a["metrics"]["test"]["accuracy"] - b["metrics"]["test"]["accuracy"]) <= 0.03
    assert [r["cost"]["index_rows"] for r in streamed["results"] if r["head"] == "knn"] == [100]


def _rounded(doc):
    """``doc`` with every float rounded to 12 significant digits."""
    import json

    return json.loads(json.dumps(doc), parse_float=lambda t: float(f"{float(t):.12g}"))


def test_dense_head_streamed_from_maps_within_tolerance(tmp_path):
    """The dense head on 2x2x4 maps: in memory, then read in blocks from the cache under a 300 kB budget (which holds
    its weights and optimizer state, 262 kB, but not three copies of the 128 kB of maps)."""
    path = _cache(tmp_path, n=2000, d=16, shape=(2, 2, 4), kind="maps")
    small_search = CostPolicy(search_max_rows=300)  # what is compared here is the refit on all 1,400 rows
    mem = run_fit(FitConfig(caches=[path], heads=["dense", "centroid"], features="maps", out=tmp_path / "mem",
                            policy=small_search), log=_quiet).results
    streamed = run_fit(FitConfig(caches=[path], heads=["dense", "centroid"], features="maps", out=tmp_path / "str",
                                 memory_budget="300kB", policy=small_search), log=_quiet).results
    by = {r["head"]: r for r in streamed["results"]}
    assert by["dense"]["cost"]["form"] == "streamed" and by["dense"]["cost"]["data"] == "streamed"
    assert by["centroid"]["cost"]["form"] == "exact" and by["centroid"]["cost"]["data"] == "streamed"
    mem_by = {r["head"]: r for r in mem["results"]}
    # the same numbers to 12 digits (streamed class moments sum in another order: the last bit of a bootstrap
    # bound may differ)
    assert _rounded(mem_by["centroid"]["metrics"]) == _rounded(by["centroid"]["metrics"])
    assert abs(mem_by["dense"]["metrics"]["test"]["accuracy"] - by["dense"]["metrics"]["test"]["accuracy"]) <= 0.08
    import keras

    model = keras.models.load_model(tmp_path / "str" / by["dense"]["model_file"])
    assert tuple(model.input_shape[1:]) == (2, 2, 4)


def test_heads_that_cannot_fit_the_budget_are_skipped_with_the_reason(tmp_path):
    # 800 kB holds the search's 33 rows of 1,000 features (x3 copies in half the budget) but not a k-NN index of 30
    # rows (x2 in a quarter), nor 210 Nystroem landmarks
    path = _cache(tmp_path, n=300, d=1000)
    run = run_fit(FitConfig(caches=[path], heads=["knn", "svm", "centroid"], out=tmp_path / "run",
                            memory_budget="800kB", policy=CostPolicy(exact_max_rows={"svm": 0})), log=_quiet)
    doc = run.results
    assert [r["head"] for r in doc["results"]] == ["centroid"]
    skipped = {s["head"]: s["reason"] for s in doc["skipped"]}
    assert set(skipped) == {"knn", "svm"}
    assert "k-NN index" in skipped["knn"] and "memory budget (800.0 kB)" in skipped["knn"]
    assert "Nystroem" in skipped["svm"] and "\n" not in skipped["svm"]
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(run.leaderboard())
    text = console.export_text()
    assert "skipped" in text and "k-NN index" in text
    from pipeline.report import write_report

    html = write_report([run.run_dir], tmp_path / "run.html").read_text(encoding="utf-8")
    assert "2 heads skipped" in html and "Nystroem" in html
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["skipped"] == doc["skipped"]
    with pytest.raises(FitError, match="every head was skipped.*--memory-budget"):
        run_fit(FitConfig(caches=[path], heads=["knn"], out=tmp_path / "run2", memory_budget="800kB"))


def test_each_cache_is_opened_once_and_never_hashed(tmp_path):
    """A fit opens each cache once, through its source, and never reads the file by its path again (no second
    open, no hash of it): once open, the file is moved away, so any such read would fail the fit."""
    a = _cache(tmp_path, n=200, name="toy")
    content_sha256 = cache_mod.read_meta(a)["content_sha256"]
    away = tmp_path / "moved_away.h5"

    class CountingSource(CacheSource):
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def scan(self, cache_dir):
            scan = super().scan(cache_dir)
            self.calls.append(("scan", [c.path.name for c in scan.caches]))
            return scan

        def open(self, path, kind):
            reader = super().open(path, kind)
            self.calls.append(("open", Path(path).name))
            Path(path).rename(away)  # the open reader reads on; a read of the file by its name now fails
            return reader

    source = CountingSource()
    doc = run_fit(FitConfig(caches=[a], heads=["logreg", "centroid", "knn"], out=tmp_path / "r1"), log=_quiet,
                  source=source).results
    assert source.calls == [("open", "toy.h5")]
    assert doc["caches"][0]["sha256"] == content_sha256 and doc["caches"][0]["path"] == str(a.resolve())
    away.rename(a)
    source.calls.clear()
    run_fit(FitConfig(tmp_path / "cache", heads=["centroid"], out=tmp_path / "r2"), log=_quiet, source=source)
    assert source.calls == [("scan", ["toy.h5"]), ("open", "toy.h5")]  # the folder scan reads its header, then
    # the fit opens it once


def test_dense_head_refit_reuses_its_network_and_matches_a_fresh_fit():
    X, y = _data(200, 10)
    head = DenseHead(hidden=16, epochs=6, random_state=3)
    head.fit(X[:150], y[:150])
    engine = head._engine
    head.fit(X[50:], y[50:])
    assert head._engine is engine  # built and compiled once
    fresh = DenseHead(hidden=16, epochs=6, random_state=3).fit(X[50:], y[50:])
    assert np.array_equal(head.predict_proba(X), fresh.predict_proba(X))
    assert head.history_ == fresh.history_


def test_reader_source_reads_what_the_array_holds(tmp_path):
    path = _cache(tmp_path, n=300)
    with cache_mod.open_features(path) as reader:
        X = reader.read()
        rows = np.sort(np.random.default_rng(0).choice(300, 200, replace=False))
        src = ReaderSource(reader, rows, reader.labels[rows], CLASSES, block_rows=16, buffer_blocks=2)
        assert np.array_equal(src.take(np.array([5, 0, 199])), X[rows[[5, 0, 199]]])
        seen = [(x, yb) for x, yb in src.chunks(seed=1)]
        got = np.concatenate([x for x, _ in seen])
        assert len(got) == 200 and max(len(x) for x, _ in seen) <= 32
        assert sorted(map(tuple, got.round(5))) == sorted(map(tuple, X[rows].round(5)))
        m_stream = class_moments(src.chunks(), 3)
        m_mem = class_moments(ArraySource(X[rows], reader.labels[rows], CLASSES).chunks(), 3)
        assert np.allclose(m_stream.mean, m_mem.mean) and np.allclose(m_stream.m2, m_mem.m2)
    sub = stratified_subsample(np.repeat([0, 1, 2], [50, 30, 20]), np.arange(100), 10, 0)
    assert len(sub) == 10 and np.bincount(np.repeat([0, 1, 2], [50, 30, 20])[sub]).tolist() == [5, 3, 2]
