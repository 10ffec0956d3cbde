"""Every registered backbone against Keras's own application: same features, shapes, weights files and last stage.

The reference is independent of the project's feature model: ``keras.applications``' own model, fed its own
``preprocess_input``, then a mean over space. Both get the same random weights (normalisation statistics and
scales perturbed, so that a lost constant shows) through a ``.weights.h5`` file, which the project loads with
``extract --weights FILE``'s code path. For EfficientNet B0-B3 the reference is Keras's *ImageNet* build (it adds
a rescaling layer only then), loading that file in place of the download.

The default run checks one backbone of each builder and preprocessing (:data:`PATTERNS`) against Keras, and ONNX
Runtime on five families (tests/test_runtime.py); ``--every-backbone`` (``make test-backbones``) adds every other
backbone against Keras, each backbone's ONNX Runtime parity and the check that each ``imagenet`` file is the one
Keras itself asks for.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from conftest import backbone_params, model_layers, randomise_statistics  # noqa: E402
from pipeline.backbones import (BackboneSpec, build_feature_model, get_spec, list_backbones,  # noqa: E402
                                register_backbone, resolve_weights, unregister_backbone)
from pipeline.errors import BackboneError, WeightsError  # noqa: E402
from pipeline.finetune.train import _base_of, default_unfreeze  # noqa: E402

BUILTIN = list_backbones()

PATTERNS = {"mobilenet", "mobilenet_v2", "mobilenet_v3_small", "inception_v3", "resnet50", "resnet50_v2",
            "efficientnet_b0", "efficientnet_v2_b0", "convnext_tiny", "densenet121", "nasnet_mobile", "xception"}
"""The backbones checked against Keras's own application in every suite: one of each builder, preprocessing and
quirk (caffe vs tf vs torch preprocessing, in-model rescaling, EfficientNet's ImageNet-only layer). The larger
variants of the same builders (ResNet101V2, DenseNet201, ConvNeXt-S/B, EfficientNet B1-B3 and V2 B1-S,
InceptionResNetV2, MobileNetV3-Large) run with ``--every-backbone`` (``make test-backbones``)."""


def _resolve(dotted: str):
    import importlib

    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _test_size(spec: BackboneSpec) -> int:
    return max(spec.min_input_size, 32)


def _perturb(model, seed: int = 0, mild: bool = False) -> None:
    """Random normalisation statistics (see conftest) and random scales of every other ``gamma`` (ConvNeXt's
    LayerScale starts at 1e-6, which would hide its residual branches, and LayerNormalization's at 1).

    ``mild``: batch-norm statistics near the identity (means N(0, 0.1), variances in [0.5, 2], scales in [0.8, 1.2]).
    With conftest's wider ones, the deepest networks (EfficientNetV2-B3 and -S: 40+ blocks) amplify float rounding
    until folding the normalisations alone (TensorFlow against TensorFlow) changes the features by ~5e-3, which
    says nothing about a runtime; compared across runtimes (which fold), the statistics stay mild.
    """
    randomise_statistics(model, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for layer in model_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            if mild:
                n = layer.moving_mean.shape[0]
                layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
                layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
                if layer.scale:
                    layer.gamma.assign(rng.uniform(0.8, 1.2, n).astype("float32"))
                if layer.center:
                    layer.beta.assign(rng.normal(0, 0.1, n).astype("float32"))
            continue
        for w in layer.weights:
            if w.path.rsplit("/", 1)[-1] == "gamma":
                w.assign(rng.uniform(0.3, 1.0, tuple(w.shape)).astype("float32"))


def _keras_imagenet_build(spec: BackboneSpec, size: int, path: str, monkeypatch) -> tuple:
    """Keras's own ``weights="imagenet"`` build, loading ``path`` where it would download; also what it asked for."""
    from keras.src.utils import file_utils

    asked: list[tuple] = []

    def get_file(fname=None, origin=None, *args, **kwargs):
        asked.append((fname, origin, kwargs.get("file_hash")))
        return path

    monkeypatch.setattr(file_utils, "get_file", get_file)
    model = _resolve(spec.builder)(include_top=False, weights="imagenet", input_shape=(size, size, 3))
    return model, asked


def _relative(out: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.abs(ref).max())
    assert scale > 0 and np.all(np.isfinite(out))
    return float(np.abs(out - ref).max()) / scale


@pytest.mark.parametrize("name", backbone_params(BUILTIN, PATTERNS))
def test_feature_model_equals_keras_application_with_its_preprocess_input(name, tmp_path, monkeypatch):
    spec = get_spec(name)
    size = _test_size(spec)
    alpha = None  # the default width (the registered pooled dimension is at 1.0)
    ref = _resolve(spec.builder)(include_top=False, weights=None, input_shape=(size, size, 3))
    _perturb(ref)
    if spec.stddev_twice:
        # Keras's ImageNet EfficientNet divides by sqrt(variance) in its Normalization and then by sqrt(stddev) in a
        # layer it adds only for weights="imagenet": its file stores variance = stddev. The reference is that build.
        (norm,) = [x for x in ref.layers if isinstance(x, keras.layers.Normalization)]
        norm.adapt_mean.assign(np.array([0.485, 0.456, 0.406], "float32"))
        norm.adapt_variance.assign(np.array([0.229, 0.224, 0.225], "float32"))
        norm.finalize_state()
    path = tmp_path / f"{name}.weights.h5"
    ref.save_weights(path)
    if spec.stddev_twice:
        ref, _ = _keras_imagenet_build(spec, size, str(path), monkeypatch)

    built = build_feature_model(name, weights=str(path), input_size=size, alpha=alpha, maps=True,
                                announce=lambda m: None)
    assert built.weights.source == "file"
    px = np.random.default_rng(3).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    prep = _resolve(spec.preprocess)(px.astype("float32").copy())
    ref_maps = np.asarray(ref(prep, training=False))
    # the feature model itself; the Keras runtime runs a copy with normalisations folded (tests/test_fold.py)
    out = {k: np.asarray(v) for k, v in built.model(px.astype("float32"), training=False).items()}
    assert _relative(out["maps"], ref_maps) <= 1e-4
    assert _relative(out["avg"], ref_maps.mean(axis=(1, 2))) <= 1e-4

    # shapes as registered (the map side at the native input size: test_every_imagenet_file_...)
    assert built.feature_dim == spec.feature_dim == out["avg"].shape[1]
    assert built.map_shape == ref_maps.shape[1:]

    # fine-tuning knows its last stage
    base = _base_of(built)
    assert 0 < default_unfreeze(name, base) < len(base.layers) // 2


@pytest.mark.parametrize("name", BUILTIN)
def test_offline_imagenet_line_names_the_file_and_where_to_put_it(name, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))

    def offline(*a, **k):
        raise Exception("URL fetch failure: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    spec = get_spec(name)
    fname, url, file_hash = spec.imagenet_file(1.0, spec.default_input_size)
    assert url.startswith("https://") and url.endswith(".h5")
    assert len(file_hash or "") in ((0,) if name in ("mobilenet", "mobilenet_v2") else (32, 64))  # Keras's own
    announced: list[str] = []
    with pytest.raises(WeightsError) as err:
        resolve_weights(spec, "imagenet", spec.default_input_size, 1.0 if spec.alphas else None,
                        announce=announced.append)
    msg = str(err.value)
    assert "\n" not in msg and fname in msg and str(tmp_path / "kh" / "models") in msg and "--weights PATH" in msg
    assert announced == [f"downloading ImageNet weights for {name}: {url} -> {tmp_path / 'kh' / 'models' / fname}"]


def test_a_registered_toy_backbone_is_built_listed_and_removed():
    toy = BackboneSpec(name="toy_net", builder="keras.applications.MobileNetV3Small",
                       preprocess="keras.applications.mobilenet_v3.preprocess_input", preprocess_mode="in-model",
                       default_input_size=32, feature_dim=576, map_side=1, min_input_size=32,
                       imagenet_file=lambda a, s: ("toy.h5", "https://example.invalid/toy.h5", None),
                       summary="a toy", family="toy")
    register_backbone(toy)
    try:
        assert "toy_net" in list_backbones() and get_spec("Toy-Net") is toy
        with pytest.raises(BackboneError, match="already registered"):
            register_backbone(toy)
        built = build_feature_model("toy_net", weights="none", announce=lambda m: None)
        assert built.feature_dim == 576 and built.map_shape == (1, 1, 576)
    finally:
        unregister_backbone("toy_net")
    assert "toy_net" not in list_backbones()
    with pytest.raises(BackboneError, match="registered: mobilenet, "):
        get_spec("toy_net")
    with pytest.raises(BackboneError, match="lower case"):
        register_backbone(BackboneSpec(**{**toy.__dict__, "name": "Toy"}))


def test_torch_preprocessing_layer_is_densenets_preprocess_input():
    from pipeline.backbones import preprocess_layers

    px = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype("float32")
    (layer,) = preprocess_layers(get_spec("densenet121"))
    ref = keras.applications.densenet.preprocess_input(px.copy())
    np.testing.assert_allclose(np.asarray(layer(px)), ref, rtol=1e-5, atol=1e-5)


# ---- every backbone (python -m pytest tests/test_backbones.py --every-backbone) -----------------------------


@pytest.mark.every_backbone
@pytest.mark.parametrize("name", BUILTIN)
def test_every_backbone_onnx_runtime_matches_keras(name, tmp_path, monkeypatch):
    from pipeline.extract.config import ModelConfig
    from pipeline.runtime.onnx import OnnxRuntime
    from pipeline.runtime.factory import make_runtime
    from pipeline.backbones import WeightsInfo

    monkeypatch.setenv("HEADBENCH_HOME", str(tmp_path))
    spec = get_spec(name)
    size = max(spec.min_input_size, 64)
    alpha = min(spec.alphas) if spec.alphas else None
    built = build_feature_model(name, "none", size, alpha, maps=True, max_pool=True, announce=lambda m: None)
    _perturb(built.model, mild=True)
    model = ModelConfig(name, size, alpha, WeightsInfo("none", "", ""), ("avg", "max", "maps"))
    rt = make_runtime(model, "onnx", log=lambda m: None, built=built)
    assert isinstance(rt, OnnxRuntime)
    px = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    ref = {k: np.asarray(v) for k, v in built.model(px.astype("float32"), training=False).items()}
    out = rt(px)
    for kind in ("avg", "max", "maps"):
        assert _relative(out[kind], ref[kind]) <= 1e-4, kind
    assert rt.describe()["note"] == ""


@pytest.mark.every_backbone
@pytest.mark.parametrize("name", BUILTIN)
def test_every_imagenet_file_is_the_one_keras_asks_for(name, tmp_path, monkeypatch):
    spec = get_spec(name)  # MobileNet v1/v2 (one file per width and size): the default width and size
    size = spec.default_input_size
    donor = _resolve(spec.builder)(include_top=False, weights=None, input_shape=(size, size, 3))
    path = tmp_path / "w.weights.h5"
    donor.save_weights(path)
    _, asked = _keras_imagenet_build(spec, size, str(path), monkeypatch)
    assert asked == [spec.imagenet_file(1.0, size)]
    assert tuple(donor.output.shape[1:]) == (spec.map_side, spec.map_side, spec.feature_dim)  # as registered
