"""compare: runs side by side on the images they share, matched by path and content digest (synthetic run folders)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.compare import compare_runs, match_images, write_compare
from pipeline.errors import RunError

CLASSES = ["ant", "bee"]


def make_run(folder: Path, images: list[tuple[str, str, str]], preds: dict[str, list[str]], best: str,
             classes: list[str] = CLASSES, split: str = "test") -> Path:
    """A minimal schema-3 run folder: ``images`` = (path, digest, true class); ``preds`` = key -> predicted classes."""
    folder.mkdir(parents=True)
    (folder / "predictions").mkdir()
    with open(folder / "splits.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "class", "sha256"])
        for p, d, t in images:
            w.writerow([p, split, t, d])
    results = []
    for key, pred in preds.items():
        with open(folder / "predictions" / f"{key}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "split", "true", "pred"] + [f"p_{c}" for c in classes])
            for (p, _, t), q in zip(images, pred):
                w.writerow([p, split, t, q] + ["0.5"] * len(classes))
        acc = float(np.mean([t == q for (_, _, t), q in zip(images, pred)]))
        results.append({"key": key, "cache_index": 0, "head": key.split("__")[1], "backbone_label": "bb",
                        "metrics": {split: {"n": len(images), "accuracy": acc}},
                        "selection": {"index": 0, "score": acc, "se": 0.01},
                        "predictions_file": f"predictions/{key}.csv", "model_file": f"heads/{key}.joblib"})
        (folder / "heads").mkdir(exist_ok=True)
        (folder / "heads" / f"{key}.joblib").write_bytes(b"stand-in head")  # report checks the pick's file
    doc = {"schema_version": 3, "dataset": {"name": "toy", "class_names": classes},
           "protocol": {"selection": "cv", "final_splits": [split]}, "caches": [{"backbone": "bb"}],
           "results": results, "skipped": [], "best": {"key": best, "split": split, "value": 0.0}}
    (folder / "results.json").write_text(json.dumps(doc))
    return folder


def _images(n: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    return [(f"{CLASSES[i % 2]}/img{i}.jpg", f"{i:064x}", CLASSES[i % 2]) for i in range(n)]


def _flip(truth: list[str], wrong: np.ndarray) -> list[str]:
    return [("bee" if t == "ant" else "ant") if w else t for t, w in zip(truth, wrong)]


def test_match_by_path_and_digest_and_by_digest_when_moved():
    a = {"x/1.jpg": "d1", "x/2.jpg": "d2", "x/3.jpg": "d3", "x/4.jpg": "d4", "dup/a.jpg": "dd", "dup/b.jpg": "dd"}
    b = {"x/1.jpg": "d1", "y/two.jpg": "d2", "x/3.jpg": "CHANGED", "z/4.jpg": "d4", "dup/c.jpg": "dd"}
    pairs = match_images(a, b)
    # same path, same content; moved files by their digest; a changed file is another image; a digest that names
    # two images on one side cannot say which one moved
    assert pairs == [("x/1.jpg", "x/1.jpg"), ("x/2.jpg", "y/two.jpg"), ("x/4.jpg", "z/4.jpg")]


def test_compare_pairs_by_content_not_by_file_order(tmp_path):
    rng = np.random.default_rng(0)
    imgs = _images(120, rng)
    truth = [t for _, _, t in imgs]
    good = _flip(truth, rng.random(120) < 0.05)
    poor = _flip(truth, rng.random(120) < 0.30)
    a = make_run(tmp_path / "a", imgs, {"bb__logreg": good, "bb__knn": poor}, best="bb__logreg")
    # run b: the same images renamed and in reverse order, with the same logreg answers and a better knn
    order = list(range(120))[::-1]
    moved = [(f"renamed/{i}.jpg", imgs[i][1], imgs[i][2]) for i in order]
    knn_b = _flip(truth, rng.random(120) < 0.05)
    b = make_run(tmp_path / "b", moved, {"bb__logreg": [good[i] for i in order], "bb__knn": [knn_b[i] for i in order]},
                 best="bb__knn")
    doc = compare_runs([a, b])
    pair = doc["pairs"][0]
    assert pair["shared_images"] == 120 and pair["matched_by_digest_only"] == 120 and pair["matched_by_path"] == 0
    rows = {r["key"]: r for r in pair["rows"]}
    assert set(rows) == {"bb__logreg", "bb__knn", "picks"}
    same = rows["bb__logreg"]
    assert same["delta"] == 0 and same["tied"] and same["p_value"] == 1.0  # identical answers, image by image
    knn = rows["bb__knn"]
    assert knn["delta"] > 0.15 and not knn["tied"] and knn["p_holm"] >= knn["p_value"]
    assert knn["other_only_right"] > knn["base_only_right"]
    assert rows["picks"]["base_key"] == "bb__logreg" and rows["picks"]["other_key"] == "bb__knn"
    page, js = write_compare(doc, tmp_path / "out" / "cmp.html")
    assert json.loads(js.read_text()) == doc
    html = page.read_text()
    assert "= tied" in html and "120</b> shared images" in html and "matched by digest alone" in html
    assert "http://" not in html and "https://" not in html


def test_compare_refuses_disjoint_runs_and_other_classes(tmp_path):
    rng = np.random.default_rng(1)
    imgs = _images(20, rng)
    a = make_run(tmp_path / "a", imgs, {"bb__logreg": [t for *_, t in imgs]}, best="bb__logreg")
    other = [(f"o/{i}.jpg", f"{i + 1000:064x}", t) for i, (_, _, t) in enumerate(imgs)]
    b = make_run(tmp_path / "b", other, {"bb__logreg": [t for *_, t in other]}, best="bb__logreg")
    with pytest.raises(RunError, match="share no scored image") as e:
        compare_runs([a, b])
    assert "\n" not in str(e.value)
    c = make_run(tmp_path / "c", [(p, d, "wasp" if t == "bee" else t) for p, d, t in imgs],
                 {"bb__logreg": ["ant"] * 20}, best="bb__logreg", classes=["ant", "wasp"])
    with pytest.raises(RunError, match="different classes"):
        compare_runs([a, c])
    with pytest.raises(RunError, match="at least two"):
        compare_runs([a])


def test_cli_compare_and_report_link(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cli

    rng = np.random.default_rng(2)
    imgs = _images(40, rng)
    truth = [t for *_, t in imgs]
    a = make_run(tmp_path / "a", imgs, {"bb__logreg": truth}, best="bb__logreg")
    b = make_run(tmp_path / "b", imgs[:30], {"bb__logreg": _flip(truth[:30], np.arange(30) < 3)}, best="bb__logreg")
    res = CliRunner().invoke(cli.app, ["compare", str(a), str(b), "--out", str(tmp_path / "c.html")])
    assert res.exit_code == 0, res.output
    assert "b vs a: 30 shared images" in res.output and (tmp_path / "c.json").is_file()
    res = CliRunner().invoke(cli.app, ["compare", str(a)])
    assert res.exit_code == 2
    # report with several runs writes the compare page beside it and links to it
    res = CliRunner().invoke(cli.app, ["report", str(a), str(b), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert (tmp_path / "r.compare.html").is_file() and (tmp_path / "r.compare.json").is_file()
    assert 'href="r.compare.html"' in (tmp_path / "r.html").read_text()
