"""The command-line face: expected failures are one line on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from pipeline import cache
from pipeline.backbones import get_spec, keras_models_dir, resolve_weights
from pipeline.errors import WeightsError


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env=(os.environ | env) if env else None)


def _one_error_line(proc: subprocess.CompletedProcess, status: int = 1) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_backbones_lists_the_registry():
    proc = _cli("backbones")
    assert proc.returncode == 0
    for name in ("mobilenet ", "mobilenet_v2", "inception_v3", "efficientnet_b0", "resnet50"):
        assert name in proc.stdout
    assert "8x8x2048" in proc.stdout  # InceptionV3 at 299
    from pipeline.backbones import get_spec, list_backbones

    rows = [ln for ln in proc.stdout.splitlines() if ln and not ln.startswith((" ", "cost:"))]
    assert [r.split()[0] for r in rows] == list_backbones()  # the registry, in its order
    for row in rows:
        spec = get_spec(row.split()[0])
        assert spec.cost and f"cost {spec.cost} " in row and f"{spec.map_side}x{spec.map_side}x{spec.feature_dim}" in row
    assert "ConvNeXt-Tiny" in proc.stdout and "cost x52 " in proc.stdout  # convnext_base, from bench/backbones.py


@pytest.mark.parametrize("setup, args, expect", [
    (None, ["extract", "/nonexistent/folder"], "does not exist"),
    ("empty", ["extract", "{tmp}"], "no class folders"),
    ("one_class", ["extract", "{tmp}"], "only one class"),
    ("tiny", ["extract", "{tmp}", "--weights", "{tmp}/missing.h5"], "does not exist"),
    (None, ["fit", "--cache-dir", "/nonexistent/cache"], "no complete feature caches"),
    (None, ["report", "/nonexistent/run"], "does not exist"),
    (None, ["predict", "/nonexistent/run", "x.jpg"], "not a run folder"),
])
def test_expected_failures_are_one_line(tmp_path, tiny_dataset, setup, args, expect):
    root = {"empty": tmp_path / "empty", "one_class": tmp_path / "one", "tiny": tiny_dataset}.get(setup, tmp_path)
    if setup == "empty":
        root.mkdir()
    if setup == "one_class":
        (root / "cats").mkdir(parents=True)
        (tiny_dataset / "red" / "img_00.jpg").rename(root / "cats" / "a.jpg")
    line = _one_error_line(_cli(*[a.format(tmp=root) for a in args]))
    assert expect in line


@pytest.mark.parametrize("args, expect", [
    (["extract", "{tmp}", "--backbone", "vgg99"], "'vgg99' is not one of 'mobilenet', 'mobilenet_v2'"),
    (["extract", "{tmp}", "--workers", "-1"], "'--workers': Input should be greater than or equal to 1"),
    (["extract", "{tmp}", "--batch-size", "0"], "'--batch-size'"),
    (["extract", "{tmp}", "--resize", "zoom"], "'zoom' is not one of 'crop', 'squash', 'pad'"),
    (["fit", "--head", "forest"], "'forest' is not one of 'dense'"),
    (["fit", "--features", "mean"], "'mean' is not one of 'avg', 'max', 'maps'"),
])
def test_bad_option_values_are_usage_errors_before_any_work(tiny_dataset, args, expect):
    """Option values are checked by the CLI's types and choices: one line, exit status 2, nothing built."""
    proc = _cli(*[a.format(tmp=tiny_dataset) for a in args])
    line = _one_error_line(proc, status=2)
    assert expect in line and "see --help" in line
    assert "device:" not in proc.stdout  # no model was built


def test_imagenet_unavailable_says_how_to_fix(monkeypatch, tmp_path):
    import keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))

    def offline(*a, **k):
        raise Exception("URL fetch failure on https://example.invalid: None -- [Errno -3] name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    announced: list[str] = []
    with pytest.raises(WeightsError) as err:
        resolve_weights(get_spec("mobilenet_v2"), "imagenet", 224, 1.0, announce=announced.append)
    msg = str(err.value)
    assert "\n" not in msg and "--weights PATH" in msg and str(tmp_path / "kh" / "models") in msg
    assert any(line.startswith("downloading ImageNet weights") for line in announced)  # never a hidden download


def test_imagenet_found_in_keras_cache_is_used_without_download(monkeypatch, tmp_path):
    import keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    spec = get_spec("inception_v3")
    fname = spec.imagenet_file(1.0, 299)[0]
    (keras_models_dir() / fname).parent.mkdir(parents=True)
    (keras_models_dir() / fname).write_bytes(b"pretend weights")
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: pytest.fail("must not download"))
    info = resolve_weights(spec, "imagenet", 299, None, announce=lambda m: pytest.fail("nothing to announce"))
    assert info.source == "imagenet" and Path(info.path).name == fname and len(info.sha256) == 64


def test_extract_several_backbones_in_one_command_then_up_to_date(tiny_dataset, tmp_path):
    args = ["extract", str(tiny_dataset), "-b", "mobilenet_v2", "-b", "mobilenet_v3_small", "--weights", "none",
            "--input-size", "64", "--cache-dir", str(tmp_path / "c"), "--quiet", "--runtime", "keras"]
    first = _cli(*args)  # the Keras runtime: two ONNX exports in a fresh process would double this test's time
    assert first.returncode == 0, first.stderr
    names = sorted(p.name for p in (tmp_path / "c").glob("*.h5"))
    root_id = cache.dataset_id(tiny_dataset)[:8]
    assert names == [f"tiny-{root_id}__mobilenet_v2-a1.0-64__crop__random.h5",
                     f"tiny-{root_id}__mobilenet_v3_small-64__crop__random.h5"]
    assert "cuInit" not in first.stderr and "cudart_stub" not in first.stderr  # TensorFlow's CUDA probing is quiet
    assert first.stdout.count("RANDOM weights") == 2 and "12 images in 2 classes" in first.stdout
    from typer.testing import CliRunner

    import cli

    again = CliRunner().invoke(cli.app, args)  # the rerun in this process: no second TensorFlow start-up
    assert again.exit_code == 0 and again.output.count("up to date") == 2, again.output


def test_predict_and_export_outputs_are_checked_before_any_work(tmp_path):
    from typer.testing import CliRunner

    import cli

    missing_run = tmp_path / "no_such_run"  # the run is never opened: the --out check comes first
    for args, why in ((["predict", str(missing_run), str(tmp_path), "--out", "p.txt"], "must end in .csv or .json"),
                      (["export", str(missing_run), "--out", "m.h5"], "must end in .keras"),
                      (["predict", str(missing_run), str(tmp_path), "--out", str(tmp_path)], "must end in")):
        res = CliRunner().invoke(cli.app, args)
        assert res.exit_code == 2 and why in _flat(res.output), res.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(cli.app, ["predict", str(missing_run), str(tmp_path), "--out", str(blocker / "p.csv")])
    assert res.exit_code == 2 and "is not a writable folder" in _flat(res.output)


def _flat(text: str) -> str:
    """A usage error's text without the panel's frame and line breaks."""
    import re

    return re.sub(r"[\u2500-\u257f\s]+", " ", text)


@pytest.mark.parametrize("args, expect", [
    (["--input-size", "16"], "mobilenet_v2 needs --input-size >= 32, got 16"),
    (["-b", "mobilenet_v2", "-b", "xception", "--input-size", "64"], "xception needs --input-size >= 71, got 64"),
    (["--alpha", "0.6"], "mobilenet_v2 supports --alpha in"),
])
def test_model_options_a_backbone_cannot_take_are_usage_errors(tmp_path, capsys, args, expect):
    """A size below a backbone's minimum is a usage error (exit 2), found before the folder is read or a model built."""
    import cli

    with pytest.raises(SystemExit) as status:  # the folder does not exist: the options are checked first
        cli.main(["extract", str(tmp_path / "no_such_folder"), "--weights", "none", *args], quiet_native=False)
    assert status.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert "does not exist" not in err and "Traceback" not in err
