"""Tests of the HTML report (pipeline/report.py): rendering from results.json, strict HTML5 parsing, numbers equal
to results.json as printed, self-containment, sizes, errors, the CLI command, and a real render in headless
Chromium driven over the DevTools protocol.

Synthetic run folders (results.json schema v2, or v1, plus a few tiny generated images) are made by
:func:`make_run`; a results.json written by the schema-1 writer is kept in tests/data/results_v1;
a real fit run is rendered when the fit stage and the shared data are available.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import html5lib
import numpy as np
import pytest
from PIL import Image

from pipeline.errors import RunError
from pipeline.report import default_report_path, render_report, write_report
from pipeline.results import load_run

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
URL_RE = re.compile(r"""(?:src|href|action|poster|srcset)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//""",
                    re.I)


# ---- synthetic run folders -------------------------------------------------------------------------------------


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = colour
    arr[::4, :, :] = 255 - np.array(colour, np.uint8)
    Image.fromarray(arr).save(path)


def _metrics(rng: np.random.Generator, classes: list[str], n: int, binary: bool) -> dict[str, Any]:
    k = len(classes)
    cm = rng.integers(0, 4, size=(k, k))
    np.fill_diagonal(cm, rng.integers(n // k - 3, n // k + 1, size=k))
    per_class = {c: {"precision": float(rng.uniform(0.6, 1)), "recall": float(rng.uniform(0.6, 1)),
                     "f1": float(rng.uniform(0.6, 1)), "support": int(cm[i].sum())} for i, c in enumerate(classes)}
    m: dict[str, Any] = {"n": int(cm.sum()), "accuracy": float(rng.uniform(0.7, 0.99)),
                         "balanced_accuracy": float(rng.uniform(0.7, 0.99)), "macro_f1": float(rng.uniform(0.7, 0.99)),
                         "log_loss": float(rng.uniform(0.05, 0.9)), "confusion_matrix": cm.tolist(),
                         "per_class": per_class}
    if binary:
        fpr = np.concatenate([[0.0], np.sort(rng.uniform(0, 1, 40)), [1.0]])
        tpr = np.clip(np.sqrt(fpr) + rng.uniform(0, 0.05, fpr.size), 0, 1)
        rec = np.linspace(1, 0, 42)
        m.update(roc_auc=float(rng.uniform(0.8, 0.99)), roc={"fpr": fpr.tolist(), "tpr": np.maximum.accumulate(tpr).tolist()},
                 pr={"precision": np.clip(1 - 0.3 * rec ** 2, 0, 1).tolist(), "recall": rec.tolist()})
    if k >= 5:
        m["top5_accuracy"] = 1.0
    return m


def make_run(base: Path, name: str = "synthetic_20250101-120000", *, classes: tuple[str, ...] = ("ants", "bees"),
             heads: tuple[str, ...] = ("logreg", "linear_svm", "knn", "dense"),
             backbones: tuple[str, ...] = ("mobilenet_v2-a1.0-224",), final_splits: tuple[str, ...] = ("val",),
             selection: str = "cv", n_images: int = 4, n_mistakes: int = 5, missing_thumbnail: bool = True,
             seed: int = 0, dataset_name: str = "synthetic", thumb_size: tuple[int, int] = (40, 30),
             schema: int = 2, skipped: tuple[str, ...] = (), approximate: tuple[str, ...] = ()) -> Path:
    """Write a synthetic run folder (results.json of ``schema`` and the images its mistakes point to) and return it.

    With schema 2, heads in ``approximate`` are recorded as fitted in a batch form on streamed features with a search
    subsample, and heads in ``skipped`` as skipped with a reason.
    """
    rng = np.random.default_rng(seed)
    classes = list(classes)
    binary = len(classes) == 2
    data_root = base / f"data_{name}"
    palette = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 180, 30), (150, 50, 170), (20, 20, 20)]
    splits = ["train", *final_splits] if selection == "cv" else ["train", "val", *[s for s in final_splits if s != "val"]]
    paths = []
    for si, split in enumerate(splits):
        for ci, cls in enumerate(classes):
            for j in range(n_images):
                rel = f"{split}/{cls}/img_{j:03d}.png"
                _image(data_root / rel, palette[(ci + si) % len(palette)], thumb_size)
                paths.append((rel, split, cls))
    counts = {s: {c: int(rng.integers(30, 120)) for c in classes} for s in splits}
    counts_all = [sum(counts[s][c] for s in splits) for c in classes]
    run = base / name
    (run / "heads").mkdir(parents=True)
    caches = []
    for bi, label in enumerate(backbones):
        caches.append({
            "path": f"cache/{dataset_name}__{label}__avg.h5", "sha256": f"{bi:02d}" + "ab" * 31,
            "backbone": label.split("-")[0], "backbone_label": label, "input_size": 224,
            "preprocess": "x / 127.5 - 1", "resize": "squash", "weights_source": "file coralq_weights.h5",
            "weights_sha256": "cd" * 32, "feature": "avg", "feature_shape": [1280], "n_rows": sum(counts_all),
            "extract_seconds": float(rng.uniform(20, 60)), "versions": {"tensorflow": "2.21.0", "keras": "3.15.0"},
            "command": f"python cli.py extract {data_root} --backbone {label.split('-')[0]}",
            "created": "2025-01-01T11:00:00+00:00"})
    results = []
    for bi, label in enumerate(backbones):
        for head in heads:
            key = f"{label}__{head}"
            params = {"C": float(rng.choice([0.01, 0.1, 1.0, 10.0]))} if head != "dense" else {
                "hidden": 256, "dropout": 0.3, "optimizer": "adam"}
            search = [{"params": dict(params, C=c) if "C" in params else params, "mean": float(rng.uniform(0.7, 0.98)),
                       "std": float(rng.uniform(0, 0.05)), "scores": rng.uniform(0.7, 1, 5).tolist()}
                      for c in ([0.01, 0.1, 1.0, 10.0] if "C" in params else [None])]
            if "C" in params:
                search = [dict(s, params={"C": c}) for s, c in zip(search, [0.01, 0.1, 1.0, 10.0])]
            chosen = [0.01, 0.1, 1.0, 10.0].index(params["C"]) if "C" in params else 0
            metrics = {s: _metrics(rng, classes, 40 * len(classes), binary) for s in final_splits}
            mistakes = []
            for k in range(n_mistakes):
                rel, split, cls = paths[(k * 3 + bi) % len(paths)]
                wrong = classes[(classes.index(cls) + 1) % len(classes)]
                mistakes.append({"path": rel, "split": final_splits[0], "true": cls, "pred": wrong,
                                 "prob": float(0.99 - 0.05 * k - rng.uniform(0, 0.01))})
            if missing_thumbnail and mistakes:
                mistakes[-1]["path"] = "val/gone/deleted_since.jpg"
            results.append({
                "key": key, "cache_index": bi, "backbone_label": label, "head": head, "params": params,
                "selection_split": selection, "search": search, "fit_seconds": float(rng.uniform(0.05, 9)),
                "predict_ms_per_1000": float(rng.uniform(0.1, 30)), "metrics": metrics,
                "history": {"loss": np.linspace(1, 0.2, 12).tolist(), "val_loss": np.linspace(1.1, 0.35, 12).tolist(),
                            "accuracy": np.linspace(0.5, 0.97, 12).tolist(),
                            "val_accuracy": np.linspace(0.5, 0.92, 12).tolist()} if head == "dense" else None,
                "mistakes": mistakes,
                "model_file": f"heads/{key}.{'keras' if head == 'dense' else 'joblib'}",
                "predictions_file": f"predictions/{key}.csv"})
            if schema >= 2:
                approx = head in approximate
                results[-1].update(
                    selection={"index": chosen, "score": search[chosen]["mean"], "std": search[chosen]["std"]},
                    search_seconds=float(rng.uniform(0.1, 5)),
                    cost={"form": "minibatch" if approx else "exact",
                          "approximation": "mini-batch solver of the same objective" if approx else None,
                          "data": "streamed" if approx else "memory", "train_rows": 50000,
                          "search_rows": 10000 if approx else 50000, "subsample": approx, "refit_rows": 50000,
                          "reason": "synthetic"})
    if schema >= 3:  # intervals, standard errors, every result against the pick, the pick's reason
        for r in results:
            r["selection"]["se"] = float(rng.uniform(0.005, 0.03))
            r["selection"]["scores"] = r["search"][r["selection"]["index"]]["scores"]
            for m in r["metrics"].values():
                a = m["accuracy"]
                m["intervals"] = {"accuracy": [max(0.0, a - 0.04), min(1.0, a + 0.03)],
                                  "macro_f1": [max(0.0, m["macro_f1"] - 0.05), min(1.0, m["macro_f1"] + 0.04)]}
        pick_i = 1 if len(results) > 1 else 0
        for i, r in enumerate(results):
            if i == pick_i:
                continue
            tied = i % 2 == 0
            d = float(rng.uniform(-0.02, 0.0) if tied else rng.uniform(-0.12, -0.05))
            r["vs_pick"] = {"split": final_splits[-1], "n": 40 * len(classes), "pick_only_right": 9,
                            "other_only_right": 7 if tied else 1, "p_value": 0.8 if tied else 0.004,
                            "p_holm": 1.0 if tied else 0.02, "delta": d,
                            "delta_interval": [d - 0.03, d + 0.03] if tied else [d - 0.03, d + 0.02],
                            "tied": tied, "selection": {"method": "nadeau_bengio", "folds": 5, "delta": d,
                                                        "se": 0.01, "p_value": 0.5, "tied": True}}
    skipped_json = [{"key": f"{backbones[0]}__{h}", "cache_index": 0, "backbone_label": backbones[0], "head": h,
                     "reason": f"{h} does not fit the memory budget (synthetic)", "cost": None} for h in skipped]
    best_i = 1 if len(results) > 1 else 0
    best = results[best_i]
    out = {
        "schema_version": schema, "created": "2025-01-01T12:00:00+00:00",
        "command": f"python cli.py fit {dataset_name} --heads {','.join(heads)}", "seed": 0,
        "versions": {"headbench": "0.1.0", "scikit-learn": "1.9.0", "numpy": "2.3.0"},
        "dataset": {"name": dataset_name, "root": str(data_root), "class_names": classes, "counts": counts,
                    "split_source": "folders", "split_rule": "train/ and val/ folders as given",
                    "failed": [{"path": "train/ants/imageNotFound.gif", "reason": "cannot identify image file"},
                               {"path": "train/bees/<odd> & name.tif", "reason": "truncated file"}],
                    "imbalance_ratio": max(counts_all) / min(counts_all)},
        "protocol": {"selection": selection, "cv_folds": 5 if selection == "cv" else None,
                     "final_splits": list(final_splits),
                     "description": "hyperparameters chosen by 5-fold CV on train; scores on the final split"},
        "caches": caches, "results": results,
        "best": {"key": best["key"], "split": final_splits[0], "metric": "accuracy",
                 "value": best["metrics"][final_splits[0]]["accuracy"]},
    }
    if schema >= 2:
        out.update(skipped=skipped_json, memory_budget={"bytes": 2_000_000_000, "source": "--memory-budget 2GB"})
    if schema >= 3:
        split = final_splits[-1]
        out["best"] = {"key": best["key"], "split": split, "metric": "accuracy",
                       "value": best["metrics"][split]["accuracy"],
                       "interval": best["metrics"][split]["intervals"]["accuracy"], "n": 40 * len(classes),
                       "rule": "one_se", "reason": "the strongest head among the 3 results within one standard "
                                                   "error of the best selection score (synthetic).",
                       "tied_with": [r["key"] for r in results if r.get("vs_pick", {}).get("tied")],
                       "within_one_se": [results[0]["key"]], "min_detectable": {"images": 6,
                                                                                "delta": 6 / (40 * len(classes))},
                       "selection_is_final": False}
    for r in results:  # stand-ins for the saved heads: the report checks the pick's file is there
        (run / r["model_file"]).write_bytes(b"synthetic head " + r["key"].encode())
    (run / "results.json").write_text(json.dumps(out, indent=1))
    return run


# ---- helpers on rendered pages ---------------------------------------------------------------------------------


def _parse_strict(html: str) -> Any:
    parser = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False)
    return parser.parse(html)


def _resolve(obj: Any, path: list) -> Any:
    for step in path:
        obj = obj[step]
    return obj


def _text(el: Any) -> str:
    return "".join(el.itertext()).strip()


def _check_numbers(doc: Any, results: list[dict]) -> int:
    """Every tagged number on the page equals its results.json value formatted as shown; returns the count."""
    n = 0
    for el in doc.iter():
        if not isinstance(el.tag, str) or el.get("data-path") is None:
            continue
        value = _resolve(results[int(el.get("data-run"))], json.loads(el.get("data-path")))
        assert _text(el) == format(value, el.get("data-fmt")), (el.get("data-path"), _text(el), value)
        n += 1
    return n


def _untagged_text(el: Any) -> str:
    """Text of ``el`` without tagged numbers, plots and the confusion matrices' derived row shares."""
    if not isinstance(el.tag, str) or el.get("data-path") is not None or el.tag.rsplit("}", 1)[-1] == "svg":
        return el.tail or ""
    if el.tag == "small" and el.get("class") == "share":
        return el.tail or ""
    return (el.text or "") + "".join(_untagged_text(ch) for ch in el) + (el.tail or "")


def _best_containers(doc: Any) -> list[Any]:
    return [el for el in doc.iter() if isinstance(el.tag, str) and el.get("data-best") == "true"]


# ---- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture()
def binary_run(tmp_path: Path) -> Path:
    return make_run(tmp_path)


@pytest.fixture()
def multiclass_run(tmp_path: Path) -> Path:
    return make_run(tmp_path, "flowers_20250102-090000", classes=("daisy", "dandelion", "rose", "sunflower", "tulip"),
                    backbones=("mobilenet_v2-a1.0-224", "mobilenet-a1.0-224"), final_splits=("val", "test"),
                    selection="val", heads=("logreg", "linear_svm", "knn", "random_forest", "dense"),
                    n_mistakes=12, dataset_name="flowers5")


# ---- tests ----------------------------------------------------------------------------------------------------


def test_binary_report_parses_strictly_and_shows_results_json_numbers(binary_run: Path, tmp_path: Path) -> None:
    out = write_report([binary_run], tmp_path / "r.html")
    html = out.read_text(encoding="utf-8")
    doc = _parse_strict(html)
    results = json.loads((binary_run / "results.json").read_text())
    # one leaderboard row per fitted head, the best one marked
    rows = doc.findall(".//table[@id='board']/tbody/tr")
    assert len(rows) == len(results["results"])
    best_rows = [r for r in rows if r.get("data-best") == "true"]
    assert [r.get("data-key") for r in best_rows] == [results["best"]["key"]]
    assert "best" in best_rows[0].get("class")
    # every tagged number equals results.json after the displayed rounding, and the best head shows its metrics
    assert _check_numbers(doc, [results]) > 50
    best = next(r for r in results["results"] if r["key"] == results["best"]["key"])
    shown = {json.dumps(json.loads(el.get("data-path"))) for c in _best_containers(doc) for el in c.iter()
             if isinstance(el.tag, str) and el.get("data-path")}
    bi = results["results"].index(best)
    for metric in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "roc_auc"):
        assert json.dumps(["results", bi, "metrics", "val", metric]) in shown, metric
    assert json.dumps(["results", bi, "fit_seconds"]) in shown
    assert json.dumps(["results", bi, "metrics", "val", "confusion_matrix", 1, 1]) in shown
    assert json.dumps(["results", bi, "metrics", "val", "per_class", "bees", "f1"]) in shown
    assert json.dumps(["best", "value"]) in shown
    # in the best head's containers no number is printed outside a tagged element (apart from derived shares)
    for c in _best_containers(doc):
        untagged = _untagged_text(c)
        assert not re.search(r"\d\.\d\d", untagged), re.findall(r".{30}\d\.\d\d.{10}", untagged)
    # binary: ROC/PR curves drawn; no history (no dense head?) -> the dense head has its curves
    assert html.count('aria-label="ROC and precision-recall curves"') == len(results["results"])
    assert html.count('aria-label="Training and validation curves"') == 1
    # self-contained: no network address anywhere a browser would fetch from, not even a namespace URL
    assert not URL_RE.search(html)
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "@import" not in html
    # thumbnails of the best head embedded, the missing one replaced by a placeholder
    imgs = doc.findall(".//img")
    assert len(imgs) == len(best["mistakes"]) - 1
    assert all(i.get("src").startswith("data:image/jpeg;base64,") for i in imgs)
    assert doc.find(".//*[@data-missing='val/gone/deleted_since.jpg']") is not None
    # failed images listed with reasons, escaped; imbalance called out
    assert "imageNotFound.gif" in html and "cannot identify image file" in html
    assert "&lt;odd&gt; &amp; name.tif" in html
    assert doc.find(".//*[@data-imbalance]") is not None


def test_multiclass_two_backbones_two_final_splits(multiclass_run: Path, tmp_path: Path) -> None:
    out = write_report([multiclass_run], tmp_path / "m.html")
    html = out.read_text(encoding="utf-8")
    doc = _parse_strict(html)
    results = json.loads((multiclass_run / "results.json").read_text())
    assert len(doc.findall(".//table[@id='board']/tbody/tr")) == 10
    assert _check_numbers(doc, [results]) > 200
    heads = doc.findall(".//section[@id='heads']/details")
    assert len(heads) == 10
    # both final splits shown for each head, 5x5 confusion matrices, top-5 column, no ROC for 5 classes
    assert len(doc.findall(".//details[@data-best='true']//div[@class='split']")) == 2
    assert len(doc.findall(".//details[@data-best='true']//table[@class='cm']/tbody/tr")) == 10
    assert "Top-5 acc." in html and "ROC AUC" not in html
    assert html.count('aria-label="Training and validation curves"') == 2
    assert html.count('aria-label="ROC and precision-recall curves"') == 0
    assert html.count("<img ") == 11  # 12 mistakes of the best head, one image gone
    headers = [_text(th) for th in doc.findall(".//table[@id='board']/thead/tr/th")]
    assert "Accuracyval" in headers and "Accuracytest" in headers
    assert len(html.encode()) < 5_000_000


def test_several_runs_one_page_and_default_name(binary_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = make_run(tmp_path, "synthetic_20250103-080000", backbones=("mobilenet-a1.0-224",), seed=3)
    monkeypatch.chdir(tmp_path)
    out = write_report([binary_run, other])
    assert out == Path("reports") / "synthetic_20250101-120000+synthetic_20250103-080000.html"
    html = out.read_text(encoding="utf-8")
    doc = _parse_strict(html)
    runs = [json.loads((d / "results.json").read_text()) for d in (binary_run, other)]
    rows = doc.findall(".//table[@id='board']/tbody/tr")
    assert len(rows) == 8
    assert {r.get("data-run") for r in rows} == {"0", "1"}
    assert len([r for r in rows if r.get("data-best")]) == 2
    assert _check_numbers(doc, runs) > 100
    # long names are shortened
    long = default_report_path([tmp_path / ("x" * 60), tmp_path / ("y" * 60), tmp_path / "z"])
    assert len(long.name) < 100 and long.name.startswith("x" * 40 + "+2more-")


def test_flowers5_scale_report_stays_small(tmp_path: Path) -> None:
    # 5 classes, 2 backbones x 6 heads, 12 mistakes each, thumbnails from 128 px images
    run = make_run(tmp_path, "flowers5_big", classes=("daisy", "dandelion", "rose", "sunflower", "tulip"),
                   backbones=("mobilenet_v2-a1.0-224", "mobilenet-a1.0-224"), final_splits=("val", "test"),
                   selection="cv", heads=("logreg", "linear_svm", "knn", "random_forest", "ridge", "dense"),
                   n_mistakes=12, n_images=12, thumb_size=(128, 128))
    out = write_report([run], tmp_path / "big.html")
    assert out.stat().st_size < 5_000_000
    assert out.stat().st_size < 1_500_000  # far below the limit: compact SVG, 96 px JPEG thumbnails


def test_minimal_results_json_renders(tmp_path: Path) -> None:
    # only what the schema requires at the top and per result; optional parts absent or null
    run = tmp_path / "minimal"
    run.mkdir()
    results = {
        "schema_version": 1, "dataset": {"name": "tiny", "class_names": ["a", "b", "c"]}, "protocol": {},
        "caches": [{"backbone_label": "bb"}],
        "results": [{"key": "bb__logreg", "cache_index": 0, "head": "logreg",
                     "metrics": {"val": {"accuracy": 0.5, "confusion_matrix": [[1, 0, 0], [0, 1, 1], [0, 0, 0]]}},
                     "history": None, "mistakes": [{"path": "x.jpg", "true": "a", "pred": "b", "prob": 0.9}]},
                    {"key": "bb__knn", "cache_index": 0, "head": "knn", "metrics": {}}],
        "best": {"key": "bb__logreg", "split": "val", "metric": "accuracy", "value": 0.5},
    }
    (run / "results.json").write_text(json.dumps(results))
    html = render_report([load_run(run)])
    doc = _parse_strict(html)
    assert len(doc.findall(".//table[@id='board']/tbody/tr")) == 2
    assert _check_numbers(doc, [results]) >= 10
    assert doc.find(".//*[@data-missing='x.jpg']") is not None
    # no best recorded renders, and says so; a best key that names no result is refused in one line
    results["best"]["key"] = None
    (run / "results.json").write_text(json.dumps(results))
    assert "No best head recorded" in render_report([load_run(run)])
    results["best"]["key"] = "gone"
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(RunError, match="best names 'gone', which is none of its results"):
        load_run(run)


def test_dense_stopping_rule_is_said_beside_its_curves(tmp_path: Path) -> None:
    run = make_run(tmp_path, "small", heads=("logreg", "dense"))
    results = json.loads((run / "results.json").read_text())
    dense = next(r for r in results["results"] if r["head"] == "dense")
    dense["params"].update(stopping="cv", stopping_rows=20, stopping_folds=3, best_epoch=9, epochs_run=9)
    dense["history"].update(val_loss=[], val_accuracy=[])
    (run / "results.json").write_text(json.dumps(results))
    doc = _parse_strict(render_report([load_run(run)]))
    caption = _text(doc.find(f".//details[@data-key='{dense['key']}']//figcaption"))
    assert ("its 9 epochs are the median best epoch of early stopping on 3 cross-validation folds (at least 20 "
            "held-out rows each)") in caption
    dense["params"].update(stopping="holdout", stopping_rows=120, stopping_folds=0)
    (run / "results.json").write_text(json.dumps(results))
    doc = _parse_strict(render_report([load_run(run)]))
    caption = _text(doc.find(f".//details[@data-key='{dense['key']}']//figcaption"))
    assert "held-out validation part (120 rows; epoch 9 kept)" in caption
    assert _check_numbers(doc, [results]) > 10


def test_skipped_heads_and_approximations_are_shown(tmp_path: Path) -> None:
    run = make_run(tmp_path, "scale", heads=("logreg", "linear_svm", "dense"), skipped=("svm", "knn"),
                   approximate=("linear_svm",))
    html = write_report([run], tmp_path / "scale.html").read_text(encoding="utf-8")
    doc = _parse_strict(html)
    results = json.loads((run / "results.json").read_text())
    assert len(doc.findall(".//table[@id='board']/tbody/tr")) == 3  # the leaderboard ranks fitted heads only
    box = doc.find(".//*[@id='skipped0']")
    assert box is not None and "2 heads skipped" in _text(box)
    assert "svm does not fit the memory budget (synthetic)" in _text(box) and "knn" in _text(box)
    row = doc.find(".//table[@id='board']/tbody/tr[@data-key='mobilenet_v2-a1.0-224__linear_svm']")
    assert "approx." in _text(row)
    details = doc.find(".//details[@data-key='mobilenet_v2-a1.0-224__linear_svm']")
    notes = _text(details.find(".//ul[@class='cost']"))
    assert "mini-batch solver" in notes and "streamed" in notes
    assert "subsample of 10,000 of 50,000 training rows; refitted on all 50,000" in notes
    assert details.find(".//ul[@class='cost']") is not None
    assert doc.find(".//details[@data-key='mobilenet_v2-a1.0-224__logreg']//ul[@class='cost']") is None
    assert "Memory budget" in html and "--memory-budget 2GB" in html
    assert _check_numbers(doc, [results]) > 50


def test_schema_1_results_are_read_with_the_same_loader(tmp_path: Path) -> None:
    """A results.json written by the schema-1 writer: loaded (chosen candidate recovered), reported, and shared by
    report and predict."""
    run = tmp_path / "old_run"
    run.mkdir()
    shutil.copy(ROOT / "tests" / "data" / "results_v1" / "results.json", run / "results.json")
    loaded = load_run(run)
    raw = json.loads((run / "results.json").read_text())
    assert raw["schema_version"] == 1 and "selection" not in raw["results"][0]
    for res in loaded.results["results"]:
        chosen = res["search"][res["selection"]["index"]]
        assert all(res["params"][k] == v for k, v in chosen["params"].items())
        assert res["selection"]["score"] == chosen["mean"] and res["cost"] is None
    assert loaded.results["skipped"] == []
    html = render_report([loaded])
    doc = _parse_strict(html)
    assert len(doc.findall(".//table[@id='board']/tbody/tr")) == len(raw["results"]) == 4
    assert _check_numbers(doc, [raw]) > 50  # every number still points into the file as written
    from pipeline.results import select_head

    assert select_head(run, "knn").key == "mobilenet_v2-a1.0-224__knn"
    assert select_head(run).key == raw["best"]["key"]


def test_report_and_predict_read_results_json_once_through_one_loader(binary_run: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.report as report_mod
    import pipeline.results as results_mod

    reads: list[Path] = []
    real = results_mod.load_run

    def counting(run_dir):
        reads.append(Path(run_dir))
        return real(run_dir)

    monkeypatch.setattr(report_mod, "load_run", counting)
    monkeypatch.setattr(results_mod, "load_run", counting)
    write_report([binary_run], tmp_path / "once.html")
    assert reads == [binary_run]
    reads.clear()
    results_mod.select_head(binary_run, "logreg")  # what predict and export pick a head with
    assert reads == [binary_run]
    assert report_mod.load_run is results_mod.load_run is counting  # the same function serves both
    opened: list[str] = []
    real_read = Path.read_text

    def read_text(self, *a, **kw):
        opened.append(self.name)
        return real_read(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", read_text)
    write_report([binary_run], tmp_path / "twice.html")
    assert opened.count("results.json") == 1


def test_escaping_of_hostile_names(tmp_path: Path) -> None:
    run = make_run(tmp_path, "hostile", classes=('<script>alert("x")</script>', "b&b"), heads=("logreg", "knn"))
    data = json.loads((run / "results.json").read_text())
    data["results"][0]["head"] = "<img src=x onerror=alert(1)>"
    (run / "results.json").write_text(json.dumps(data))
    html = render_report([load_run(run)])
    _parse_strict(html)
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html or "&lt;script&gt;alert(&quot;x&quot;)" in html


def test_run_errors_are_one_actionable_line(tmp_path: Path, binary_run: Path) -> None:
    with pytest.raises(RunError, match="does not exist"):
        write_report([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="results.json is missing"):
        load_run(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(RunError, match="cannot be read as JSON"):
        load_run(bad)
    data = json.loads((binary_run / "results.json").read_text())
    (bad / "results.json").write_text(json.dumps(dict(data, schema_version=4)))
    with pytest.raises(RunError, match="schema_version 4, this headbench reads 1, 2, 3"):
        load_run(bad)
    no_selection = dict(data, results=[{k: v for k, v in r.items() if k != "selection"} for r in data["results"]])
    (bad / "results.json").write_text(json.dumps(no_selection))
    with pytest.raises(RunError, match="lacks its selection"):
        load_run(bad)
    (bad / "results.json").write_text(json.dumps({k: v for k, v in data.items() if k != "caches"}))
    with pytest.raises(RunError, match="lacks caches"):
        load_run(bad)
    (bad / "results.json").write_text(json.dumps(dict(data, results=[])))
    with pytest.raises(RunError, match="no fitted head"):
        load_run(bad)
    with pytest.raises(RunError, match="no run folder"):
        write_report([])
    with pytest.raises(RunError) as missing:
        load_run(tmp_path / "nope")
    assert "\n" not in str(missing.value)
    assert load_run(binary_run / "results.json").path == binary_run


def test_cli_report_command(binary_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "cli.html"
    proc = subprocess.run([str(Path(os.sys.executable)), "cli.py", "report", str(binary_run), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(str(out))
    assert out.is_file()
    proc = subprocess.run([str(Path(os.sys.executable)), "cli.py", "report", str(tmp_path / "nope")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: run folder") and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_real_fit_run_on_hymenoptera(hymenoptera_v2_cache: Path, tmp_path: Path) -> None:
    """The fit stage's own run folder (real MobileNetV2 features, every head) renders and checks out."""
    from pipeline.fit import FitConfig, run_fit

    run = run_fit(FitConfig(caches=[hymenoptera_v2_cache], out=tmp_path / "hymenoptera_run", seed=0))
    out = write_report([run.run_dir], tmp_path / "hymenoptera.html")
    html = out.read_text(encoding="utf-8")
    doc = _parse_strict(html)
    results = json.loads((run.run_dir / "results.json").read_text())
    assert len(doc.findall(".//table[@id='board']/tbody/tr")) == len(results["results"]) >= 5
    assert _check_numbers(doc, [results]) > 100
    for c in _best_containers(doc):
        assert not re.search(r"\d\.\d\d", _untagged_text(c))
    best = next(r for r in results["results"] if r["key"] == results["best"]["key"])
    # schema 3 on the page: the pick's interval, rule and reason; intervals in the leaderboard; tie marks
    pick_box = _text(doc.find(".//div[@class='pick']"))
    b = results["best"]
    assert f"95% interval [{b['interval'][0]:.3f}, {b['interval'][1]:.3f}]" in pick_box
    assert f"pick rule {b['rule']}" in pick_box and b["reason"] in pick_box
    assert f"rests on {b['n']} images" in pick_box and "no paired test on them can call a difference" in pick_box
    board = doc.find(".//table[@id='board']")
    assert "vs pick" in _text(board.find(".//thead"))
    rows = board.findall("./tbody/tr")
    for res in results["results"]:
        row = next(r for r in rows if r.get("data-key") == res["key"])
        lo, hi = res["metrics"]["val"]["intervals"]["accuracy"]
        assert f"[{lo:.3f}, {hi:.3f}]" in _text(row)
        vs = res.get("vs_pick")
        assert ("= tied" in _text(row)) == bool(vs and vs["tied"])
    ties = [r["key"] for r in results["results"] if r.get("vs_pick", {}).get("tied")]
    assert sorted(ties) == sorted(b["tied_with"])
    if ties:
        assert "Tied with it on the same val images" in pick_box
    mistakes_section = html[html.index('<section id="mistakes">'):]
    mistakes_section = mistakes_section[:mistakes_section.index("</section>")]
    assert mistakes_section.count("<img ") == len(best["mistakes"]) > 0  # real photos, all still on disk
    audit_section = html[html.index('<section id="audit">'):]
    audit_section = audit_section[:audit_section.index("</section>")]
    shown = (min(8, results["audit"]["label_issues"]["count"]) + min(8, results["audit"]["outliers"]["count"])
             + 2 * min(8, sum(results["audit"]["duplicates"]["clusters"].values())))
    assert audit_section.count("<img ") == shown and html.count("<img ") == len(best["mistakes"]) + shown
    assert html.count('aria-label="Training and validation curves"') == 1  # the dense head
    assert not URL_RE.search(html) and "http://" not in html and "https://" not in html
    assert len(html.encode()) < 1_000_000
    if CHROMIUM is not None:
        facts = render_in_chromium(out, ARTIFACTS / "report_hymenoptera.png")
        assert facts["problems"] == {"console": [], "exceptions": [], "log": [], "requests": []}
        assert facts["rows"] == len(results["results"]) and facts["broken"] == []


# ---- headless Chromium over the DevTools protocol (pipe transport, no extra package) ----------------------------


class Chromium:
    """Minimal DevTools-protocol client over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-framed JSON)."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
             "--remote-debugging-pipe")

    def __init__(self, binary: str, width: int = 1280, height: int = 900) -> None:
        self.profile = tempfile.mkdtemp(prefix="headbench-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def child_fds() -> None:  # runs in the child before exec: the pipe ends become fds 3 and 4
            a, b = os.dup(cmd_r), os.dup(out_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [binary, *self.FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            close_fds=False, preexec_fn=child_fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self._id, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, pred: Any, timeout: float = 30) -> dict:
        end = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                msg = json.loads(raw)
                if pred(msg):
                    return msg
                self.events.append(msg)
            ready, _, _ = select.select([self._out_r], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe")
            self._buf += chunk

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.send(f"{domain}.enable")
        self.send("Page.navigate", {"url": url})
        if not any(e.get("method") == "Page.loadEventFired" for e in self.events):  # it may beat the reply
            self.wait(lambda m: m.get("method") == "Page.loadEventFired", 60)

    def evaluate(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(res["exceptionDetails"])
        return res["result"].get("value")

    def screenshot(self, path: Path, full_page: bool = True, max_height: int | None = None) -> None:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            height = min(size["height"], max_height or size["height"])
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": height, "scale": 1})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", params, timeout=60)["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._cmd_w)
        os.close(self._out_r)
        shutil.rmtree(self.profile, ignore_errors=True)

    def problems(self) -> dict[str, list]:
        """Console errors, uncaught exceptions, error log entries and requests to anything but file:/data:."""
        out: dict[str, list] = {"console": [], "exceptions": [], "log": [], "requests": []}
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                out["console"].append(p.get("args"))
            elif method == "Runtime.exceptionThrown":
                out["exceptions"].append(p.get("exceptionDetails"))
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                out["log"].append(p["entry"].get("text"))
            elif method == "Network.requestWillBeSent":
                url = p.get("request", {}).get("url", "")
                if not url.startswith(("file:", "data:", "about:")):
                    out["requests"].append(url)
        return out


def render_in_chromium(html_file: Path, screenshot: Path, width: int = 1280, height: int = 900,
                       full_page: bool = True, max_height: int | None = None) -> dict[str, Any]:
    """Open a report in headless Chromium; return what the checks need and save a screenshot."""
    assert CHROMIUM is not None
    browser = Chromium(CHROMIUM, width, height)
    try:
        browser.open(html_file.resolve().as_uri())
        facts = browser.evaluate("""(() => {
            const imgs = Array.from(document.images);
            return {rows: document.querySelectorAll('#board tbody tr').length,
                    best: Array.from(document.querySelectorAll('#board tbody tr[data-best]')).map(r => r.dataset.key),
                    images: imgs.length, broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
                    svgs: document.querySelectorAll('svg').length,
                    title: document.title};
        })()""")
        facts.update(browser.evaluate("""(() => {
            const txt = s => Array.from(document.querySelectorAll(s)).map(e => e.textContent);
            return {intervals: txt('#board tbody td small.ci').length, ties: txt('#board tbody .tie').length,
                    pick_text: (document.querySelector('.pick') || {textContent: ''}).textContent};
        })()"""))
        browser.screenshot(screenshot, full_page, max_height)
        # sorting works: click "Fit" header, fit seconds come out ascending
        facts["sorted_fit"] = browser.evaluate("""(() => {
            const ths = Array.from(document.querySelectorAll('#board thead th'));
            const i = ths.findIndex(t => t.textContent.startsWith('Fit'));
            ths[i].click();
            return Array.from(document.querySelectorAll('#board tbody tr')).map(r => parseFloat(r.cells[i].dataset.v));
        })()""")
        facts["problems"] = browser.problems()
        return facts
    finally:
        browser.close()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (tests/setup_browser.sh installs Debian's)")
def test_report_in_headless_chromium(tmp_path: Path) -> None:
    multiclass_run = make_run(tmp_path, "flowers_20250102-090000",
                              classes=("daisy", "dandelion", "rose", "sunflower", "tulip"),
                              backbones=("mobilenet_v2-a1.0-224", "mobilenet-a1.0-224"), final_splits=("val", "test"),
                              selection="val", heads=("logreg", "linear_svm", "knn", "random_forest", "dense"),
                              n_mistakes=12, dataset_name="flowers5", schema=3)
    out = write_report([multiclass_run], tmp_path / "browser.html")
    results = json.loads((multiclass_run / "results.json").read_text())
    html = out.read_text(encoding="utf-8")
    assert not URL_RE.search(html)
    facts = render_in_chromium(out, ARTIFACTS / "report_synthetic.png")
    assert facts["problems"] == {"console": [], "exceptions": [], "log": [], "requests": []}
    assert facts["rows"] == len(results["results"])
    assert facts["best"] == [results["best"]["key"]]
    assert facts["images"] == 11 and facts["broken"] == []
    assert facts["svgs"] >= 3
    assert facts["sorted_fit"] == sorted(facts["sorted_fit"])
    assert (ARTIFACTS / "report_synthetic.png").stat().st_size > 10_000
    # schema 3 as a reader sees it: intervals in the leaderboard, tie marks, the pick box's reason and ties
    # per row: accuracy and macro-F1 on test, accuracy on val are leaderboard columns with recorded intervals
    assert facts["intervals"] == 3 * len(results["results"])
    assert facts["ties"] == len(results["best"]["tied_with"]) > 0
    assert results["best"]["reason"] in facts["pick_text"] and "pick rule one_se" in facts["pick_text"]
    assert "Tied with it on the same test images" in facts["pick_text"]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (tests/setup_browser.sh installs Debian's)")
def test_compare_page_in_headless_chromium(tmp_path: Path) -> None:
    from test_compare import CLASSES as CMP_CLASSES, make_run as make_cmp_run

    from pipeline.compare import compare_runs, write_compare

    imgs = [(f"{CMP_CLASSES[i % 2]}/{i}.jpg", f"{i:064x}", CMP_CLASSES[i % 2]) for i in range(60)]
    truth = [t for *_, t in imgs]
    wrong = ["bee" if t == "ant" else "ant" for t in truth]
    a = make_cmp_run(tmp_path / "a", imgs, {"bb__logreg": truth, "bb__knn": wrong[:30] + truth[30:]},
                     best="bb__logreg")
    b = make_cmp_run(tmp_path / "b", imgs, {"bb__logreg": truth, "bb__knn": truth}, best="bb__knn")
    page, _ = write_compare(compare_runs([a, b]), tmp_path / "cmp.html")
    browser = Chromium(CHROMIUM, 1100, 700)
    try:
        browser.open(page.resolve().as_uri())
        facts = browser.evaluate("""(() => ({rows: Array.from(document.querySelectorAll('.compare-table tbody tr'))
                                              .map(r => [r.dataset.key, r.cells[7].textContent.trim()])}))()""")
        browser.screenshot(ARTIFACTS / "compare_synthetic.png", True, None)
        problems = browser.problems()
    finally:
        browser.close()
    assert problems == {"console": [], "exceptions": [], "log": [], "requests": []}
    assert dict(facts["rows"]) == {"bb__logreg": "= tied", "bb__knn": "other better", "picks": "= tied"}

if __name__ == "__main__":  # screenshot of a real report for the docs: python tests/test_report.py REPORT.html OUT.png
    import sys

    if len(sys.argv) not in (3, 4) or CHROMIUM is None:
        sys.exit("usage: python tests/test_report.py REPORT.html OUT.png [MAX_HEIGHT_PX]  (needs chromium)")
    found = render_in_chromium(Path(sys.argv[1]), Path(sys.argv[2]),
                               max_height=int(sys.argv[3]) if len(sys.argv) == 4 else None)
    print(json.dumps({k: v for k, v in found.items() if k != "sorted_fit"}, indent=1))
