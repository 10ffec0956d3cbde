"""predict and export: the same labels as fit recorded, and an exported .keras model that plain Keras reproduces."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from pipeline.data import load_image
from pipeline.errors import RunError, WeightsError
from pipeline.predict import export_model, predict_images
from pipeline.results import select_head

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hym_run(hymenoptera_v2_cache, tmp_path_factory) -> Path:
    from pipeline.fit import FitConfig, run_fit

    out = tmp_path_factory.mktemp("run") / "hym"
    run_fit(FitConfig(caches=[hymenoptera_v2_cache], heads=["dense", "logreg"], out=out), log=lambda m: None)
    return out


def _recorded(run: Path, key: str, split: str = "val") -> dict[str, str]:
    with open(run / "predictions" / f"{key}.csv") as f:
        return {r["path"]: r["pred"] for r in csv.DictReader(f) if r["split"] == split}


@pytest.mark.parametrize("head", ["logreg", "dense"])
def test_predict_on_val_images_equals_fit_predictions(hym_run, head):
    rh = select_head(hym_run, head)
    root = Path(json.loads((hym_run / "results.json").read_text())["dataset"]["root"])
    recorded = _recorded(hym_run, rh.key)
    assert len(recorded) == 153
    _, rows = predict_images(hym_run, [root / "val"], head=head, log=lambda m: None)
    got = {str(Path(r["path"]).relative_to(root)): r["label"] for r in rows}
    assert got == recorded
    for r in rows:
        assert abs(sum(r["probs"].values()) - 1) < 1e-4 and r["probability"] == max(r["probs"].values())


def test_exported_keras_model_reproduces_predictions(hym_run, tmp_path):
    import keras

    out = export_model(hym_run, tmp_path / "model.keras", head="dense")
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["class_names"] == ["ants", "bees"] and side["input_size"] == 224
    model = keras.models.load_model(out)  # plain Keras, no custom objects
    root = Path(json.loads((hym_run / "results.json").read_text())["dataset"]["root"])
    files = sorted((root / "val").rglob("*.jpg"))[:40]
    pixels = np.stack([load_image(f, side["input_size"], side["resize"]) for f in files]).astype("float32")
    probs = model.predict(pixels, verbose=0)
    _, rows = predict_images(hym_run, files, head="dense", log=lambda m: None)
    expect = np.array([[r["probs"][c] for c in side["class_names"]] for r in rows])
    assert np.abs(probs - expect).max() <= 1e-5


def test_predict_cli_writes_csv_and_reports_bad_files(hym_run, tmp_path):
    root = Path(json.loads((hym_run / "results.json").read_text())["dataset"]["root"])
    bad = tmp_path / "in" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff nope")
    good = sorted((root / "val/ants").glob("*.jpg"))[0]
    out = tmp_path / "pred.csv"
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "predict", str(hym_run), str(good), str(bad.parent),
                           "--head", "logreg", "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 3, proc.stderr  # done, but some images failed (README: exit status)
    assert "1 of 2 image(s) could not be decoded" in proc.stderr
    rows = list(csv.DictReader(open(out)))
    assert [r["label"] for r in rows] == ["ants", ""] and rows[1]["error"]


def test_predict_errors_are_clear(hym_run, tmp_path):
    with pytest.raises(RunError, match="no head 'nope'.*available"):
        select_head(hym_run, "nope")
    with pytest.raises(RunError, match="not a run folder"):
        select_head(tmp_path, None)
    wrong = tmp_path / "other.weights.h5"
    wrong.write_bytes(b"not the same file")
    with pytest.raises(WeightsError, match="SHA-256"):
        predict_images(hym_run, [Path(__file__)], head="logreg", weights=str(wrong), log=lambda m: None)
    with pytest.raises(RunError, match="scikit-learn head"):
        export_model(hym_run, tmp_path / "x.keras", head="logreg")
