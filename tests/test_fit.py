"""The fit stage end to end: caches in, run folder out.

Fast tests use synthetic feature sets in place of cache files (the fit is handed an in-memory CacheSource);
the real-data tests use the session caches of ../shared (hymenoptera and flowers5 with the shared MobileNet
weights) and fit each configuration once per module.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import make_classification

from pipeline.cache import CacheInfo, CacheScan, FeatureSet
from pipeline.errors import CacheError, FitError
from pipeline.fit import CacheSource, FitConfig, leaderboard_table, run_fit
from pipeline.fit.heads import HEADS

CLASSES = ["ant", "bee", "wasp"]
TOP_KEYS = {"schema_version", "created", "command", "seed", "versions", "memory_budget", "dataset", "protocol",
            "statistics", "caches", "results", "skipped", "best", "audit"}
RESULT_KEYS = {"key", "cache_index", "backbone_label", "head", "params", "selection_split", "selection", "search",
               "cost", "search_seconds", "fit_seconds", "predict_ms_per_1000", "metrics", "history", "mistakes",
               "model_file", "model_sha256", "predictions_file", "views"}
METRIC_KEYS = {"n", "accuracy", "balanced_accuracy", "macro_f1", "log_loss", "confusion_matrix", "per_class"}


def _quiet(_m: str) -> None:
    pass


# ---- synthetic caches -------------------------------------------------------------------------------------------


def _feature_set(path: Path, backbone: str, dataset: str = "toy", n: int = 210, shape: tuple = (16,),
                 seed: int = 0, splits: np.ndarray | None = None, classes: list[str] = CLASSES) -> FeatureSet:
    d = int(np.prod(shape))
    X, y = make_classification(n, d, n_informative=min(8, d), n_redundant=0, n_classes=len(classes),
                               class_sep=1.5, random_state=7, weights=[0.4, 0.35, 0.25][:len(classes)])
    X = X + np.random.default_rng(seed).normal(scale=0.5 + seed, size=X.shape)  # backbones differ in quality
    paths = [f"{classes[c]}/img_{i:04d}.jpg" for i, c in enumerate(y)]
    meta = {"backbone": backbone, "backbone_label": f"{backbone}-a1.0-224", "dataset_name": dataset,
            "dataset_root": f"/data/{dataset}", "input_size": 224, "preprocess": "scale_-1_1", "resize": "crop",
            "weights_source": "synthetic", "weights_sha256": "0" * 64, "n_rows": n + 1, "extract_seconds": 1.5,
            "versions": {"keras": "3"}, "command": "synthetic", "created": "2026-01-01T00:00:00"}
    return FeatureSet(path=str(path), features=X.reshape(n, *shape).astype(np.float32), labels=y.astype(np.int64),
                      class_names=list(classes), paths=paths,
                      splits=np.array([""] * n) if splits is None else splits,
                      failed=[("bee/broken.jpg", "cannot identify image file")], meta=meta,
                      file_sha256=f"{seed:064d}")


@pytest.fixture
def quick_dense(monkeypatch):
    """A 3-epoch, one-batch-per-epoch dense head: these tests are about the run folder, not about training."""
    import dataclasses

    from pipeline.fit.heads import DenseHead

    spec = dataclasses.replace(HEADS["dense"], build=lambda ctx, p, s: DenseHead(
        hidden=16, epochs=3, batch_size=256, class_weight=ctx.class_weight, random_state=ctx.seed, run_eagerly=True))
    monkeypatch.setitem(HEADS, "dense", spec)


class FakeReader:
    """A :class:`pipeline.cache.FeatureReader` over a synthetic FeatureSet (counts the rows it is asked to read)."""

    def __init__(self, fs: FeatureSet) -> None:
        self.fs, self.path, self.meta = fs, fs.path, fs.meta
        self.class_names, self.paths, self.labels = fs.class_names, fs.paths, fs.labels
        self.splits, self.failed = fs.splits, fs.failed
        self.shape = tuple(fs.features.shape[1:])
        self.n = len(fs.paths)
        self.rows_read = 0

    def read(self, idx=None):
        idx = np.arange(self.n) if idx is None else np.asarray(idx)
        self.rows_read += len(idx)
        return self.fs.features[idx]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class FakeSource(CacheSource):
    """A :class:`pipeline.fit.CacheSource` over synthetic FeatureSets registered by path: the folder scan finds
    those of the folder, with their attributes, and each opens as a :class:`FakeReader`."""

    def __init__(self) -> None:
        self.store: dict[str, FeatureSet] = {}

    def meta(self, path: Path) -> dict:
        """The registered attributes of ``path`` (change them to change what the scan and the reader see)."""
        return self.store[str(path)].meta

    def scan(self, cache_dir: Path) -> CacheScan:
        return CacheScan(caches=[CacheInfo(Path(p), fs.meta) for p, fs in sorted(self.store.items())
                                 if Path(p).parent == Path(cache_dir)])

    def open(self, path: Path, kind: str) -> FakeReader:
        return FakeReader(self.store[str(path)])


@pytest.fixture
def fake_caches(tmp_path):
    """Register synthetic FeatureSets as if they were cache files in tmp_path/cache; fits read them by being handed
    ``fake_caches.source``."""
    source = FakeSource()
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()

    def add(name: str, **kw) -> Path:
        path = cache_dir / f"{name}.h5"
        path.write_bytes(b"")
        source.store[str(path)] = _feature_set(path, **kw)
        return path

    add.dir, add.source = cache_dir, source
    return add


def test_run_folder_has_documented_results_and_standalone_heads(fake_caches, quick_dense, tmp_path):
    import joblib
    import keras

    fake_caches("toy_good", backbone="mobilenet", seed=0)
    fake_caches("toy_poor", backbone="mobilenet_v2", seed=2)
    out = tmp_path / "run"
    run = run_fit(FitConfig(fake_caches.dir, heads=["logreg", "knn", "dense"], out=out, command="test"), log=_quiet,
                  source=fake_caches.source)
    doc = json.loads((out / "results.json").read_text())
    assert doc == run.results and set(doc) == TOP_KEYS and doc["schema_version"] == 3
    ds = doc["dataset"]
    assert ds["split_source"] == "hash" and ds["class_names"] == CLASSES and set(ds["counts"]) == {"train", "test"}
    assert ds["failed"] == [{"path": "bee/broken.jpg", "reason": "cannot identify image file"}]
    assert ds["imbalance_ratio"] > 1
    assert doc["protocol"]["selection"] == "cv" and doc["protocol"]["final_splits"] == ["test"]
    assert [c["backbone"] for c in doc["caches"]] == ["mobilenet", "mobilenet_v2"]
    assert doc["caches"][0]["feature"] == "avg" and doc["caches"][0]["feature_shape"] == [16]
    assert len(doc["results"]) == 6
    for r in doc["results"]:
        assert set(r) - {"vs_pick"} == RESULT_KEYS, set(r) ^ RESULT_KEYS
        assert ("vs_pick" in r) == (r["key"] != doc["best"]["key"])
        iv = r["metrics"]["test"]["intervals"]
        assert iv["accuracy"][0] <= r["metrics"]["test"]["accuracy"] <= iv["accuracy"][1]
        assert set(iv) == {"accuracy", "balanced_accuracy", "macro_f1", "log_loss"}
        assert r["selection"]["se"] > 0 and len(r["selection"]["scores"]) == 5
        assert r["key"] == f"{r['backbone_label']}__{r['head']}"
        assert set(r["metrics"]) == {"test"} and METRIC_KEYS <= set(r["metrics"]["test"])
        assert r["selection_split"] == "cv" and all(len(c["scores"]) == 5 for c in r["search"])
        assert (r["history"] is not None) == (r["head"] == "dense")
        if r["head"] == "dense":  # a small set: epochs chosen by 3-fold CV, then every training row trained on
            assert (r["params"]["stopping"], r["params"]["stopping_folds"]) == ("cv", 3)
            assert r["params"]["stopping_rows"] > 0 and r["history"]["val_loss"] == []
            assert r["params"]["epochs_run"] == r["params"]["best_epoch"]
        assert (out / r["model_file"]).is_file() and (out / r["predictions_file"]).is_file()
        with open(out / r["predictions_file"]) as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == r["metrics"]["test"]["n"] and set(rows[0]) == {"path", "split", "true", "pred",
                                                                           "p_ant", "p_bee", "p_wasp"}
    # the chosen candidate and its score are recorded; best = highest selection score, read on the final split
    for r in doc["results"]:
        chosen = r["search"][r["selection"]["index"]]
        assert r["selection"]["score"] == chosen["mean"] == max(c["mean"] for c in r["search"])
        assert all(r["params"][k] == v for k, v in chosen["params"].items())
        assert r["cost"]["form"] == "exact" and r["cost"]["data"] == "memory" and not r["cost"]["subsample"]
    # the pick: by the default rule from the selection scores, read on the final split with its interval
    from pipeline.fit.pick import pick

    best = doc["results"][pick(doc["results"], "one_se").index]
    b = doc["best"]
    assert (b["key"], b["split"], b["metric"], b["rule"]) == (best["key"], "test", "accuracy", "one_se")
    assert b["value"] == best["metrics"]["test"]["accuracy"] and b["n"] == best["metrics"]["test"]["n"]
    assert b["interval"] == best["metrics"]["test"]["intervals"]["accuracy"] and b["reason"]
    assert set(b["tied_with"]) == {r["key"] for r in doc["results"] if r.get("vs_pick", {}).get("tied")}
    for r in doc["results"]:
        if "vs_pick" in r:
            vs = r["vs_pick"]
            assert vs["split"] == "test" and vs["n"] == b["n"] and vs["p_holm"] >= vs["p_value"]
            assert vs["selection"]["method"] == "nadeau_bengio" and vs["selection"]["folds"] == 5
    with open(out / "splits.csv") as f:
        split_rows = list(csv.DictReader(f))
    assert len(split_rows) == sum(sum(c.values()) for c in ds["counts"].values())
    assert set(split_rows[0]) == {"path", "split", "class", "sha256"}
    # the audit (on by default): which cache, why, its files in the run folder
    au = doc["audit"]
    assert au["images"] == len(split_rows) and au["cache"]["backbone_label"] in {c["backbone_label"]
                                                                                   for c in doc["caches"]}
    assert au["cache"]["chosen_by"].startswith("best out-of-fold accuracy")
    assert set(au["duplicates"]["clusters"]) == {"across_classes", "across_splits", "within_split"}
    for name, rel in au["files"].items():
        with open(out / rel) as f:
            assert next(csv.reader(f))[0] in ("cluster", "path"), name
    # heads load without this project's code: joblib pipeline predicts class names, .keras is plain Keras
    X = _feature_set(tmp_path / "x", "mobilenet").features[:5]
    logreg = joblib.load(out / "heads" / "mobilenet-a1.0-224__logreg.joblib")
    assert set(logreg.predict(X)) <= set(CLASSES)
    model = keras.models.load_model(out / "heads" / "mobilenet-a1.0-224__dense.keras")
    assert model.predict(X, verbose=0).shape == (5, 3)
    # the leaderboard renders every result, best first and marked
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(leaderboard_table(doc))
    text = console.export_text()
    lines = [ln for ln in text.splitlines() if "mobilenet" in ln]
    assert len(lines) == 6 and best["head"] in lines[0] and "*" in lines[0] and "*" not in "".join(lines[1:])


def test_maps_go_flat_to_sklearn_heads_and_whole_to_dense(fake_caches, quick_dense, tmp_path):
    fake_caches("maps", backbone="mobilenet", shape=(2, 2, 4), n=150)
    run = run_fit(FitConfig(fake_caches.dir, heads=["dense", "centroid"], features="maps", class_weight="balanced",
                            out=tmp_path / "run"), log=_quiet, source=fake_caches.source)
    doc = run.results
    assert doc["caches"][0]["feature"] == "maps" and doc["caches"][0]["feature_shape"] == [2, 2, 4]
    dense = next(r for r in doc["results"] if r["head"] == "dense")
    assert dense["params"]["class_weight"] == "balanced"
    import keras

    model = keras.models.load_model(tmp_path / "run" / dense["model_file"])
    assert tuple(model.input_shape[1:]) == (2, 2, 4)


def test_train_val_without_test_selects_by_cv_and_keeps_val_untouched(fake_caches, tmp_path):
    """The tutorials' layout: the number that chose the head is never its headline (unless asked for)."""
    splits = np.array(["train", "train", "val"] * 50)
    fake_caches("tv", backbone="mobilenet", n=150, splits=splits)
    doc = run_fit(FitConfig(fake_caches.dir, heads=["logreg", "centroid"], out=tmp_path / "run"), log=_quiet,
                  source=fake_caches.source).results
    assert doc["protocol"]["selection"] == "cv" and doc["protocol"]["final_splits"] == ["val"]
    assert doc["protocol"]["select_on"] == "auto" and not doc["best"]["selection_is_final"]
    assert all(r["selection_split"] == "cv" and len(r["selection"]["scores"]) == 5 for r in doc["results"])
    old = run_fit(FitConfig(fake_caches.dir, heads=["logreg", "centroid"], out=tmp_path / "run2", select_on="val"),
                  log=_quiet, source=fake_caches.source).results
    assert old["protocol"]["selection"] == "val" and old["best"]["selection_is_final"]
    assert "selection score" in old["protocol"]["description"]
    assert all(r["selection"]["n"] == 50 for r in old["results"])
    other = next(r for r in old["results"] if "vs_pick" in r)
    assert other["vs_pick"]["selection"]["method"] == "paired_bootstrap_val"


def test_val_folders_select_on_val_and_report_val_and_test(fake_caches, tmp_path):
    splits = np.array(["train", "train", "val", "test"] * 50)
    fake_caches("split", backbone="mobilenet", n=200, splits=splits)
    doc = run_fit(FitConfig(fake_caches.dir, heads=["logreg"], out=tmp_path / "run"), log=_quiet,
                  source=fake_caches.source).results
    assert doc["dataset"]["split_source"] == "folders" and doc["protocol"]["selection"] == "val"
    assert doc["protocol"]["final_splits"] == ["val", "test"] and doc["protocol"]["cv_folds"] is None
    r = doc["results"][0]
    assert set(r["metrics"]) == {"val", "test"} and all(len(c["scores"]) == 1 for c in r["search"])
    assert doc["best"]["split"] == "test"
    assert {m["split"] for m in r["mistakes"]} <= {"test"}


def test_no_caches_is_a_cache_error(tmp_path):
    with pytest.raises(CacheError, match="no complete feature caches.*extract"):
        run_fit(FitConfig(tmp_path, out=tmp_path / "run"))


def test_several_datasets_fit_the_last_extracted_and_say_how_to_pick(fake_caches, tmp_path):
    a = fake_caches("a", backbone="mobilenet", dataset="flowers")
    b = fake_caches("b", backbone="mobilenet", dataset="birds")
    fake_caches.source.meta(a)["updated"] = "2026-03-01T10:00:00+0000"
    fake_caches.source.meta(b)["updated"] = "2026-02-01T10:00:00+0000"  # birds was extracted before flowers
    lines: list[str] = []
    doc = run_fit(FitConfig(fake_caches.dir, heads=["centroid"], out=tmp_path / "r1"), log=lines.append,
                  source=fake_caches.source).results
    assert doc["dataset"]["name"] == "flowers" and len(doc["caches"]) == 1
    (said,) = [ln for ln in lines if "several datasets" in ln]
    assert "fitting flowers (/data/flowers), the one extracted last" in said
    assert "also there: birds" in said and "--dataset NAME" in said
    doc = run_fit(FitConfig(fake_caches.dir, dataset="birds", heads=["centroid"], out=tmp_path / "r2"),
                  source=fake_caches.source).results
    assert doc["dataset"]["name"] == "birds" and len(doc["caches"]) == 1


def test_two_datasets_of_one_name_are_told_apart_by_their_folder(fake_caches, tmp_path):
    a = fake_caches("a", backbone="mobilenet", dataset="data")
    b = fake_caches("b", backbone="mobilenet", dataset="data")
    fake_caches.source.meta(b)["dataset_root"] = "/other/project/data"  # same folder name, another dataset
    fake_caches.source.meta(a)["updated"] = "2026-03-01T10:00:00+0000"
    with pytest.raises(FitError) as e:  # the name alone is ambiguous
        run_fit(FitConfig(fake_caches.dir, dataset="data", heads=["centroid"], out=tmp_path / "r2"),
                source=fake_caches.source)
    msg = str(e.value)
    assert "2 datasets are named data" in msg and "/data/data" in msg and "/other/project/data" in msg
    assert "--dataset PATH" in msg and "\n" not in msg
    lines: list[str] = []  # without --dataset: the one extracted last, and how to pick the other by its folder
    doc = run_fit(FitConfig(fake_caches.dir, heads=["centroid"], out=tmp_path / "r1"), log=lines.append,
                  source=fake_caches.source).results
    assert doc["dataset"]["root"] == "/data/data"
    assert any("also there: data (/other/project/data)" in ln and "--dataset PATH" in ln for ln in lines)
    lines: list[str] = []
    doc = run_fit(FitConfig(fake_caches.dir, dataset="/other/project/data", heads=["centroid"], out=tmp_path / "r3"),
                  log=lines.append, source=fake_caches.source).results
    assert doc["dataset"]["root"] == "/other/project/data" and len(doc["caches"]) == 1
    assert Path(doc["caches"][0]["path"]).name == b.name
    here = tmp_path / "project"  # a bare word that is a folder here means that folder: `fit --dataset data`
    (here / "data").mkdir(parents=True)
    fake_caches.source.meta(a)["dataset_root"] = str(here / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(here)
        doc = run_fit(FitConfig(fake_caches.dir, dataset="data", heads=["centroid"], out=tmp_path / "r4"),
                      source=fake_caches.source).results
    assert doc["dataset"]["root"] == str(here / "data")
    elsewhere = tmp_path / "elsewhere"  # a folder here that is neither dataset: the word is a name again
    (elsewhere / "data").mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(FitError, match="2 datasets are named data"):
        mp.chdir(elsewhere)
        run_fit(FitConfig(fake_caches.dir, dataset="data", heads=["centroid"], out=tmp_path / "r5"),
                source=fake_caches.source)
    # fit says where the features it compares came from
    assert any(ln.startswith("dataset data from /other/project/data: mobilenet-a1.0-224 (b.h5)") for ln in lines)
    assert a.exists()


def test_no_usable_cache_says_why(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    (d / "flowers-0123abcd__mobilenet_v2-a1.0-224__crop__w0.h5.parts").mkdir()  # an extraction still running
    with pytest.raises(CacheError) as e:
        run_fit(FitConfig(d, out=tmp_path / "r"))
    assert "unfinished" in str(e.value) and "rerun the same extract command" in str(e.value)
    (d / "birds-0123abcd__mobilenet_v2-a1.0-224__crop__w0.h5").write_bytes(b"not an HDF5 file")
    with pytest.raises(CacheError) as e:
        run_fit(FitConfig(d, out=tmp_path / "r"))
    msg = str(e.value)
    assert "birds-0123abcd__mobilenet_v2-a1.0-224__crop__w0.h5 cannot be used" in msg and "unfinished" in msg
    assert "\n" not in msg


def test_backbone_option_filters_caches(fake_caches, tmp_path):
    fake_caches("a", backbone="mobilenet")
    fake_caches("b", backbone="mobilenet_v2")
    doc = run_fit(FitConfig(fake_caches.dir, backbones=["mobilenet_v2-a1.0-224"], heads=["centroid"],
                            out=tmp_path / "r"), source=fake_caches.source).results
    assert [c["backbone"] for c in doc["caches"]] == ["mobilenet_v2"]
    with pytest.raises(CacheError, match="backbone inception_v3"):
        run_fit(FitConfig(fake_caches.dir, backbones=["inception_v3"], heads=["centroid"], out=tmp_path / "r2"),
                source=fake_caches.source)


def test_mixed_datasets_and_mismatched_classes_are_refused(fake_caches, tmp_path):
    a = fake_caches("a", backbone="mobilenet", dataset="flowers")
    b = fake_caches("b", backbone="mobilenet_v2", dataset="birds")
    with pytest.raises(FitError, match="different datasets mixed"):
        run_fit(FitConfig(caches=[a, b], heads=["centroid"], out=tmp_path / "r1"), source=fake_caches.source)
    c = fake_caches("c", backbone="mobilenet_v2", dataset="flowers", classes=["ant", "bee"])
    with pytest.raises(FitError, match="disagree on the classes"):
        run_fit(FitConfig(caches=[a, c], heads=["centroid"], out=tmp_path / "r2"), source=fake_caches.source)


@pytest.mark.parametrize("options, message", [
    ({"heads": ["forest"]}, "unknown head 'forest'; known heads: " + ", ".join(HEADS) + " (or 'all')"),
    ({"pick": "nope"}, "unknown --pick 'nope'; choose one of best, one_se, one_se_simple"),
    ({"select_on": "test"}, "unknown --select-on 'test'; choose one of auto, cv, val"),
    ({"features": "median"}, "unknown --features 'median'; choose one of avg, max, maps"),
    ({"class_weight": "auto"}, "unknown --class-weight 'auto'; choose one of none, balanced"),
    ({"audit": False, "exclude_leaks": True}, "--exclude-leaks needs the audit (drop --no-audit)"),
    ({"memory_budget": "lots"}, "--memory-budget 'lots' is not a size; write it like 2GB, 500MB or 1.5GiB"),
])
def test_bad_options_fail_when_the_config_is_made_before_any_cache_is_opened(fake_caches, options, message):
    """A FitConfig that exists is valid: a bad option is one line when it is made, before any cache is looked at."""
    fake_caches("a", backbone="mobilenet")

    class NoCache(CacheSource):
        def scan(self, cache_dir):
            raise AssertionError("a bad option must be refused before any cache is looked for")

        def open(self, path, kind):
            raise AssertionError("a bad option must be refused before any cache is opened")

    with pytest.raises(FitError) as err:
        run_fit(FitConfig(fake_caches.dir, **options), source=NoCache())
    assert str(err.value) == message and "\n" not in str(err.value)


def test_fit_config_is_frozen_resolved_and_checked_again_when_replaced():
    import dataclasses

    config = FitConfig("cache", caches=["a.h5", Path("b.h5")], backbones="mobilenet", heads=["knn", "logreg"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.heads = ("dense",)
    assert config.caches == ("a.h5", Path("b.h5")) and config.backbones == ("mobilenet",)
    assert config.heads == ("logreg", "knn")  # resolved: registry order, each once
    assert FitConfig().heads == FitConfig(heads=["all"]).heads == tuple(HEADS)
    assert FitConfig(seed=1) == FitConfig(seed=1) and hash(FitConfig(seed=1)) == hash(FitConfig(seed=1))
    assert FitConfig(memory_budget="2GB").budget.bytes == 2 * 10**9
    assert FitConfig(memory_budget="2GB").budget.source == "--memory-budget 2GB"
    audit = FitConfig(seed=3, memory_budget="2GB").audit_settings()
    assert (audit.seed, audit.memory_bytes, audit.block_bytes) == (3, 2 * 10**9, 2 * 10**9 // 8)
    assert dataclasses.replace(config, memory_budget="1MB").budget.bytes == 10**6  # the budget follows its text
    with pytest.raises(FitError, match="unknown --pick 'best2'"):
        dataclasses.replace(config, pick="best2")


def test_an_existing_run_folder_is_refused(fake_caches, tmp_path):
    fake_caches("a", backbone="mobilenet")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "results.json").write_text("{}")
    with pytest.raises(FitError, match="not empty"):
        run_fit(FitConfig(fake_caches.dir, heads=["centroid"], out=busy), source=fake_caches.source)


def test_run_fit_writes_no_report(fake_caches, tmp_path, monkeypatch):
    """The HTML report is its callers' (``fit``, the demo): run_fit writes the run folder and nothing beside it."""
    from pipeline.report import default_report_path

    fake_caches("toy", backbone="mobilenet")
    monkeypatch.chdir(tmp_path)  # where write_report's default page, reports/<run name>.html, would go
    out = tmp_path / "runs" / "toy_run"
    run = run_fit(FitConfig(fake_caches.dir, heads=["centroid"], out=out), log=_quiet, source=fake_caches.source)
    assert run.run_dir == out and (out / "results.json").is_file() and not hasattr(run, "report_path")
    assert default_report_path([out]) == Path("reports") / "toy_run.html"
    assert not Path("reports").exists() and list(tmp_path.rglob("*.html")) == []


def test_cli_fit_writes_the_report_after_the_fit(tmp_path, monkeypatch):
    """`fit` writes reports/<run name>.html itself and prints its path; --no-report writes none; a fault writing
    the report is one line (a RunError, printed by the entry point as one ``error:`` line).

    The real report is written (reports/ under the test's own folder): a typer command takes no seam, and the
    page is quick to render for one centroid head."""
    from typer.testing import CliRunner

    import cli
    from pipeline.errors import RunError
    from test_fit_scale import _cache

    cache_dir = _cache(tmp_path, n=150).parent  # a small real cache: the command reads the files on disk
    monkeypatch.chdir(tmp_path)  # where the default page, reports/<run name>.html, goes
    args = ["fit", "--cache-dir", str(cache_dir), "--head", "centroid", "--no-audit"]
    res = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "r1")])
    assert res.exit_code == 0, (res.output, res.exception)
    page = tmp_path / "reports" / "r1.html"
    assert page.is_file() and "centroid" in page.read_text(encoding="utf-8")  # rendered from the whole run folder
    assert page.stat().st_mtime_ns >= (tmp_path / "r1" / "results.json").stat().st_mtime_ns
    assert f"run folder: {tmp_path / 'r1'}" in res.stdout and f"report: {Path('reports') / 'r1.html'}" in res.stdout
    res = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "r2"), "--no-report"])
    assert res.exit_code == 0 and "report:" not in res.stdout, res.output
    assert (tmp_path / "r2" / "results.json").is_file() and sorted(p.name for p in page.parent.iterdir()) == ["r1.html"]

    (tmp_path / "reports" / "r3.html").mkdir()  # the page cannot take that name
    res = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "r3")])
    assert isinstance(res.exception, RunError) and "\n" not in str(res.exception), (res.output, res.exception)
    assert "cannot write the report" in str(res.exception)
    assert (tmp_path / "r3" / "results.json").is_file()  # the run itself is kept


def test_one_class_in_train_is_a_fit_error(fake_caches, tmp_path):
    path = fake_caches("one", backbone="mobilenet", n=60, splits=np.array(["train"] * 40 + ["val"] * 20))
    fs = fake_caches.source.store[str(path)]
    fs.labels[:40] = 0
    with pytest.raises(FitError, match="one class only"):
        run_fit(FitConfig(fake_caches.dir, heads=["centroid"], out=tmp_path / "r"), source=fake_caches.source)


def test_cli_fit_error_is_one_line(tmp_path):
    from typer.testing import CliRunner

    import cli

    res = CliRunner().invoke(cli.app, ["fit", "--cache-dir", str(tmp_path), "--head", "nope"])
    assert res.exit_code == 2  # a usage error, caught by the option's choices before anything runs
    assert "'nope' is not one of 'dense'" in res.output
    res = CliRunner().invoke(cli.app, ["fit", "--cache-dir", str(tmp_path), "--head", "logreg"])
    assert isinstance(res.exception, CacheError) and "\n" not in str(res.exception)
    assert "no complete feature caches" in str(res.exception)


# ---- real data ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hym_cli(hymenoptera_v2_cache, tmp_path_factory):
    """`python cli.py fit --head all` on the hymenoptera cache (train/val folders), once for the module."""
    from typer.testing import CliRunner

    import cli

    out = tmp_path_factory.mktemp("fit") / "hym_all"
    res = CliRunner().invoke(cli.app, ["fit", "--cache-dir", str(Path(hymenoptera_v2_cache).parent),
                                       "--head", "all", "--out", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    return res, out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_hymenoptera_fit_all_heads_best_val_accuracy(hym_cli):
    res, out, doc = hym_cli
    assert len({r["head"] for r in doc["results"]}) >= 5
    # train/ + val/ and no test/: chosen by cross-validation on train, val untouched for the headline
    assert doc["protocol"]["selection"] == "cv" and doc["protocol"]["final_splits"] == ["val"]
    assert doc["dataset"]["split_source"] == "folders"
    assert doc["best"]["split"] == "val" and doc["best"]["value"] >= 0.93 and doc["best"]["n"] == 153
    lo, hi = doc["best"]["interval"]
    assert lo < doc["best"]["value"] < hi and hi - lo > 0.04  # 153 images: several points wide
    assert doc["caches"][0]["sha256"] and len(doc["caches"][0]["weights_sha256"]) == 64
    assert {"numpy", "scikit-learn", "keras"} <= set(doc["versions"])


@pytest.mark.slow
def test_hymenoptera_leaderboard_and_report_print(hym_cli):
    res, out, doc = hym_cli
    text = res.stdout
    assert "hymenoptera" in text and "* pick (rule one_se)" in text and "logreg" in text and "linear_svm" in text
    b = doc["best"]
    assert f"{b['value']:.3f} [{b['interval'][0]:.3f}, {b['interval'][1]:.3f}]" in text
    for r in doc["results"]:
        assert r["head"] in text
    assert f"run folder: {out}" in text
    html = Path("reports") / f"{out.name}.html"  # fit writes reports/<run name>.html, like the report command
    assert f"report: {html}" in text and html.is_file()


@pytest.mark.slow
def test_two_identical_fit_runs_give_identical_metrics(hymenoptera_v2_cache, tmp_path):
    docs = []
    for i in range(2):
        run = run_fit(FitConfig(caches=[hymenoptera_v2_cache], heads=["dense", "logreg", "svm", "knn"],
                                out=tmp_path / f"run{i}"), log=_quiet)
        docs.append(run.results)
    for a, b in zip(docs[0]["results"], docs[1]["results"]):
        assert a["key"] == b["key"]
        assert a["metrics"] == b["metrics"] and a["search"] == b["search"] and a["params"] == b["params"]
        assert a["history"] == b["history"] and a["mistakes"] == b["mistakes"]
        pa = (tmp_path / "run0" / a["predictions_file"]).read_text()
        assert pa == (tmp_path / "run1" / b["predictions_file"]).read_text()


@pytest.fixture(scope="module")
def flowers_run(flowers5_caches, tmp_path_factory):
    """One fit over the MobileNet and MobileNetV2 caches of a flowers5 subset (no split folders): the protocol on
    real data with two backbones in one run. Two cheap heads are enough for what is checked here; the accuracy of
    every head on real features is measured by the benchmarks (bench/heads.py, bench/fit_scale.py)."""
    out = tmp_path_factory.mktemp("fit") / "flowers5"
    lines: list[str] = []
    run = run_fit(FitConfig(caches=[flowers5_caches["mobilenet"], flowers5_caches["mobilenet_v2"]],
                            heads=["logreg", "centroid"], out=out), log=lines.append)
    return run.results, lines


@pytest.mark.slow
def test_flowers5_automatic_split_is_used_and_reported(flowers_run, flowers5_subset):
    doc, _ = flowers_run
    ds = doc["dataset"]
    assert ds["split_source"] == "hash" and "sha1" in ds["split_rule"] and "stable" in ds["split_rule"]
    assert set(ds["counts"]) == {"train", "test"}
    n_train = sum(ds["counts"]["train"].values())
    n_test = sum(ds["counts"]["test"].values())
    n_images = sum(len(list(d.iterdir())) for d in flowers5_subset.iterdir())
    assert n_train + n_test == n_images - len(ds["failed"]) and 0.27 < n_test / (n_train + n_test) < 0.33
    for cls in ds["class_names"]:
        # each image's side comes from its own hash: about 30 % per class, within ~2.5 standard deviations for
        # classes of ~100 images
        assert 0.18 < ds["counts"]["test"][cls] / (ds["counts"]["test"][cls] + ds["counts"]["train"][cls]) < 0.42
    assert doc["protocol"]["selection"] == "cv" and doc["protocol"]["final_splits"] == ["test"]
    assert doc["protocol"]["cv_folds"] == 5  # fewer than 2,000 training images: 5 folds
    assert doc["protocol"]["search"] == {"train_rows": n_train, "search_rows": n_train, "subsample": False,
                                         "refit_rows": n_train}
    for r in doc["results"]:
        assert set(r["metrics"]) == {"test"} and r["selection_split"] == "cv"
        assert "top5_accuracy" in r["metrics"]["test"] and r["metrics"]["test"]["n"] == n_test
        assert r["cost"]["form"] == "exact" and r["cost"]["data"] == "memory"


@pytest.mark.slow
def test_flowers5_two_backbones_are_compared_on_the_same_rows(flowers_run):
    doc, lines = flowers_run
    assert [c["backbone"] for c in doc["caches"]] == ["mobilenet", "mobilenet_v2"]
    assert len(doc["results"]) == 4
    assert len([ln for ln in lines if not ln.startswith(("dataset ", "pick ", "audit"))]) == 4
    assert len([ln for ln in lines if ln.startswith("audit")]) == 4  # one line per kind
    assert all(c["sha256"] and len(c["sha256"]) == 64 for c in doc["caches"])  # content digests of cache v2
    by = {(doc["caches"][r["cache_index"]]["backbone"], r["head"]): r for r in doc["results"]}
    # the same folds and the same test images for both backbones
    for head in ("logreg", "centroid"):
        a, b = by[("mobilenet", head)], by[("mobilenet_v2", head)]
        assert [len(c["scores"]) for c in a["search"]] == [len(c["scores"]) for c in b["search"]]
        assert a["metrics"]["test"]["n"] == b["metrics"]["test"]["n"]
    # real ImageNet features: a linear probe is far above chance (0.2) on both backbones
    for backbone in ("mobilenet", "mobilenet_v2"):
        assert by[(backbone, "logreg")]["metrics"]["test"]["accuracy"] >= 0.6, backbone
    best = max(doc["results"], key=lambda r: r["selection"]["score"])
    assert doc["best"]["key"] == best["key"]


# ---- an unfinished run never looks complete ------------------------------------------------------------------------


def test_an_interrupted_fit_leaves_no_run_folder_and_the_same_command_runs_again(fake_caches, tmp_path):
    from pipeline.errors import RunError
    from pipeline.results import load_run, partial_dir

    fake_caches("toy", backbone="mobilenet")
    out = tmp_path / "run"

    def interrupt(line: str) -> None:
        if "centroid" in line:  # Ctrl-C after the first head's files were written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_fit(FitConfig(fake_caches.dir, heads=["logreg", "centroid"], out=out), log=interrupt,
                source=fake_caches.source)
    assert not out.exists() and not partial_dir(out).exists()
    # a kill -9 leaves the hidden unfinished folder: readers say so, and the same fit replaces it
    (partial_dir(out) / "heads").mkdir(parents=True)
    (partial_dir(out) / "heads" / "stale.joblib").write_bytes(b"half")
    with pytest.raises(RunError, match="unfinished: its fit was interrupted"):
        load_run(out)
    lines: list[str] = []
    run = run_fit(FitConfig(fake_caches.dir, heads=["logreg", "centroid"], out=out), log=lines.append,
                  source=fake_caches.source)
    assert any("replacing the unfinished run folder" in ln for ln in lines)
    assert run.run_dir == out and (out / "results.json").is_file() and not partial_dir(out).exists()
    assert not (out / "heads" / "stale.joblib").exists() and load_run(out).results["best"]["key"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_fit_keeps_nothing_and_blocks_no_rerun(fake_caches, tmp_path):
    from pipeline.results import partial_dir

    fake_caches("toy", backbone="mobilenet")
    out = tmp_path / "run"
    with pytest.raises(FitError, match="--memory-budget"):
        run_fit(FitConfig(fake_caches.dir, heads=["logreg"], out=out, memory_budget="1KB"), log=_quiet,
                source=fake_caches.source)
    assert not out.exists() and not partial_dir(out).exists()
    assert run_fit(FitConfig(fake_caches.dir, heads=["logreg"], out=out), log=_quiet,
                   source=fake_caches.source).run_dir == out
    # an --out that cannot be made is one line, before any head is fitted
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(FitError, match="cannot create the run folder") as err:
        run_fit(FitConfig(fake_caches.dir, heads=["logreg"], out=blocker / "run"), log=_quiet,
                source=fake_caches.source)
    assert "\n" not in str(err.value)


def test_fits_killed_under_other_names_are_swept_and_a_live_one_is_never_replaced(fake_caches, tmp_path):
    import json
    import socket
    import subprocess
    import sys

    from pipeline.results import OWNER_FILE, partial_dir

    fake_caches("toy", backbone="mobilenet")
    runs = tmp_path / "runs"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed, building = partial_dir(runs / "toy_20261201-090000"), partial_dir(runs / "busy")
        for work, pid in ((killed, dead.pid), (building, live.pid)):
            (work / "heads").mkdir(parents=True)
            (work / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
        foreign = runs / ".not_ours.partial"  # no owner recorded: never touched by the sweep
        foreign.mkdir()
        lines = []
        run = run_fit(FitConfig(fake_caches.dir, heads=["logreg"], out=runs / "new"), log=lines.append,
                      source=fake_caches.source)
        assert not killed.exists() and building.is_dir() and foreign.is_dir()
        assert f"removed {killed}, the unfinished run folder of a fit that was killed" in lines
        assert not (run.run_dir / OWNER_FILE).exists()
        with pytest.raises(FitError) as err:  # the same --out as a fit that is still building it
            run_fit(FitConfig(fake_caches.dir, heads=["logreg"], out=runs / "busy"), log=_quiet,
                    source=fake_caches.source)
        assert f"another fit (process {live.pid}) is building {runs / 'busy'} now" in str(err.value)
        assert (building / "heads").is_dir()
    finally:
        live.kill()
        live.wait()
    # once its builder is gone, the same command replaces it
    assert run_fit(FitConfig(fake_caches.dir, heads=["logreg"], out=runs / "busy"), log=_quiet,
                   source=fake_caches.source).run_dir.is_dir()


def test_a_full_disk_while_fit_writes_is_one_line_and_keeps_nothing(fake_caches, small_tmpfs):
    from pipeline.results import partial_dir

    fake_caches("toy", backbone="mobilenet")
    (small_tmpfs / "filler").write_bytes(b"\0" * (256 * 1024 - 12 * 1024))  # 12 kB left: less than the run
    out = small_tmpfs / "run"
    with pytest.raises(FitError) as err:
        run_fit(FitConfig(fake_caches.dir, heads=["logreg", "knn"], out=out), log=_quiet, source=fake_caches.source)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"cannot write the run folder {out} (No space left on device)")
    assert "nothing of this run was kept" in msg
    assert not out.exists() and not partial_dir(out).exists()
    assert [p.name for p in small_tmpfs.iterdir()] == ["filler"]  # no 0-byte or truncated file left


def test_ctrl_c_in_any_command_prints_one_line_and_exits_130(capsys):
    import typer

    import cli

    app = typer.Typer()

    @app.command()
    def slow() -> None:
        raise KeyboardInterrupt

    @app.command()
    def other() -> None:
        pass

    with pytest.raises(SystemExit) as done:
        cli.main(["slow"], application=app, quiet_native=False)
    assert done.value.code == cli.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err.strip().endswith("interrupted: rerun the same command to resume")
