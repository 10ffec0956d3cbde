"""Shared fixtures: locating ../shared, tiny generated datasets, and session-wide real caches."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "HEADBENCH_HOME" not in os.environ:  # exported ONNX models go to one folder per test session, never to ~/.cache
    import tempfile

    os.environ["HEADBENCH_HOME"] = tempfile.mkdtemp(prefix="headbench-home-")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
V2_WEIGHTS = "weights/coralq_mobilenet_v2_1.0_224_no_top.weights.h5"
V1_WEIGHTS = "weights/coralq_mobilenet_1_0_224_tf_no_top.weights.h5"


def pytest_addoption(parser):
    parser.addoption("--every-backbone", action="store_true", default=False,
                     help="also run the every_backbone tests (each registered backbone through ONNX Runtime, and "
                          "each ImageNet file against Keras's own; about 11 minutes on 2 cores)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--every-backbone"):
        return
    skip = pytest.mark.skip(reason="needs --every-backbone")
    for item in items:
        if "every_backbone" in item.keywords:
            item.add_marker(skip)


def write_blobs(root: Path, seed: int = 1, per_class: int = 10) -> Path:
    """A two-class set of small JPEGs: a coloured square (blue or red) on noise, sizes varying by image."""
    rng = np.random.default_rng(seed)
    for c, colour in {"blue": (30, 40, 210), "red": (210, 40, 30)}.items():
        for i in range(per_class):
            img = rng.integers(0, 120, (36 + i, 40, 3)).astype(np.int64)
            img[6:28, 8:30] = colour
            write_image(root / c / f"{i:02d}.jpg", np.clip(img, 0, 255).astype(np.uint8))
    return root


def backbone_params(names, default):
    """``names`` as test parameters: those in ``default`` run in every suite, the others only with
    ``--every-backbone`` (marked ``every_backbone``), so the default suite stays within its time."""
    return [pytest.param(n, marks=() if n in default else pytest.mark.every_backbone) for n in names]


def _quiet(_msg: str) -> None:
    pass


_REUSED: dict = {}


def reused_runtime(model, runtime="auto", log=print, **kw):
    """A runtime factory (``extract_dataset(..., runtime_factory=)``) that builds each feature model once per test
    session and hands the same runtime to every extraction that asks for it.

    Building and tracing a model is most of a tiny extraction's time (about 2.5 of 3 seconds); a runtime holds no
    state between calls, so extractions that share a model config may share it. :func:`run_extract` passes it; a
    test that wraps the runtime wraps this one (``lambda *a, **k: Wrapper(reused_runtime(*a, **k))``).
    """
    from pipeline.runtime.factory import make_runtime

    key = (model, runtime, tuple(sorted(kw.items())))
    try:
        hash(key)
    except TypeError:  # an already built model was handed in: nothing to reuse
        return make_runtime(model, runtime, log=log, **kw)
    if key not in _REUSED:
        _REUSED[key] = make_runtime(model, runtime, log=log, **kw)
    return _REUSED[key]


def run_extract(root, cache_dir, log=_quiet, runtime_factory=reused_runtime, commit=None, **options):
    """Resolve extraction options (as ``python cli.py extract`` does) and extract ``root`` into ``cache_dir``, with
    the session's reused runtimes (:func:`reused_runtime`) unless ``runtime_factory`` says otherwise, and the real
    file commit unless ``commit`` is handed in."""
    from pipeline.atomic import commit_file
    from pipeline.extract import extract_dataset, resolve_config

    return extract_dataset(root, resolve_config(log=log, cache_dir=cache_dir, **options), log=log,
                           runtime_factory=runtime_factory, commit=commit or commit_file)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder with real weights and images (CI has it); skip when absent."""
    if not (SHARED / "README.md").exists():
        pytest.skip(f"{SHARED} is absent: real weights and image folders are needed for this test")
    return SHARED


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("caches")


@pytest.fixture(scope="session")
def hymenoptera_v2_cache(shared_dir, cache_root) -> Path:
    """hymenoptera (398 photos, train/val folders) cached with the shared ImageNet MobileNetV2 weights."""
    res = run_extract(shared_dir / "data/hymenoptera", cache_root / "hymenoptera", backbone="mobilenet_v2",
                      weights=str(shared_dir / V2_WEIGHTS))
    return res.path


FLOWERS5_EVERY = 8  # every 8th photo of each class: ~540 real photos, classes still unequal (92 to 132)


@pytest.fixture(scope="session")
def flowers5_subset(shared_dir, tmp_path_factory) -> Path:
    """A fixed subset of flowers5 (no split folders, 5 unequal classes): every 8th photo of each class, by name.

    The whole set (4,317 photos, two backbones) cost more than four minutes of the suite; what the tests check (the
    hash split, two backbones on the same rows, a probe far above chance) holds on this subset, and accuracy on
    the whole set is measured by bench/heads.py.
    """
    import shutil

    root = tmp_path_factory.mktemp("flowers5") / "flowers5"
    for cls in sorted(p for p in (shared_dir / "data/flowers5").iterdir() if p.is_dir()):
        (root / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[::FLOWERS5_EVERY]:
            shutil.copy2(f, root / cls.name / f.name)
    return root


@pytest.fixture(scope="session")
def flowers5_caches(flowers5_subset, cache_root) -> dict[str, Path]:
    """The flowers5 subset cached with the shared MobileNet v1 and MobileNetV2 weights."""
    out = {}
    for name, w in (("mobilenet", V1_WEIGHTS), ("mobilenet_v2", V2_WEIGHTS)):
        res = run_extract(flowers5_subset, cache_root / "flowers5", backbone=name,
                          weights=str(SHARED / w))
        out[name] = res.path
    return out


# ---- Keras model helpers (tests that compare a model with a transformed or exported copy) --------------------


def model_layers(model):
    """Every layer of a Keras model, nested models flattened."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from model_layers(layer)
        else:
            yield layer


def randomise_statistics(model, seed: int = 0, inputs: bool = True) -> None:
    """Non-trivial normalisation statistics (fresh layers hold mean 0, variance 1, which would hide a wrong
    folding or a constant lost in the export); ``inputs=False`` leaves input Normalization layers alone."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, n).astype("float32"))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            if layer.center:
                layer.beta.assign(rng.normal(0, 0.3, n).astype("float32"))
        elif (inputs and isinstance(layer, keras.layers.Normalization)
              and getattr(layer, "adapt_mean", None) is not None):
            n = layer.adapt_mean.shape
            layer.adapt_mean.assign(rng.uniform(0.3, 0.6, n).astype("float32"))
            layer.adapt_variance.assign(rng.uniform(0.04, 0.09, n).astype("float32"))
            layer.finalize_state()  # the layer keeps them as tensors: what the export used to turn into inputs


def write_image(path: Path, rgb: np.ndarray, fmt: str | None = None, **kw) -> Path:
    """Save an array as an image file (format from the suffix unless given)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format=fmt, **kw)
    return path


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """A generated class-per-folder set: 2 classes x 6 JPEGs of different sizes and colours."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tiny"
    for c, base in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        for i in range(6):
            h, w = 40 + 7 * i, 60 - 3 * i
            img = np.clip(np.array(base) + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            write_image(root / c / f"img_{i:02d}.jpg", img)
    return root


@pytest.fixture
def tmpfs(tmp_path):
    """A factory of small tmpfs mounts, ``tmpfs("4m")``: disks that fill up (needs root; skipped with the reason
    otherwise); unmounted at the end of the test."""
    mounts = []

    def mount(size: str = "256k") -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
        mnt = tmp_path / f"small_disk{len(mounts)}"
        mnt.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def small_tmpfs(tmpfs):
    """A 256 KiB tmpfs: a disk that fills up (needs root; skipped with the reason otherwise)."""
    return tmpfs("256k")
