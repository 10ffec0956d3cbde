"""A run folder's files are bound to its results.json: every head file's SHA-256 is recorded and checked when it is
loaded, an unknown ``best.key`` is an error, a damaged or misshapen head is one line, changing a run takes its lock
and reads results.json afresh, and ``report`` never recommends a head that cannot be used.

Tiny generated images and a small random-weight MobileNetV2 (alpha 0.35, 32 px): mechanics only.
"""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from conftest import run_extract, write_blobs
from pipeline.errors import RunError

SIZE = 32
ALPHA = 0.35


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A two-class set, extracted and fitted with logreg (the pick, by the seed) and the dense head."""
    from pipeline.fit import FitConfig, run_fit

    base = tmp_path_factory.mktemp("record")
    root = base / "blobs"
    write_blobs(root)
    res = run_extract(root, base / "cache", backbone="mobilenet_v2", weights="none", input_size=SIZE, alpha=ALPHA,
                      runtime="keras")
    run = base / "run"
    run_fit(FitConfig(caches=[res.path], heads=["logreg", "dense"], out=run, audit=False), log=lambda m: None)
    return run, root


def _copy(fitted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted[0], run)
    return run, json.loads((run / "results.json").read_text())


def _entry(doc, head):
    return next(r for r in doc["results"] if r["head"] == head)


def test_every_head_file_is_recorded_by_its_sha256(fitted):
    from pipeline.results import file_sha256, load_run

    run = load_run(fitted[0])
    for r in run.results["results"]:
        assert r["model_sha256"] == file_sha256(run.path / r["model_file"])


def test_a_head_file_from_another_run_is_refused_before_any_model_is_built(fitted, tmp_path):
    """Same shape, same classes, another file: predict would have used it silently."""
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.predict import predict_images

    run, doc = _copy(fitted, tmp_path)
    logreg = _entry(doc, "logreg")
    n_features = doc["caches"][0]["feature_shape"][0]
    x = np.random.default_rng(0).normal(size=(8, n_features))
    other = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression())]).fit(x, ["blue", "red"] * 4)
    joblib.dump(other, run / logreg["model_file"])
    built: list[str] = []
    with pytest.raises(RunError, match="is not the file results.json records for") as info:
        predict_images(run, [fitted[1]], head=logreg["key"], log=built.append)
    assert "\n" not in str(info.value) and not built, "refused before the backbone is built"


def test_a_best_key_naming_no_result_is_an_error(fitted, tmp_path):
    from pipeline.results import select_head

    run, doc = _copy(fitted, tmp_path)
    doc["best"]["key"] = "resnet50-224__logreg"
    (run / "results.json").write_text(json.dumps(doc))
    with pytest.raises(RunError, match="best names 'resnet50-224__logreg', which is none of its results"):
        select_head(run)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other_shape", "missing"])
def test_damaged_or_misshapen_heads_are_one_line_in_predict_export_and_finetune(fitted, tmp_path, damage):
    """Runs written before the digests were recorded (no ``model_sha256``) still get one line for a bad file."""
    from pipeline.finetune import FinetuneConfig, finetune_run
    from pipeline.predict import export_model, predict_images

    run, doc = _copy(fitted, tmp_path)
    for r in doc["results"]:
        r.pop("model_sha256")
    (run / "results.json").write_text(json.dumps(doc))
    dense, logreg = _entry(doc, "dense"), _entry(doc, "logreg")
    for r in (dense, logreg):
        path = run / r["model_file"]
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        elif damage == "garbage":
            path.write_bytes(b"not a model at all" * 50)
        elif damage == "missing":
            path.unlink()
    if damage == "other_shape":  # another run's heads: 7 features, 3 classes
        import joblib
        import keras
        from sklearn.linear_model import LogisticRegression

        joblib.dump(LogisticRegression().fit(np.eye(7)[:6], [0, 1, 2] * 2), run / logreg["model_file"])
        inp = keras.Input((7,))
        keras.Model(inp, keras.layers.Dense(3, activation="softmax")(inp)).save(run / dense["model_file"])
    expect = {"truncated": "is damaged and cannot be loaded", "garbage": "is damaged and cannot be loaded",
              "other_shape": "it is another run's head", "missing": "is missing from the run folder"}[damage]
    calls = [lambda: predict_images(run, [fitted[1]], head=logreg["key"], log=lambda m: None),
             lambda: predict_images(run, [fitted[1]], head=dense["key"], log=lambda m: None),
             lambda: export_model(run, tmp_path / "m.keras", head="dense"),
             lambda: finetune_run(run, head="logreg", config=FinetuneConfig(epochs=1, progress=False),
                                  log=lambda m: None)]
    for call in calls:
        with pytest.raises(RunError, match=expect) as info:
            call()
        assert "\n" not in str(info.value)
    assert not (tmp_path / "m.keras").exists()


def test_report_says_the_pick_cannot_be_used_when_its_file_is_gone(fitted, tmp_path):
    import cli

    run, doc = _copy(fitted, tmp_path)
    best = next(r for r in doc["results"] if r["key"] == doc["best"]["key"])
    html = tmp_path / "r.html"
    with pytest.raises(SystemExit) as info:
        cli.main(["report", str(run), "--out", str(html)], quiet_native=False)
    assert info.value.code == 0
    assert "cannot be used as recorded" not in html.read_text()
    (run / best["model_file"]).unlink()
    with pytest.raises(SystemExit) as info:
        cli.main(["report", str(run), "--out", str(html)], quiet_native=False)
    assert info.value.code == 1
    page = html.read_text()
    assert "This head cannot be used as recorded" in page and best["model_file"] in page


def test_a_second_writer_waits_for_the_lock_and_keeps_the_firsts_entry(fitted, tmp_path):
    """Two commands changing one run (two `finetune`s): the second commits after the first, from results.json as
    the first left it, so both entries land. Driven by the lock itself, not by timing."""
    from pipeline.results import commit_result, load_run, put_result, run_lock, staged_name

    run, doc = _copy(fitted, tmp_path)
    template = _entry(doc, "logreg")
    staged = staged_name(run / "heads", "b__finetune", ".keras")
    staged.write_bytes(b"model b")
    entry_b = dict(template, key="b__finetune", head="finetune", model_file="heads/b__finetune.1.keras",
                   model_sha256=None, predictions_file=template["predictions_file"])
    waiting, done = threading.Event(), []
    with run_lock(run):  # the first writer holds the run
        worker = threading.Thread(target=lambda: done.append(
            commit_result(run, entry_b, {"model_file": staged}, say=lambda m: waiting.set())))
        worker.start()
        assert waiting.wait(30), "the second writer waits for the lock"
        assert not done
        put_result(load_run(run), dict(template, key="a__finetune", head="finetune"))  # the first one's entry
    worker.join(30)
    keys = [r["key"] for r in json.loads((run / "results.json").read_text())["results"]]
    assert "a__finetune" in keys and "b__finetune" in keys
    assert (run / "heads" / "b__finetune.1.keras").read_bytes() == b"model b" and not staged.exists()


def test_a_commit_removes_what_killed_writers_left_and_only_that(fitted, tmp_path):
    import subprocess
    import sys

    from pipeline.results import commit_result

    run, doc = _copy(fitted, tmp_path)
    template = _entry(doc, "logreg")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = run / "heads" / f".k__finetune.{dead.pid}.partial.keras"
    orphan = run / "heads" / "k__finetune.0123456789ab.keras"  # a commit killed before its results.json
    for p in (stale, orphan):
        p.write_bytes(b"left")
    new = run / "heads" / "k__finetune.new.keras"
    tmp = run / "heads" / "tmp.keras"
    tmp.write_bytes(b"new")
    commit_result(run, dict(template, key="k__finetune", head="finetune", model_file="heads/k__finetune.new.keras"),
                  {"model_file": tmp})
    assert not stale.exists() and not orphan.exists() and new.read_bytes() == b"new"
    for r in doc["results"]:
        assert (run / r["model_file"]).is_file(), "fit's own files are never touched"


def test_predict_prints_one_record_per_line_whatever_the_file_name(fitted, tmp_path, capsys):
    import cli

    src = sorted(fitted[1].rglob("*.jpg"))[0]
    odd = tmp_path / "imgs" / "tab\there\nnew\\line.jpg"
    odd.parent.mkdir()
    shutil.copy(src, odd)
    shutil.copy(src, odd.with_name("plain.jpg"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(["predict", str(fitted[0]), str(odd.parent), "--runtime", "keras"], quiet_native=False)
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(len(ln.split("\t")) == 3 for ln in lines)
    assert any(ln.startswith(str(odd.parent / "tab\\there\\nnew\\\\line.jpg")) for ln in lines)


def test_predict_and_export_refuse_a_disk_without_room_before_any_work(fitted, small_tmpfs, capsys):
    import cli

    run, root = fitted
    (small_tmpfs / "filler").write_bytes(b"\0" * (256 * 1024 - 8192))  # a disk with 8 kB left
    for args in (["predict", str(run), str(root), "--out", str(small_tmpfs / "p.csv")],
                 ["export", str(run), "--out", str(small_tmpfs / "m.keras")]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(args, quiet_native=False)
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.count("\n") == 1, err
        assert err.startswith("error: not enough free space for the ") and "nothing was done" in err
        assert "runtime" not in err  # refused before the backbone was built
    assert [p.name for p in small_tmpfs.iterdir()] == ["filler"]


def test_a_full_disk_during_finetune_is_one_line_and_leaves_the_run_as_it_was(fitted, tmpfs):
    from pipeline.finetune import FinetuneConfig, finetune_run
    from pipeline.results import file_sha256

    disk = tmpfs("8m")
    run = disk / "run"
    shutil.copytree(fitted[0], run)
    before = {p.relative_to(run): file_sha256(p) for p in run.rglob("*") if p.is_file()}
    used = sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())
    (disk / "filler").write_bytes(b"\0" * (8 * 2**20 - used - 400_000))  # ~300 kB left: less than the model
    config = FinetuneConfig(unfreeze=4, epochs=1, learning_rate=1e-3, batch_size=8, workers=1, progress=False,
                            run_eagerly=True)
    with pytest.raises(RunError) as err:
        finetune_run(run, config=config, log=lambda m: None, command="test")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"cannot write the fine-tuned model into {run}")
    assert "the run is as it was" in msg
    after = {p.relative_to(run): file_sha256(p) for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # results.json, heads and predictions untouched; no staged file left


def test_a_run_heads_weights_file_is_hashed_once_for_the_model_it_rebuilds(tmp_path, monkeypatch):
    """What predict, export and finetune rebuild a head's backbone from (run_model_config): the recorded weights
    file checked against its SHA-256 once, then the model resolved from that check without reading the file again."""
    import pipeline.backbones as backbones
    import pipeline.results as results
    from pipeline.backbones import WeightsInfo
    from pipeline.errors import WeightsError
    from pipeline.results import RunHead, resolve_run_weights, run_model_config

    weights = tmp_path / "mine.weights.h5"
    weights.write_bytes(b"not really weights, but bytes with a digest")
    digest = backbones.sha256_file(weights)
    hashed: list[str] = []
    real = backbones.sha256_file

    def counting(path):
        hashed.append(str(path))
        return real(path)

    monkeypatch.setattr(backbones, "sha256_file", counting)  # both names the project hashes a weights file by
    monkeypatch.setattr(results, "sha256_file", counting)
    ex = {"backbone": "mobilenet_v2", "input_size": 96, "alpha": 0.35, "resize": "crop", "weights_source": "file",
          "weights_path": str(weights), "weights_sha256": digest}
    rh = RunHead(tmp_path, {"key": "k", "head": "logreg"}, {"feature": "max"}, ex, ["a", "b"])
    model = run_model_config(rh, announce=lambda m: None)
    assert model.weights == WeightsInfo("file", str(weights.resolve()), digest) and model.kinds == ("avg", "max")
    assert len(hashed) == 1
    resolved = resolve_run_weights(rh)  # a command that checks first and builds later (finetune)
    weights.unlink()
    hashed.clear()
    later = run_model_config(rh, kinds=("avg",), announce=lambda m: None, resolved=resolved)
    assert later.weights is resolved and later.kinds == ("avg",) and hashed == []
    with pytest.raises(WeightsError, match="is not there"):
        run_model_config(rh)
    (tmp_path / "other.weights.h5").write_bytes(b"other bytes")
    with pytest.raises(WeightsError, match="SHA-256 .* but k was fitted on features"):
        resolve_run_weights(rh, str(tmp_path / "other.weights.h5"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"is not a \.weights\.h5, \.h5 or \.keras file"):
        resolve_run_weights(rh, str(tmp_path / "w.bin"))
