"""`finetune RUN`: a fine-tuned model added to a fit run, by its protocol, then reported, predicted and exported.

Tiny generated images and a small random-weight MobileNetV2 (alpha 0.35, 32 px): mechanics only, accuracy is
bench/finetune.py's.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_extract, write_image
from pipeline.errors import RunError, WeightsError
from pipeline.finetune import FinetuneConfig

SIZE = 32
ALPHA = 0.35
COLOURS = {"blue": (30, 40, 210), "red": (210, 40, 30)}


def _config(**kw):
    return FinetuneConfig(**{"unfreeze": 6, "epochs": 1, "learning_rate": 1e-3, "batch_size": 8, "workers": 1,
                             "progress": False, "run_eagerly": True} | kw)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A class-per-folder set (hash split, so `fit` selects by cross-validation), extracted and fitted with logreg
    and centroid; an unreadable image left out at extraction."""
    from pipeline.fit import FitConfig, run_fit

    base = tmp_path_factory.mktemp("ftcli")
    root = base / "blobs"
    rng = np.random.default_rng(0)
    for c, colour in COLOURS.items():
        for i in range(10):
            img = rng.integers(0, 120, (36 + i, 40, 3)).astype(np.int64)
            img[6:28, 8:30] = colour
            write_image(root / c / f"{i:02d}.jpg", np.clip(img, 0, 255).astype(np.uint8))
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not an image")
    res = run_extract(root, base / "cache", backbone="mobilenet_v2", weights="none", input_size=SIZE, alpha=ALPHA,
                      runtime="keras")
    run = base / "run"
    run_fit(FitConfig(caches=[res.path], heads=["logreg", "centroid"], out=run), log=lambda m: None)
    return run, root


@pytest.fixture(scope="module")
def tuned(fitted, tmp_path_factory):
    """The run after `finetune` with one epoch (a copy: the other tests keep the fitted run as it was)."""
    from pipeline.finetune import finetune_run

    run = tmp_path_factory.mktemp("tuned") / "run"
    shutil.copytree(fitted[0], run)
    msgs: list[str] = []
    done = finetune_run(run, config=_config(), log=msgs.append, command="python cli.py finetune RUN")
    return run, done, msgs


def test_finetune_adds_a_documented_entry_by_the_runs_protocol(fitted, tuned):
    run, done, msgs = tuned
    doc = json.loads((run / "results.json").read_text())
    before = json.loads((fitted[0] / "results.json").read_text())
    assert [r["key"] for r in doc["results"]] == [r["key"] for r in before["results"]] + [done.entry["key"]]
    assert doc["best"] == before["best"], "best stays the frozen heads' choice"
    e = doc["results"][-1]
    assert e == done.entry
    assert e["key"] == "mobilenet_v2-a0.35-32__finetune" and e["head"] == "finetune"
    assert e["params"]["start"] == "mobilenet_v2-a0.35-32__logreg"
    assert {"unfreeze": 6, "epochs_run": 1, "learning_rate": 1e-3}.items() <= e["params"].items()
    assert e["params"]["best_epoch"] in (0, 1)
    # the run used cross-validation: selection on a hash-held-out part of train, never a test image
    assert before["protocol"]["selection"] == "cv" and e["selection_split"] == "train_holdout"
    assert [s["params"]["epoch"] for s in e["search"]] == [0, 1]
    assert e["selection"]["index"] == e["params"]["best_epoch"]
    assert e["selection"]["score"] == max(s["mean"] for s in e["search"])
    counts = before["dataset"]["counts"]
    assert e["cost"]["train_rows"] + e["cost"]["selection_rows"] == sum(counts["train"].values())
    assert e["cost"]["selection_rows"] >= 2  # at least one image per class
    # final numbers: the run's final splits, all of their images, with the other heads' metric fields
    frozen = before["results"][0]
    assert set(e["metrics"]) == set(frozen["metrics"]) == {"test"}
    assert set(e["metrics"]["test"]) == set(frozen["metrics"]["test"])
    assert e["metrics"]["test"]["n"] == frozen["metrics"]["test"]["n"] == sum(counts["test"].values())
    assert e["fit_seconds"] > e["cost"]["train_seconds"] > 0 and e["predict_ms_per_1000"] > 0
    assert len(e["history"]["val_accuracy"]) == 1
    # files: the predictions of the same images as the frozen heads'; failed images left out
    with open(run / e["predictions_file"]) as f:
        rows = list(csv.DictReader(f))
    with open(fitted[0] / frozen["predictions_file"]) as f:
        assert [(r["path"], r["split"]) for r in rows] == [(r["path"], r["split"]) for r in csv.DictReader(f)]
    assert "red/broken.jpg" in {x["path"] for x in doc["dataset"]["failed"]}
    assert (run / e["model_file"]).is_file() and not list(run.glob("*/*.partial.*"))
    assert any("selection on train_holdout" in m for m in msgs)


def test_saved_model_changed_only_its_unfrozen_layers(tuned):
    """The backbone inside heads/<key>.keras against the one the cache was extracted with: batch norms and every layer
    below the top 6 identical, the top layers with weights trained."""
    import keras

    from pipeline.backbones import build_feature_model

    run, done, _ = tuned
    saved = keras.models.load_model(run / done.entry["model_file"])
    inner = [layer for layer in saved.layers if isinstance(layer, keras.Model)]
    fresh = build_feature_model("mobilenet_v2", "none", SIZE, ALPHA, announce=lambda m: None)
    base = [layer for layer in fresh.model.layers if isinstance(layer, keras.Model)][0]
    assert len(inner) == 1 and [x.name for x in inner[0].layers][1:] == [x.name for x in base.layers][1:]
    n = len(base.layers)
    changed = []
    for i, (a, b) in enumerate(zip(inner[0].layers, base.layers)):
        same = all(np.array_equal(keras.ops.convert_to_numpy(u), keras.ops.convert_to_numpy(v))
                   for u, v in zip(a.weights, b.weights))
        if isinstance(a, keras.layers.BatchNormalization) or i < n - 6:
            assert same, f"{a.name} changed"
        elif a.weights:
            changed.append(same is False)
    assert changed and all(changed) and done.entry["params"]["best_epoch"] == 1


def test_rerun_replaces_its_entry_and_report_shows_it(tuned, tmp_path):
    from pipeline.finetune import finetune_run
    from pipeline.report import write_report

    run, done, _ = tuned
    again = finetune_run(run, head="logreg", config=_config(unfreeze=0), seed=3, log=lambda m: None)
    assert again.replaced
    doc = json.loads((run / "results.json").read_text())
    keys = [r["key"] for r in doc["results"]]
    assert keys.count(done.entry["key"]) == 1 and doc["results"][-1]["params"]["unfreeze"] == 0
    assert doc["results"][-1]["params"]["seed"] == 3
    html = write_report([run], tmp_path / "r.html").read_text()
    e = doc["results"][-1]
    i = keys.index(e["key"])
    assert f'data-path="[&#34;results&#34;, {i}, &#34;fit_seconds&#34;]"' in html  # its time, from results.json
    assert "fine-tuned from the image files" in html and "finetune" in html


def test_predict_and_plain_keras_export_agree(tuned, fitted, tmp_path):
    import keras

    from pipeline.data import load_image
    from pipeline.predict import export_model, predict_images

    run, done, _ = tuned
    root = fitted[1]
    files = sorted(root.rglob("*.jpg"))
    key = done.entry["key"]
    rh, rows = predict_images(run, files, head=key, log=lambda m: None)
    assert rh.key == key and [r.get("error") is not None for r in rows] == [f.name == "broken.jpg" for f in files]
    out = export_model(run, tmp_path / "ft.keras", head=key)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["input_size"] == SIZE and side["head"] == key and side["class_names"] == ["blue", "red"]
    model = keras.models.load_model(out)  # plain Keras, no custom objects
    ok = [f for f in files if f.name != "broken.jpg"]
    px = np.stack([load_image(f, SIZE, side["resize"]) for f in ok]).astype("float32")
    probs = np.asarray(model(px, training=False))
    expect = np.array([[r["probs"][c] for c in side["class_names"]] for r in rows if "probs" in r])
    assert np.abs(probs - expect).max() <= 1e-5
    # predictions of the final splits as recorded in the run
    now = next(r for r in json.loads((run / "results.json").read_text())["results"] if r["key"] == key)
    with open(run / now["predictions_file"]) as f:  # the entry as it is now (a rerun may have replaced it)
        recorded = {r["path"]: float(r["p_red"]) for r in csv.DictReader(f)}
    got = {str(Path(r["path"]).relative_to(root)): r["probs"]["red"] for r in rows if "probs" in r}
    assert max(abs(got[p] - v) for p, v in recorded.items()) < 1e-4


def test_finetune_errors_are_one_line(fitted, tmp_path):
    from typer.testing import CliRunner

    import cli
    from pipeline.finetune import finetune_run

    run, _ = fitted
    res = CliRunner().invoke(cli.app, ["finetune", str(run), "--head", "centroid"])
    assert isinstance(res.exception, RunError) and "\n" not in str(res.exception)
    assert "cannot start from mobilenet_v2-a0.35-32__centroid" in str(res.exception)
    assert "use one of: mobilenet_v2-a0.35-32__logreg" in str(res.exception)
    res = CliRunner().invoke(cli.app, ["finetune", str(run), "--learning-rate", "0"])
    assert res.exit_code == 2 and "must be above 0" in res.output
    # a run whose backbone came from a weights file that has gone: one line naming --weights
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    doc = json.loads((moved / "results.json").read_text())
    doc["caches"][0].update(weights_source="file", weights_path=str(tmp_path / "gone.weights.h5"),
                            weights_sha256="0" * 64)
    (moved / "results.json").write_text(json.dumps(doc))
    with pytest.raises(WeightsError, match="is not there; pass --weights PATH") as info:
        finetune_run(moved, config=_config(), log=lambda m: None)
    assert "\n" not in str(info.value)
    assert json.loads((moved / "results.json").read_text()) == doc, "a failed finetune leaves the run as it was"


def test_rows_from_splits_csv_are_the_rows_fits_planning_gives_and_need_no_cache(fitted, tmp_path):
    """fit's splits.csv gives finetune the very rows that planning the run again from its caches gives (the path of
    runs written before that file), so a run whose caches have gone still fine-tunes from its own record."""
    import copy

    from pipeline.finetune.run import _run_rows
    from pipeline.results import load_run, read_splits

    run = load_run(fitted[0])
    recorded_csv = read_splits(run)
    recorded, planned = _run_rows(run.results, recorded_csv), _run_rows(run.results, None)
    assert recorded.rel_paths == planned.rel_paths and "red/broken.jpg" not in recorded.rel_paths
    for field in ("labels", "splits", "train", "select"):
        np.testing.assert_array_equal(getattr(recorded, field), getattr(planned, field), err_msg=field)
    assert recorded.final_splits == planned.final_splits == run.results["protocol"]["final_splits"]
    assert recorded.select_name == planned.select_name == "train_holdout"  # hash split: cross-validation
    assert len(recorded.train) and len(recorded.select) and not set(recorded.train) & set(recorded.select)
    gone = copy.deepcopy(run.results)
    gone["caches"][0]["path"] = str(tmp_path / "gone.h5")
    assert _run_rows(gone, recorded_csv).rel_paths == planned.rel_paths
    with pytest.raises(RunError, match="is gone"):
        _run_rows(gone, None)
    damaged = [dict(r) for r in recorded_csv]
    damaged[0]["class"] = "green"
    with pytest.raises(RunError, match="names a class its results.json does not"):
        _run_rows(run.results, damaged)
    with pytest.raises(RunError, match="splits.csv lists other"):
        _run_rows(run.results, recorded_csv[1:])
