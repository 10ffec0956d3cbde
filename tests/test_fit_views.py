"""Augmented views in fitting and prediction: the view mode is a choice of the selection split only, views never
leak across folds or into training from selection / test images, caches without views are unchanged, and predict
averages over the same views as extraction made."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.neighbors import NearestCentroid

import pipeline.cache as cache_mod
from conftest import run_extract
from pipeline.fit import CacheSource, FitConfig, run_fit
from pipeline.fit.dense import DenseHead
from pipeline.fit.evaluate import evaluate_head
from pipeline.fit.heads import HEADS, HeadSpec
from pipeline.fit.protocol import plan_protocol, selection_folds
from pipeline.fit.views import augmented_source, best_mode
from test_fit import FakeReader, _feature_set, quick_dense  # noqa: F401 (fixture)

CLASSES = ["a", "b", "c"]


def _quiet(_m: str) -> None:
    pass


def _blobs(n: int = 240, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centres = rng.normal(scale=1.2, size=(3, d))
    X = (centres[y] + rng.normal(size=(n, d))).astype(np.float32)
    paths = [f"{CLASSES[c]}/{i:04d}.jpg" for i, c in enumerate(y)]
    return X, y, centres, paths, rng


def _cv(y, paths):
    splits, proto = plan_protocol(np.array([""] * len(y)), y, CLASSES, paths, 0)
    return splits, proto, selection_folds(proto, splits, y, 0)


# ---- the choice is the selection split's ---------------------------------------------------------------------


@pytest.mark.parametrize("helpful_on", ["train", "test"])
def test_view_mode_is_chosen_on_the_selection_split_only(helpful_on):
    """Views of training images are clean copies near their class centre while the test images' views point at
    another class (or the reverse): the choice follows the selection folds (all inside train), whatever the views
    would do on test."""
    X, y, centres, paths, rng = _blobs()
    splits, proto, folds = _cv(y, paths)
    test = splits == "test"
    clean = centres[y][:, None, :] + rng.normal(scale=0.3, size=(len(y), 2, X.shape[1]))
    if helpful_on == "train":  # the test images' views all point at the next class
        wrong = centres[(y + 1) % 3][:, None, :] + rng.normal(scale=0.3, size=(len(y), 2, X.shape[1]))
    else:  # the training images' views point at random classes
        wrong = centres[rng.integers(0, 3, (len(y), 2))] + rng.normal(scale=0.3, size=(len(y), 2, X.shape[1]))
    good = ~test if helpful_on == "train" else test
    V = np.where(good[:, None, None], clean, wrong).astype(np.float32)
    res = evaluate_head(HEADS["centroid"], X, y, splits, CLASSES, paths, proto, folds, views=V,
                        view_spec={"n": 2, "kinds": ["crop"], "seed": 0, "rule": "headbench-views-1"})
    v = res.to_json()["views"]
    assert v["offered"] == ["none", "train", "tta", "both"]
    assert len(v["selection"]["none"]["scores"]) == proto.cv_folds
    fin = v["final"]["test"]
    if helpful_on == "train":  # views looked great on the folds: chosen, and they hurt on test (no peeking)
        assert v["chosen"] in ("tta", "both")
        assert v["selection"][v["chosen"]]["mean"] > v["selection"]["none"]["mean"]
        assert fin["with"]["accuracy"] < fin["without"]["accuracy"] - 0.2
    else:  # views looked bad on the folds: not chosen, though they would have helped on test
        assert v["chosen"] == "none"
        assert fin["with"] == fin["without"] and fin["added"]["accuracy"] == 0.0
    assert res.to_json()["selection"]["score"] == v["selection"][v["chosen"]]["mean"]
    assert res.metrics["test"]["accuracy"] == fin["with"]["accuracy"]


def test_ties_go_to_the_simplest_mode():
    assert best_mode({"none": [0.8, 0.9], "train": [0.85, 0.85], "tta": [0.9, 0.8]}) == "none"
    assert best_mode({"none": [0.8], "tta": [0.9], "both": [0.9]}) == "tta"


# ---- no view of a selection or test image is trained on ----------------------------------------------------------

FIT_LOG: list[np.ndarray] = []


class Spy(ClassifierMixin, BaseEstimator):
    """Nearest centroid on columns 2.. that records the rows it is fitted on (column 0: image id, 1: is a view)."""

    def fit(self, X, y):
        FIT_LOG.append(np.asarray(X)[:, :2].copy())
        self.clf_ = NearestCentroid().fit(np.asarray(X)[:, 2:], y)
        self.classes_ = self.clf_.classes_
        return self

    def predict_proba(self, X):
        d = ((np.asarray(X)[:, None, 2:] - self.clf_.centroids_[None]) ** 2).sum(-1)
        e = np.exp(-(d - d.min(axis=1, keepdims=True)))
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def test_views_are_trained_on_only_with_their_image_inside_the_fitting_part():
    X, y, centres, paths, rng = _blobs(n=120, d=4)
    n = len(y)
    ids = np.arange(n, dtype=np.float32)
    Xc = np.column_stack([ids, np.zeros(n), X]).astype(np.float32)
    V = np.stack([np.column_stack([ids, np.ones(n), X + rng.normal(scale=0.2, size=X.shape)]) for _ in range(2)],
                 axis=1).astype(np.float32)
    splits, proto, folds = _cv(y, paths)
    spec = HeadSpec(name="spy", summary="spy", build=lambda ctx, p, s: Spy(), grid=lambda ctx: [{}])
    FIT_LOG.clear()
    res = evaluate_head(spec, Xc, y, splits, CLASSES, paths, proto, folds, views=V)
    assert res.views is not None and "train" in res.views.offered
    allowed = [set(f.tolist()) for f, _ in folds] + [set(np.flatnonzero(splits == "train").tolist())]
    scored = set().union(*(set(s.tolist()) for _, s in folds))
    test_ids = set(np.flatnonzero(splits == "test").tolist())
    with_views = 0
    for rows in FIT_LOG:
        images = set(rows[:, 0].astype(int).tolist())
        centre = set(rows[rows[:, 1] == 0, 0].astype(int).tolist())
        views = rows[rows[:, 1] == 1, 0].astype(int)
        assert images in allowed  # one fold's fitting images, or the training split: folds are over images
        assert set(views.tolist()) <= centre  # a view only ever travels with its own image
        assert not images & test_ids
        if len(views):
            with_views += 1
            assert np.array_equal(np.bincount(views, minlength=n)[sorted(centre)], np.full(len(centre), 2))
    assert with_views >= len(folds)  # every fold was also scored with training views
    assert scored == set(np.flatnonzero(splits == "train").tolist())


def test_dense_early_stopping_holds_out_whole_images():
    src = augmented_source(np.zeros((40, 3), np.float32), np.ones((40, 2, 3), np.float32), np.arange(40) % 2,
                           ["x", "y"])
    fit_idx, val_idx = DenseHead(validation_fraction=0.2)._holdout(src.labels, src.groups)
    held = set(src.groups[val_idx].tolist())
    assert len(held) == 8 and not held & set(src.groups[fit_idx].tolist())
    assert len(val_idx) == 3 * len(held)


# ---- run_fit: caches with and without views --------------------------------------------------------------------


class ViewsReader(FakeReader):
    def __init__(self, fs, V, spec):
        super().__init__(fs)
        self.V, self.n_views = V, V.shape[1]
        self.meta = {**fs.meta, "views": spec}

    def read_views(self, idx=None):
        idx = np.arange(self.n) if idx is None else np.asarray(idx)
        return self.V[idx]


class MadeReaders(CacheSource):
    """A :class:`pipeline.fit.CacheSource` that opens each registered path as the reader made for it."""

    def __init__(self) -> None:
        self.made: dict[str, FakeReader] = {}

    def open(self, path: Path, kind: str) -> FakeReader:
        return self.made[str(path)]


@pytest.fixture
def view_cache(tmp_path):
    """One synthetic cache whose views are noisy copies of the centre view (or none with ``k=0``); fits read it by
    being handed ``view_cache.source``."""
    source = MadeReaders()
    made = source.made

    def make(k: int = 2, seed: int = 0) -> Path:
        path = tmp_path / f"views{k}_{seed}.h5"
        path.write_bytes(b"")
        fs = _feature_set(path, "mobilenet_v2", seed=seed)
        rng = np.random.default_rng(1)
        V = (fs.features[:, None, :] + rng.normal(scale=0.7, size=(len(fs.paths), k, fs.features.shape[1])))
        spec = {"n": k, "kinds": ["flip", "crop"][:k], "seed": 0, "rule": "headbench-views-1"} if k else {"n": 0}
        made[str(path)] = ViewsReader(fs, V.astype(np.float32), spec) if k else FakeReader(fs)
        return path

    make.source = source
    return make


def test_cache_without_views_records_no_views(view_cache, tmp_path):
    doc = run_fit(FitConfig(caches=[view_cache(k=0)], heads=["logreg", "centroid"], out=tmp_path / "run"),
                  log=_quiet, source=view_cache.source).results
    assert doc["caches"][0]["views"] is None  # a schema-1 style cache: no views attribute at all
    for r in doc["results"]:
        assert r["views"] is None
        assert r["selection"]["score"] == r["search"][r["selection"]["index"]]["mean"]


def test_fit_with_views_logs_records_and_reports_the_choice(view_cache, tmp_path):
    from pipeline.report import render_report
    from pipeline.results import load_run
    from test_report import _check_numbers, _parse_strict

    lines: list[str] = []
    path = view_cache(k=2)
    run = run_fit(FitConfig(caches=[path], heads=["logreg", "centroid"], out=tmp_path / "run"), log=lines.append,
                  source=view_cache.source)
    doc = run.results
    assert any("2 augmented views per image (flip, crop)" in m for m in lines)
    for r in doc["results"]:
        v = r["views"]
        assert v["available"] == 2 and v["spec"]["kinds"] == ["flip", "crop"]
        assert v["chosen"] in v["offered"] and set(v["selection"]) == set(v["offered"])
        assert set(v["final"]["test"]) == {"with", "without", "added"}
        assert r["metrics"]["test"]["accuracy"] == v["final"]["test"]["with"]["accuracy"]
        line = next(m for m in lines if f" {r['head']} " in m and "acc" in m)
        assert f"views {v['chosen']}: cv {v['selection']['none']['mean']:.3f} -> " in line
    html = render_report([load_run(run.run_dir)])
    n = _check_numbers(_parse_strict(html), [doc])
    assert n > 0 and "views added" in html and "Augmented views (2 per image: flip, crop)" in html

    off = run_fit(FitConfig(caches=[path], heads=["centroid"], out=tmp_path / "off", views=False), log=_quiet,
                  source=view_cache.source)
    v = off.results["results"][0]["views"]
    assert v["offered"] == ["none"] and v["chosen"] == "none" and "--no-views" in v["notes"][0]


def test_streamed_features_use_no_views_and_say_why(view_cache, tmp_path):
    doc = run_fit(FitConfig(caches=[view_cache(k=2)], heads=["centroid"], out=tmp_path / "run", memory_budget="20KB"),
                  log=_quiet, source=view_cache.source).results
    v = doc["results"][0]["views"]
    assert doc["results"][0]["cost"]["data"] == "streamed"
    assert v["offered"] == ["none"] and "streamed" in v["notes"][0]


# ---- predict renders the same views and averages -----------------------------------------------------------------


def test_predict_averages_over_the_cached_views(tiny_dataset, tmp_path):
    from pipeline.views import make_view_spec
    from pipeline.predict import predict_images

    spec = make_view_spec(2, ("flip", "crop"), seed=3)
    res = run_extract(tiny_dataset, tmp_path / "cache", backbone="mobilenet_v2", weights="none", input_size=32,
                      alpha=0.35, batch_size=4, views=spec)
    run = run_fit(FitConfig(caches=[res.path], heads=["logreg"], out=tmp_path / "run"), log=_quiet).results
    assert run["results"][0]["views"]["spec"]["kinds"] == ["flip", "crop"]
    # make the head use test-time views whatever it chose on these 12 random-weight images
    doc_path = tmp_path / "run" / "results.json"
    doc = json.loads(doc_path.read_text())
    doc["results"][0]["views"]["chosen"] = "tta"
    doc_path.write_text(json.dumps(doc))

    files = sorted(tiny_dataset.rglob("*.jpg"))[:3]
    msgs: list[str] = []
    _, rows = predict_images(tmp_path / "run", files, log=msgs.append)
    assert any("averages its probabilities over the centre view and 2 views" in m for m in msgs)
    import joblib

    head = joblib.load(tmp_path / "run" / doc["results"][0]["model_file"])
    with cache_mod.open_features(res.path) as fr:
        where = {p: i for i, p in enumerate(fr.paths)}
        idx = np.array([where[str(f.relative_to(tiny_dataset))] for f in files])
        centre, views = fr.read(idx), fr.read_views(idx)
    order = [list(head.classes_).index(c) for c in doc["dataset"]["class_names"]]
    manual = np.mean([head.predict_proba(centre)] + [head.predict_proba(views[:, k]) for k in range(2)],
                     axis=0)[:, order]
    centre_only = head.predict_proba(centre)[:, order]
    got = np.array([[r["probs"][c] for c in doc["dataset"]["class_names"]] for r in rows])
    np.testing.assert_allclose(got, manual, atol=2e-3)
    assert np.abs(manual - centre_only).max() > 10 * np.abs(got - manual).max()  # averaging is what was matched


def test_export_averages_the_mirror_image_when_that_is_the_only_view(tiny_dataset, tmp_path, quick_dense):
    import keras

    from pipeline.data import read_image
    from pipeline.views import make_view_spec
    from pipeline.predict import export_model, predict_images

    res = run_extract(tiny_dataset, tmp_path / "cache", backbone="mobilenet_v2", weights="none", input_size=32,
                      alpha=0.35, batch_size=4, views=make_view_spec(1, ("flip",)))
    run_fit(FitConfig(caches=[res.path], heads=["dense"], out=tmp_path / "run"), log=_quiet)
    doc_path = tmp_path / "run" / "results.json"
    doc = json.loads(doc_path.read_text())
    doc["results"][0]["views"]["chosen"] = "tta"  # as if the selection split had chosen test-time views
    doc_path.write_text(json.dumps(doc))

    msgs: list[str] = []
    out = export_model(tmp_path / "run", tmp_path / "model.keras", log=msgs.append)
    assert any("averages the image and its mirror image" in m for m in msgs)
    assert "mirror" in json.loads(out.with_suffix(".json").read_text())["tta"]
    files = sorted(tiny_dataset.rglob("*.jpg"))[:4]
    _, rows = predict_images(tmp_path / "run", files, log=_quiet)
    names = doc["dataset"]["class_names"]
    got = np.array([[r["probs"][c] for c in names] for r in rows])
    pixels = np.stack([read_image(f, 32, "crop")[0] for f in files]).astype(np.float32)
    exported = np.asarray(keras.models.load_model(out).predict(pixels, verbose=0))
    np.testing.assert_allclose(exported, got, atol=1e-3)
