"""Runtimes: ONNX Runtime gives Keras's features on every backbone, falls back with a reason, exports once."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

keras = pytest.importorskip("keras")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

from conftest import REPO, V2_WEIGHTS, backbone_params, randomise_statistics, run_extract, write_image  # noqa: E402
from pipeline.backbones import WeightsInfo, build_feature_model, build_features, get_spec, list_backbones  # noqa: E402
from pipeline.data import load_image  # noqa: E402
from pipeline.runtime import onnx_export  # noqa: E402
from pipeline.extract.config import ModelConfig, resolve_config  # noqa: E402
from pipeline.machine import cpu_cores  # noqa: E402
from pipeline.runtime.base import RuntimeUnavailableError  # noqa: E402
from pipeline.runtime.factory import AutoFacts, choose_auto, make_runtime  # noqa: E402
from pipeline.runtime.timing import Timing, read_timing, time_runtimes, timing_path, write_timing  # noqa: E402
from pipeline.runtime.keras import KerasRuntime  # noqa: E402
from pipeline.runtime.onnx import (CPU_PROVIDER, PIECE_IMAGES, OnnxRuntime, batch_pieces,  # noqa: E402
                                   choose_providers, cpu_lanes, relative_difference)

RANDOM = WeightsInfo("none", "", "")
CUDA, TRT = "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.fixture(scope="module", autouse=True)
def onnx_home(tmp_path_factory):
    """Exported models of this module go to one temporary store (shared by its tests, gone afterwards)."""
    home = tmp_path_factory.mktemp("headbench_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADBENCH_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def small():
    """A small random-weight MobileNetV2 (32 px, avg only) and its Keras model."""
    model = ModelConfig("mobilenet_v2", 32, 1.0, RANDOM, ("avg",))
    return model, build_features(model)


def _pixels(n: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _keras_outputs(built, px: np.ndarray) -> dict[str, np.ndarray]:
    """The plain Keras model, eagerly, in float32."""
    return {k: np.asarray(v) for k, v in built.model(px.astype("float32"), training=False).items()}


# ---- parity ----------------------------------------------------------------------------------------------------


ONNX_BY_AUTO = AutoFacts(measured=Timing(keras_ms=2.0, onnx_ms=1.0))  # a CPU where ONNX Runtime timed cheaper

ONNX_CHECKED = ["mobilenet_v2", "inception_v3", "resnet50_v2", "efficientnet_b0", "convnext_tiny", "densenet121",
                "nasnet_mobile"]
"""One backbone of each family (``make test-backbones``: all of them). ConvNeXt-T and NASNet-Mobile, the two
slowest to export (45-55 s each on 2 cores), run with ``--every-backbone`` only, where every backbone's parity is
checked anyway."""

ONNX_DEFAULT = {"mobilenet_v2", "inception_v3", "resnet50_v2", "efficientnet_b0", "densenet121"}


def test_onnx_checks_cover_every_family():
    assert {get_spec(n).family for n in ONNX_CHECKED} == {get_spec(n).family for n in list_backbones()}


@pytest.mark.parametrize("name", backbone_params(ONNX_CHECKED, ONNX_DEFAULT))
def test_onnx_matches_keras_on_one_backbone_of_each_family(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADBENCH_HOME", str(tmp_path))  # statistics randomised: not the stored seeded model
    spec = get_spec(name)
    size = max(spec.min_input_size, 64)
    alpha = min(spec.alphas) if spec.alphas else None
    model = ModelConfig(name, size, alpha, RANDOM, ("avg", "max", "maps"))
    built = build_feature_model(name, "none", size, alpha, maps=True, max_pool=True, announce=lambda m: None)
    randomise_statistics(built.model)
    msgs: list[str] = []
    rt = make_runtime(model, "onnx", log=msgs.append, built=built)
    assert isinstance(rt, OnnxRuntime) and rt.provider == CPU_PROVIDER
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(rt.path)).graph
    assert [i.name for i in graph.input] == ["pixels"]  # closed graph: no constant leaked as an input
    px = _pixels(3, size)
    ref = _keras_outputs(built, px)
    out = rt(px)
    for kind in ("avg", "max", "maps"):
        scale = float(np.abs(ref[kind]).max())
        assert scale > 0 and out[kind].shape == ref[kind].shape
        assert float(np.abs(out[kind] - ref[kind]).max()) <= 1e-4 * scale, kind
    info = rt.describe()
    assert info["runtime"] == "onnxruntime" and info["note"] == "" and float(info["parity"]) <= 1e-4
    assert not any(m.startswith("runtime:") for m in msgs)
    assert rt.built is None  # checked: the Keras model is released


def test_onnx_matches_keras_with_shared_mobilenet_v2_weights_on_real_images(shared_dir):
    cfg = resolve_config(backbone="mobilenet_v2", weights=str(shared_dir / V2_WEIGHTS), max_pool=True,
                         log=lambda m: None)
    built = build_features(cfg.model)
    rt = make_runtime(cfg.model, "onnx", log=lambda m: None, built=built)
    root = shared_dir / "data/hymenoptera/val"
    files = sorted((root / "ants").glob("*.jpg"))[:2] + sorted((root / "bees").glob("*.jpg"))[:2]
    px = np.stack([load_image(f, 224) for f in files])
    ref = _keras_outputs(built, px)
    out = rt(px)
    for kind in ("avg", "max"):
        scale = float(np.abs(ref[kind]).max())
        assert float(np.abs(out[kind] - ref[kind]).max()) <= 1e-4 * scale, kind
    assert rt.describe()["note"] == ""


def test_relative_difference():
    a = {"avg": np.array([[1.0, -2.0], [0.5, 0.0]], np.float32)}
    assert relative_difference(a, a) == 0.0
    assert relative_difference({"avg": a["avg"] + 2e-4}, a) == pytest.approx(1e-4, rel=1e-3)
    assert relative_difference({"avg": a["avg"][:1]}, a) == float("inf")  # shape differs
    nan = {"avg": np.where(a["avg"] == 0, np.nan, a["avg"]).astype(np.float32)}
    assert relative_difference(nan, a) == float("inf")  # a non-finite value where Keras has none


# ---- fallbacks -------------------------------------------------------------------------------------------------


def test_auto_falls_back_to_keras_when_onnxruntime_is_missing(small, monkeypatch):
    model, built = small
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    msgs: list[str] = []
    rt = make_runtime(model, "auto", log=msgs.append, built=built)
    assert isinstance(rt, KerasRuntime)
    assert msgs == ["runtime: keras, because ONNX Runtime is not available (onnxruntime is not installed; pip "
                    "install onnxruntime tf2onnx)"]
    assert rt.describe()["runtime"] == "keras" and "onnxruntime is not installed" in rt.describe()["note"]
    with pytest.raises(RuntimeUnavailableError, match=r"^--runtime onnx needs ONNX Runtime \(onnxruntime is not "
                                                      r"installed\): pip install onnxruntime"):
        make_runtime(model, "onnx", log=msgs.append, built=built)


def test_extract_with_runtime_onnx_and_no_onnxruntime_is_one_clear_line(tiny_dataset, tmp_path):
    code = ("import sys; sys.modules['onnxruntime'] = None; import cli; cli.main()")
    cmd = [sys.executable, "-c", code, "extract", str(tiny_dataset), "--runtime", "onnx", "--weights", "none",
           "--input-size", "32", "--cache-dir", str(tmp_path / "c"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --runtime onnx needs ONNX Runtime (onnxruntime is not installed): pip install "
                      "onnxruntime tf2onnx (onnxruntime-gpu for a GPU), or use --runtime keras"]
    assert "Traceback" not in proc.stderr and "device:" not in proc.stdout  # failed before building a model


def test_failed_export_falls_back_with_its_reason(small, tmp_path, monkeypatch):
    model, built = small
    monkeypatch.setenv("HEADBENCH_HOME", str(tmp_path))  # nothing stored: the export must run

    def broken(_built):
        raise ValueError("op FancyOp has no ONNX converter\nsecond line")

    msgs: list[str] = []
    rt = make_runtime(model, "auto", log=msgs.append, built=built, convert=broken, facts=ONNX_BY_AUTO)
    assert isinstance(rt, KerasRuntime)
    assert msgs == ["runtime: keras, because ONNX export of mobilenet_v2-a1.0-32 failed (ValueError: op FancyOp "
                    "has no ONNX converter)"]
    assert "FancyOp" in rt.describe()["note"]
    with pytest.raises(RuntimeUnavailableError, match="ONNX export of mobilenet_v2-a1.0-32 failed"):
        make_runtime(model, "onnx", log=msgs.append, built=built, convert=broken)
    assert not list(tmp_path.rglob("*.onnx")) and not list(tmp_path.rglob("*.tmp"))


def test_parity_failure_falls_back_to_keras_with_one_line(small):
    model, built = small
    msgs: list[str] = []
    rt = make_runtime(model, "onnx", log=msgs.append, built=built, parity_tolerance=-1.0)  # no difference passes
    assert isinstance(rt, OnnxRuntime)
    rt(np.zeros((4, 32, 32, 3), np.uint8))  # the engines' warm-up batch: not a real batch, no check
    assert rt.describe()["runtime"] == "onnxruntime" and not msgs[1:]
    rt.choice = "auto: onnx, 6.0 ms CPU per image against keras's 7.6 (stored)"  # as make_runtime sets it
    px = _pixels(4, 32)
    out = rt(px)
    assert rt.choice == ""  # auto's reason was for ONNX Runtime: a device line printed now must not carry it
    lines = [m for m in msgs if m.startswith("runtime:")]
    assert len(lines) == 1 and lines[0].startswith("runtime: keras, because ONNX Runtime (CPUExecutionProvider) "
                                                   "differs from Keras by ")
    assert "(tolerance -1e+00) on the first batch" in lines[0]
    info = rt.describe()
    assert info["runtime"] == "keras" and info["provider"] == "tensorflow" and "differs from Keras" in info["note"]
    ref = _keras_outputs(built, px)
    assert float(np.abs(out["avg"] - ref["avg"]).max()) <= 1e-4 * float(np.abs(ref["avg"]).max())
    rt(px)  # later batches run on Keras, silently
    assert len([m for m in msgs if m.startswith("runtime:")]) == 1


# ---- the stored model ------------------------------------------------------------------------------------------


def test_stored_model_is_reused_not_exported_again(small, tmp_path, monkeypatch):
    model, built = small
    monkeypatch.setenv("HEADBENCH_HOME", str(tmp_path))
    exports: list[str] = []

    def counted(b):
        exports.append(b.label)
        return onnx_export.to_onnx(b)

    msgs: list[str] = []
    first = make_runtime(model, "onnx", log=msgs.append, built=built, convert=counted)
    second = make_runtime(model, "onnx", log=msgs.append, built=built, convert=counted)
    assert exports == ["mobilenet_v2-a1.0-32"] and first.path == second.path
    assert first.path.parent == tmp_path / "onnx" and first.path.name.startswith("mobilenet_v2-a1.0-32__random__avg__")
    exported = [m for m in msgs if m.startswith("exported ")]
    assert len(exported) == 1 and exported[0].startswith("exported mobilenet_v2-a1.0-32 to ONNX in ")
    assert exported[0].endswith(f": {first.path}")  # the file exported is the one both runtimes opened
    assert onnx_export.stored_key(first.path) == onnx_export.export_key(model)
    assert not list(first.path.parent.glob("*.tmp"))
    first.path.write_bytes(b"not an onnx model")  # a damaged file is exported again, not used
    make_runtime(model, "onnx", log=msgs.append, built=built, convert=counted)
    assert len(exports) == 2 and onnx_export.stored_key(first.path) == onnx_export.export_key(model)


def test_every_part_of_the_key_names_another_file(small):
    model, _ = small
    from dataclasses import replace

    base = onnx_export.stored_model_path(model)
    others = [replace(model, kinds=("avg", "max")), replace(model, input_size=48), replace(model, alpha=0.5),
              replace(model, weights=WeightsInfo("file", "/x.h5", "ab" * 32)),
              replace(model, weights=WeightsInfo("file", "/x.h5", "cd" * 32))]
    paths = {onnx_export.stored_model_path(m) for m in others}
    assert len(paths) == len(others) and base not in paths
    # the file's name carries the digest of its whole key, which holds the tools' versions and the format
    key = onnx_export.export_key(model)
    digest = onnx_export.key_digest(key)
    assert base.name.endswith(f"__{digest[:16]}.onnx") and key["format"] == onnx_export.FORMAT_VERSION
    assert set(key["versions"]) == {"keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime"}
    for pkg in key["versions"]:
        assert onnx_export.key_digest({**key, "versions": {**key["versions"], pkg: "0.0.1"}})[:16] != digest[:16], pkg
    assert onnx_export.key_digest({**key, "format": key["format"] + 1})[:16] != digest[:16]


def _stored_good_model(model, built) -> Path:
    """The model exported into this module's store (exported there once, shared with the other tests)."""
    return onnx_export.ensure_exported(model, built, log=lambda m: None)


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (root ignores a folder's permissions)."""
    try:
        (folder / "probe").touch()
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


@pytest.mark.parametrize("case", ["a regular file", "under a regular file", "a read-only folder"])
def test_unusable_store_falls_back_to_keras_with_one_line(small, tmp_path, monkeypatch, case):
    model, built = small
    home = tmp_path / "home"
    if case == "a read-only folder":
        home.mkdir()
        home.chmod(0o555)
        if _writable(home):
            home.chmod(0o755)
            pytest.skip(f"folder permissions are not enforced for this user (euid {os.geteuid()}: root); the file "
                        f"cases cover an unusable store for root")
    else:
        (tmp_path / "home").write_text("not a folder")
        home = home / "sub" if case == "under a regular file" else home
    monkeypatch.setenv("HEADBENCH_HOME", str(home))
    reason = "Permission denied" if case == "a read-only folder" else "Not a directory"
    line = f"cannot use the ONNX model store {home / 'onnx'} ({reason}); set HEADBENCH_HOME to a writable folder"
    try:
        msgs: list[str] = []
        rt = make_runtime(model, "auto", log=msgs.append, built=built, facts=ONNX_BY_AUTO)
        assert isinstance(rt, KerasRuntime) and rt.describe()["note"] == line
        assert msgs == [f"runtime: keras, because {line}"]
        px = _pixels(2, 32)
        ref = _keras_outputs(built, px)["avg"]
        assert float(np.abs(rt(px)["avg"] - ref).max()) <= 1e-4 * float(np.abs(ref).max())  # the run goes on
        with pytest.raises(RuntimeUnavailableError) as err:  # asked for explicitly: the same line, as an error
            make_runtime(model, "onnx", log=msgs.append, built=built)
        assert str(err.value) == line
    finally:
        if home.is_dir():
            home.chmod(0o755)


def test_stale_export_temporaries_are_removed_live_ones_kept(small, tmp_path, monkeypatch):
    model, built = small
    good = _stored_good_model(model, built)
    monkeypatch.setenv("HEADBENCH_HOME", str(tmp_path))
    store = tmp_path / "onnx"
    store.mkdir()
    stored = store / good.name
    stored.write_bytes(good.read_bytes())  # stored already: the store is used, nothing is exported
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # reaped: its pid is dead
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead_tmp = store / f".{stored.name}.{done.pid}.tmp"  # left by an export killed mid-write
        live_tmp = store / f".other__random__avg__0123.onnx.{live.pid}.tmp"  # a live export of another model
        locked_tmp = store / f".third__random__avg__4567.onnx.{done.pid}.tmp"  # dead pid, but its lock is held
        for tmp in (dead_tmp, live_tmp, locked_tmp):
            tmp.write_bytes(b"half an export")
        fd = os.open(store / "third__random__avg__4567.onnx.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # as an exporter elsewhere (another pid namespace or machine) would
            msgs: list[str] = []
            assert onnx_export.ensure_exported(model, built, log=msgs.append) == stored and msgs == []
        finally:
            os.close(fd)
        assert not dead_tmp.exists() and live_tmp.exists() and locked_tmp.exists()
        assert onnx_export.remove_stale_temporaries(store) == [locked_tmp]  # its lock is free now
        assert live_tmp.exists() and stored.exists()
    finally:
        live.kill()
        live.wait()


def test_damaged_stored_model_is_exported_again(small, tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model, built = small
    good = _stored_good_model(model, built)
    monkeypatch.setenv("HEADBENCH_HOME", str(tmp_path))
    stored = onnx_export.stored_model_path(model)
    stored.parent.mkdir()
    proto = onnx.load(str(good))
    weights = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    values = numpy_helper.to_array(weights)
    damaged = np.random.default_rng(0).standard_normal(values.shape).astype(values.dtype)
    weights.CopyFrom(numpy_helper.from_array(damaged, weights.name))  # graph and metadata as they were
    onnx.save(proto, str(stored))
    assert onnx_export.stored_key(stored) == onnx_export.export_key(model)  # the key still matches
    before = stored.read_bytes()
    msgs: list[str] = []
    rt = make_runtime(model, "onnx", log=msgs.append, built=built)
    assert not msgs  # reused: nothing looks wrong until the parity check
    px = _pixels(4, 32)
    ref = _keras_outputs(built, px)["avg"]
    out = rt(px)["avg"]
    assert len(msgs) == 2 and msgs[0].startswith("runtime: ONNX Runtime (CPUExecutionProvider) differs from Keras by ")
    assert msgs[0].endswith(f"on the first batch: the stored model {stored} looks damaged; exporting it again")
    assert float(msgs[0].split(" differs from Keras by ")[1].split(" ")[0]) > 0.1  # gross, not rounding
    assert msgs[1].startswith("exported mobilenet_v2-a1.0-32 to ONNX in ") and msgs[1].endswith(f": {stored}")
    assert stored.read_bytes() != before and onnx_export.stored_key(stored) == onnx_export.export_key(model)
    info = rt.describe()
    assert info["runtime"] == "onnxruntime" and info["note"] == "" and float(info["parity"]) <= 1e-4
    assert float(np.abs(out - ref).max()) <= 1e-4 * float(np.abs(ref).max())
    assert not list(stored.parent.glob("*.tmp"))



def _props(path: Path) -> dict[str, str]:
    """The metadata of a stored ``.onnx`` file."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _store_copy(good: Path, home: Path, model, edit) -> Path:
    """``good`` copied into the store at ``home`` as ``model``'s file, its metadata changed by ``edit(props)``."""
    import onnx

    stored = onnx_export.stored_model_path(model, home / "onnx")
    stored.parent.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(str(good))
    props = {p.key: p.value for p in proto.metadata_props}
    edit(props)
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(stored))
    return stored


def test_a_run_checks_its_session_by_the_probe_stored_at_export_without_running_keras(small, tmp_path, monkeypatch):
    """The export stores the Keras features of the fixed probe; a run compares its session's probe features with
    them (no eager Keras run), and a file without a probe, or with one that does not match, is checked against
    Keras on the first batch as before, with the same features either way."""
    import pipeline.runtime.onnx as onnx_mod
    from pipeline.runtime.probe import PROBE_PROP, decode_probe, probe_pixels

    model, built = small
    good = _stored_good_model(model, built)
    ref = decode_probe(_props(good).get(PROBE_PROP), 32)
    assert set(ref) == {"avg"} and ref["avg"].shape == (2, built.model.outputs[0].shape[-1])
    np.testing.assert_allclose(ref["avg"], _keras_outputs(built, probe_pixels(32))["avg"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(probe_pixels(32), probe_pixels(32))
    px = _pixels(4, 32)
    keras_ref = _keras_outputs(built, px)["avg"]
    calls: list[int] = []
    real = onnx_mod.keras_features
    monkeypatch.setattr(onnx_mod, "keras_features", lambda b, x: calls.append(len(x)) or real(b, x))

    def run(home: Path) -> tuple[dict, np.ndarray]:
        monkeypatch.setenv("HEADBENCH_HOME", str(home))
        calls.clear()
        rt = make_runtime(model, "onnx", log=lambda m: None, built=built)
        out = rt(px)["avg"]
        np.testing.assert_allclose(out, keras_ref, rtol=0, atol=1e-4 * float(np.abs(keras_ref).max()))
        return rt.describe(), out

    info, by_probe = run(good.parent.parent)
    assert info["parity_check"] == "stored probe" and float(info["parity"]) <= 1e-4 and calls == []
    _store_copy(good, tmp_path / "old", model, lambda props: props.pop(PROBE_PROP))  # exported before probes
    info, by_keras = run(tmp_path / "old")
    assert info["parity_check"] == "keras" and float(info["parity"]) <= 1e-4 and calls == [2]
    np.testing.assert_array_equal(by_probe, by_keras)

    def wrong(props):  # a stored probe that is not what this session computes: Keras decides
        import base64
        import json

        doc = json.loads(props[PROBE_PROP])
        doc["outputs"]["avg"]["data"] = base64.b64encode(np.ones(ref["avg"].shape, np.float32)).decode()
        props[PROBE_PROP] = json.dumps(doc)

    _store_copy(good, tmp_path / "wrong", model, wrong)
    info, _ = run(tmp_path / "wrong")
    assert info["parity_check"] == "keras" and info["runtime"] == "onnxruntime" and calls == [2]
    assert decode_probe("not json", 32) is None and decode_probe(None, 32) is None
    assert decode_probe(_props(good).get(PROBE_PROP), 64) is None  # another input size

# ---- providers (fakes: no GPU here) ----------------------------------------------------------------------------


def test_cpu_sessions_run_without_a_memory_pattern(small):
    """On the CPU a session reuses its arena's blocks instead of allocating a memory pattern on its second run (whose
    page faults cost a run's first real batch 1-1.5 s for InceptionV3 in a process that has loaded TensorFlow)."""
    from pipeline.runtime.onnx import make_session

    model, built = small
    path = onnx_export.ensure_exported(model, built, log=lambda m: None)
    session = make_session(path, [CPU_PROVIDER], 2, model.input_size, 4)
    assert session.get_session_options().enable_mem_pattern is False
    assert session.get_session_options().intra_op_num_threads == 2


def test_provider_choice_and_threads():
    gpu_build = [TRT, CUDA, CPU_PROVIDER]
    assert choose_providers([CPU_PROVIDER], tensorrt_libraries=True) == [CPU_PROVIDER]
    assert choose_providers(gpu_build, tensorrt_libraries=False) == [CUDA, CPU_PROVIDER]
    assert choose_providers(gpu_build, tensorrt_libraries=True) == gpu_build
    assert choose_providers(["CoreMLExecutionProvider", CPU_PROVIDER], True) == [CPU_PROVIDER]
    assert cpu_lanes(2, CPU_PROVIDER) == 2 and cpu_lanes(16, CPU_PROVIDER) == 16
    assert cpu_lanes(16, CUDA) == 1 and cpu_lanes(16, TRT) == 1


def test_a_cpu_batch_runs_in_pieces_of_two_or_more_images_for_every_lane():
    def sizes(n, lanes, most=PIECE_IMAGES):
        pieces = batch_pieces(n, lanes, most)
        assert pieces[0].start == 0 and pieces[-1].stop == n  # consecutive, all of the batch, in order
        assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:]))
        return [p.stop - p.start for p in pieces]

    assert sizes(32, 2, 2) == [2] * 16
    assert sizes(32, 2, 4) == [4] * 8
    assert sizes(32, 16, 4) == [2] * 16  # every lane gets a piece before pieces reach the most
    assert sizes(13, 2, 2) == [3, 2, 2, 2, 2, 2]  # no piece of one image
    assert sizes(3, 8, 2) == [3] and sizes(1, 8) == [1] and sizes(0, 2) == [0]
    assert sizes(32, 1) == [32]  # one lane (a GPU provider): the whole batch in one run


def test_cpu_pieces_give_the_features_of_one_whole_batch_bit_for_bit(small):
    """The CPU session runs a batch as pieces, several at once; every image's features are those of one run of the
    whole batch, bit for bit (the cached numbers do not depend on how a batch was cut)."""
    from pipeline.runtime.onnx import make_session

    class Counted:
        """The real session, with the batch size of every run it is given."""

        def __init__(self, session):
            self.session, self.runs = session, []

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, outputs, feed):
            self.runs.append(len(next(iter(feed.values()))))
            return self.session.run(outputs, feed)

    model, built = small
    path = onnx_export.ensure_exported(model, built, log=lambda m: None)
    sessions: list[Counted] = []
    rt = OnnxRuntime(model, built, path, [CPU_PROVIDER], log=lambda m: None, batch_size=16, cores=2,
                     session_factory=lambda *a: sessions.append(Counted(make_session(*a))) or sessions[-1])
    assert rt.lanes == 2 and rt.threads == 1
    px = _pixels(13, model.input_size, seed=5)
    whole = make_session(path, [CPU_PROVIDER], 2, model.input_size, 16).run(None, {"pixels": px})
    got = rt.unchecked(px)
    assert sorted(sessions[0].runs) == [2, 2, 2, 2, 2, 3]  # the pieces ran, not the batch
    for name, value in zip(rt._outputs, whole):
        assert got[name].shape == value.shape and np.array_equal(got[name], value), name


def test_decoding_workers_default():
    """One decoding worker per core up to 8 (more threads only queue on the GIL); the resolved config uses the rule
    with this process's cores, and a count asked for is kept."""
    from pipeline import machine

    assert [machine.decode_threads(c) for c in (1, 2, 8, 16, 64)] == [1, 2, 8, 8, 8]
    cores = machine.cpu_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert resolve_config(backbone="mobilenet_v2", weights="none", log=lambda m: None).workers == min(cores, 8)
    assert resolve_config(backbone="mobilenet_v2", weights="none", workers=12, log=lambda m: None).workers == 12


class FakeSession:
    """Stands for an ONNX Runtime session: reports the providers it runs on and computes with ``fn``."""

    def __init__(self, providers: list[str], fn):
        self.providers, self.fn = providers, fn

    def get_providers(self):
        return self.providers

    def get_inputs(self):
        return [SimpleNamespace(name="pixels")]

    def get_outputs(self):
        return [SimpleNamespace(name="avg")]

    def run(self, names, feeds):
        return [self.fn(feeds["pixels"])]


def _fake_factory(built, behaviour: dict[str, str], opened: list[list[str]]):
    """Sessions whose first provider fails to start ("fail"), is silently dropped by ONNX Runtime ("dropped"),
    computes in reduced precision ("tf32") or exactly ("exact")."""
    exact = lambda px: _keras_outputs(built, px)["avg"]  # noqa: E731

    def factory(path, providers, threads, input_size, batch_size):
        opened.append(list(providers))
        how = behaviour.get(providers[0], "exact")
        if how == "fail":
            raise RuntimeError("libcudnn.so.9: cannot open shared object file\nmore")
        if how == "dropped":
            return FakeSession([CPU_PROVIDER], exact)
        if how == "tf32":
            return FakeSession(list(providers), lambda px: exact(px) * (1 + 1e-3))
        return FakeSession(list(providers), exact)

    return factory


def test_gpu_provider_that_cannot_start_is_skipped_with_one_line(small):
    model, built = small
    msgs, opened = [], []
    rt = OnnxRuntime(model, built, Path("m.onnx"), [TRT, CUDA, CPU_PROVIDER], log=msgs.append,
                     session_factory=_fake_factory(built, {TRT: "fail"}, opened))
    assert opened == [[TRT, CUDA, CPU_PROVIDER], [CUDA, CPU_PROVIDER]]
    assert msgs == ["runtime: TensorrtExecutionProvider cannot start (libcudnn.so.9: cannot open shared object "
                    "file); trying CUDAExecutionProvider"]
    assert (rt.provider, rt.device, rt.threads) == (CUDA, "GPU (CUDA)", 1)
    rt(_pixels(2, 32))
    assert rt.describe()["provider"] == CUDA and rt.describe()["device"] == "GPU (CUDA)"


def test_provider_dropped_by_onnxruntime_is_reported(small):
    model, built = small
    msgs, opened = [], []
    rt = OnnxRuntime(model, built, Path("m.onnx"), [CUDA, CPU_PROVIDER], log=msgs.append,
                     session_factory=_fake_factory(built, {CUDA: "dropped"}, opened))
    assert len(msgs) == 1 and msgs[0].startswith("runtime: CUDAExecutionProvider is installed but could not start")
    assert (rt.provider, rt.device, rt.threads, rt.lanes) == (CPU_PROVIDER, f"CPU ({cpu_cores()} cores)", 1,
                                                              cpu_cores())


def test_reduced_precision_gpu_falls_back_to_the_next_provider(small):
    model, built = small
    msgs, opened = [], []
    rt = OnnxRuntime(model, built, Path("m.onnx"), [CUDA, CPU_PROVIDER], log=msgs.append,
                     session_factory=_fake_factory(built, {CUDA: "tf32"}, opened))
    assert rt.provider == CUDA
    px = _pixels(4, 32)
    out = rt(px)
    assert opened == [[CUDA, CPU_PROVIDER], [CPU_PROVIDER]]
    assert len(msgs) == 1 and msgs[0].startswith("runtime: ONNX Runtime (CUDAExecutionProvider) differs from Keras by "
                                                 "1.0e-03") and msgs[0].endswith("trying CPUExecutionProvider")
    np.testing.assert_array_equal(out["avg"], _keras_outputs(built, px)["avg"])
    info = rt.describe()
    assert info["runtime"] == "onnxruntime" and info["provider"] == CPU_PROVIDER and float(info["parity"]) <= 1e-6
    assert "CUDAExecutionProvider) differs" in info["note"]


def test_damaged_model_is_exported_again_once_then_keras(small):
    """A gross mismatch on the CPU exports again once; a GPU's gross mismatch, or a small one, does not."""
    from pipeline.runtime.onnx_export import ExportError

    model, built = small
    exact = lambda px: _keras_outputs(built, px)["avg"]  # noqa: E731
    px = _pixels(4, 32)
    for failure in (None, ExportError("cannot write the exported model to m.onnx (No space left on device)")):
        msgs, opened, exports = [], [], []

        def damaged(path, providers, threads, input_size, batch_size, opened=opened):
            opened.append(list(providers))
            return FakeSession(list(providers), lambda x: exact(x) * 3.0)  # still damaged after the export

        def reexport(reference, exports=exports, failure=failure):
            exports.append(reference)
            if failure:
                raise failure
            return Path("m.onnx")

        rt = OnnxRuntime(model, built, Path("m.onnx"), [CPU_PROVIDER], log=msgs.append, session_factory=damaged,
                         reexport=reexport)
        np.testing.assert_allclose(rt(px)["avg"], exact(px), rtol=1e-5, atol=1e-6)  # Keras's features
        assert exports == [built] and opened == ([[CPU_PROVIDER]] * (1 if failure else 2))  # no loop
        assert len(msgs) == 2 and msgs[0].endswith("the stored model m.onnx looks damaged; exporting it again")
        if failure:
            assert msgs[1].endswith("the stored model m.onnx looks damaged and could not be replaced (cannot write "
                                    "the exported model to m.onnx (No space left on device)); delete it")
        else:
            assert msgs[1].endswith("on the first batch, also after m.onnx was exported again")
        assert msgs[1].startswith("runtime: keras, because ONNX Runtime (CPUExecutionProvider) differs from Keras "
                                  "by 2.0e+00")
        assert rt.describe()["runtime"] == "keras"
    exports = []
    rt = OnnxRuntime(model, built, Path("m.onnx"), [CUDA, CPU_PROVIDER], log=lambda m: None,
                     session_factory=lambda path, providers, *a: FakeSession(
                         list(providers), (lambda x: exact(x) * 3.0) if providers[0] == CUDA else exact),
                     reexport=exports.append)
    rt(px)
    assert exports == [] and rt.provider == CPU_PROVIDER  # a GPU's mismatch is the GPU's: the next provider runs


# ---- what the engine records, and predict ---------------------------------------------------------------------


def test_engine_records_the_runtime_it_ran(tiny_dataset, tmp_path):
    """The cache records, with the run, the runtime that ran it, as the device line said, with auto's reason."""
    from pipeline import cache

    msgs: list[str] = []
    res = run_extract(tiny_dataset, tmp_path / "c", log=msgs.append, weights="none", input_size=32, batch_size=4,
                      runtime="onnx")
    runs = cache.read_meta(res.path)["runs"]
    assert len(runs) == 1
    info = runs[0]
    assert {k: info[k] for k in ("runtime", "runtime_version", "device", "provider", "note")} == {
        "runtime": "onnxruntime", "runtime_version": ort.__version__, "device": f"CPU ({cpu_cores()} cores)",
        "provider": CPU_PROVIDER, "note": ""}
    assert float(info["parity"]) <= 1e-4 and (info["threads"], info["runs_at_once"]) == ("1", str(cpu_cores()))
    line = f"device: CPU ({cpu_cores()} cores), runtime onnxruntime {ort.__version__} (CPUExecutionProvider, " \
           f"pieces of {PIECE_IMAGES} images, {cpu_cores()} at once on one thread each), batch 4, "  # no auto reason
    assert any(m.startswith(line) and m.endswith("decoding threads") for m in msgs), msgs

    msgs.clear()  # auto: the runtime this machine's timing names, and the timing in the device line
    res = run_extract(tiny_dataset, tmp_path / "d", log=msgs.append, weights="none", input_size=32, batch_size=4)
    name = {"onnxruntime": "onnx", "keras": "keras"}[cache.read_meta(res.path)["runs"][0]["runtime"]]
    (device,) = [m for m in msgs if m.startswith("device: ")]
    assert f" [auto: {name}, " in device and " ms CPU per image against " in device, device


def test_auto_rule_by_machine_facts():
    """Each fact auto chooses by, and the reason it gives (docs/benchmarks.md "Which runtime auto takes")."""
    cases = {
        AutoFacts(onnx_missing="onnxruntime is not installed", keras_gpu=True): "keras",
        AutoFacts(onnx_gpu=True, keras_gpu=True): "onnx",  # ONNX Runtime's CUDA path goes first
        AutoFacts(keras_gpu=True): "keras",
        AutoFacts(measured=Timing(keras_ms=3.0, onnx_ms=2.0)): "onnx",  # a CPU: the cheaper of both as timed
        AutoFacts(measured=Timing(keras_ms=2.0, onnx_ms=3.0)): "keras",
    }
    reasons = set()
    for facts, want in cases.items():
        name, why = choose_auto(facts)
        assert name == want, facts
        assert why and why not in reasons, facts  # every branch says its own reason
        reasons.add(why)
    assert "pip install onnxruntime" in choose_auto(AutoFacts(onnx_missing="x"))[1]
    assert "GPU" in choose_auto(AutoFacts(keras_gpu=True))[1]
    assert choose_auto(AutoFacts(measured=Timing(2.0, 3.5, "stored")))[1] == (
        "auto: keras, 2.0 ms CPU per image against onnx's 3.5 on this machine (stored)")
    assert choose_auto(AutoFacts(measured=Timing(2.0, 2.0)))[0] == "onnx"  # a tie keeps ONNX Runtime
    with pytest.raises(ValueError, match="timing"):  # a CPU and no timing: make_runtime times first
        choose_auto(AutoFacts())


def test_auto_builds_what_its_rule_names(small):
    """make_runtime follows choose_auto for the facts it is handed, and the runtime carries the reason."""
    model, built = small
    msgs: list[str] = []
    rt = make_runtime(model, "auto", log=msgs.append, built=built, facts=AutoFacts(keras_gpu=True))
    assert isinstance(rt, KerasRuntime) and rt.choice == choose_auto(AutoFacts(keras_gpu=True))[1]
    keras_cheaper = AutoFacts(measured=Timing(keras_ms=1.0, onnx_ms=2.0))
    rt = make_runtime(model, "auto", log=msgs.append, built=built, facts=keras_cheaper)
    assert isinstance(rt, KerasRuntime) and rt.choice == choose_auto(keras_cheaper)[1]
    assert rt.describe()["note"] == "" and not [m for m in msgs if m.startswith("runtime:")]
    rt = make_runtime(model, "auto", log=msgs.append, built=built, facts=ONNX_BY_AUTO)
    assert isinstance(rt, OnnxRuntime) and rt.choice == choose_auto(ONNX_BY_AUTO)[1]
    assert make_runtime(model, "keras", log=msgs.append, built=built).choice == ""  # asked for: no reason


def test_time_runtimes_alternates_and_takes_medians():
    """Each runtime warms up once untimed, then the rounds alternate which goes first; medians per image."""
    calls: list[str] = []
    spent = [0.0]
    costs = {"keras": iter([9.0, 0.4, 0.8, 0.6]), "onnx": iter([9.0, 0.2, 0.9, 0.3])}  # warm-up first, then rounds

    def run(name):
        def go(px):
            calls.append(name)
            spent[0] += next(costs[name])
        return go

    ms = time_runtimes({"keras": run("keras"), "onnx": run("onnx")}, np.zeros((4, 2, 2, 3), np.uint8), rounds=3,
                       clock=lambda: spent[0])
    assert calls == ["keras", "onnx", "keras", "onnx", "onnx", "keras", "keras", "onnx"]
    assert ms == pytest.approx({"keras": 1000 * 0.6 / 4, "onnx": 1000 * 0.3 / 4})


def test_auto_on_a_cpu_times_both_once_per_machine_and_keeps_it(small, tmp_path, monkeypatch):
    """The first auto run on a CPU times both runtimes and stores the result beside the exported model; the next run
    reads it; a damaged or another machine's file is timed over; a file that cannot be kept costs one line."""
    import json
    from dataclasses import replace

    monkeypatch.setenv("HEADBENCH_HOME", str(tmp_path))
    model, built = small
    msgs: list[str] = []
    cpu = AutoFacts()  # ONNX Runtime installed, no GPU: no timing handed in

    def auto() -> object:
        msgs.clear()
        return make_runtime(model, "auto", log=msgs.append, built=built, facts=cpu)

    rt = auto()
    assert any(m.startswith("runtime: auto times keras and onnx on 32 images") for m in msgs), msgs
    path = timing_path(onnx_export.stored_model_path(model))  # beside the model exported into tmp_path
    stored = read_timing(path)
    assert stored is not None and stored.source == "stored" and stored.keras_ms > 0 and stored.onnx_ms > 0
    assert isinstance(rt, OnnxRuntime if stored.faster == "onnx" else KerasRuntime)
    assert rt.choice == choose_auto(AutoFacts(measured=replace(stored, source="timed now")))[1]
    rt = auto()
    assert not [m for m in msgs if "times keras and onnx" in m] and rt.choice.endswith("on this machine (stored)")

    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "machine": {**data["machine"], "cpu": "another CPU"}}))
    assert read_timing(path) is None
    auto()
    assert any("times keras and onnx" in m for m in msgs) and read_timing(path) is not None
    path.write_text("{not json")
    assert read_timing(path) is None
    auto()
    assert any("times keras and onnx" in m for m in msgs) and read_timing(path) is not None

    path.unlink()
    path.mkdir()  # cannot be written over (even as root): timed, used, and said
    rt = auto()
    assert any(m.startswith(f"runtime: cannot keep the timing in {path}") for m in msgs), msgs
    assert rt.choice.endswith("on this machine (timed now)")

    path.rmdir()  # a stored timing naming Keras: no ONNX session opened, not even the export looked for
    write_timing(path, Timing(keras_ms=1.0, onnx_ms=2.0), 32)
    model_file = onnx_export.stored_model_path(model)
    model_file.unlink()
    converted: list[object] = []
    rt = make_runtime(model, "auto", log=msgs.append, built=built, facts=cpu,
                      convert=lambda b: converted.append(b) or onnx_export.to_onnx(b))
    assert isinstance(rt, KerasRuntime) and rt.choice.endswith("(stored)") and rt.note == ""
    assert converted == [] and not model_file.exists()


def test_cpu_flags_read_from_cpuinfo():
    from pipeline.machine import cpu_flags, cpu_model

    flags = cpu_flags()
    assert isinstance(flags, frozenset)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        assert flags == frozenset()
        return
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    assert flags == frozenset(line.partition(":")[2].split())
    assert ("avx512f" in flags) == (" avx512f" in line)
    model_line = next((ln for ln in text.splitlines() if ln.startswith("model name")), "")
    if model_line:  # x86 Linux: the name a stored timing is kept for
        assert cpu_model() == model_line.partition(":")[2].strip() and cpu_model()


def test_predict_gives_the_same_labels_with_both_runtimes(tmp_path):
    from pipeline.fit import FitConfig, run_fit
    from pipeline.predict import predict_images

    rng = np.random.default_rng(0)
    root = tmp_path / "colours"
    for cls, base in (("red", (210, 40, 40)), ("blue", (40, 40, 210))):
        for i in range(12):
            img = np.clip(np.array(base) + rng.integers(-60, 60, (40, 48, 3)), 0, 255).astype(np.uint8)
            write_image(root / cls / f"{i:02d}.jpg", img)
    res = run_extract(root, tmp_path / "cache", weights="none", input_size=32, batch_size=8)
    run = tmp_path / "run"
    run_fit(FitConfig(caches=[res.path], heads=["logreg"], out=run), log=lambda m: None)
    _, by_keras = predict_images(run, [root], head="logreg", runtime="keras", log=lambda m: None)
    msgs: list[str] = []
    _, by_onnx = predict_images(run, [root], head="logreg", runtime="onnx", log=msgs.append)
    assert not any(m.startswith("exported ") for m in msgs)  # extract's export is reused
    assert [r["label"] for r in by_onnx] == [r["label"] for r in by_keras] and len(by_onnx) == 24
    for a, b in zip(by_keras, by_onnx):
        assert abs(a["probability"] - b["probability"]) < 1e-4
