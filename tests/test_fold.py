"""Folding batch normalisation into convolutions: same function, fewer layers, original model untouched."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from pipeline.backbones import build_feature_model, get_spec  # noqa: E402
from pipeline.runtime.keras import make_runner  # noqa: E402
from pipeline.runtime.fold import PassThrough, fold_batch_norm, portable_copy  # noqa: E402
from conftest import backbone_params, model_layers, randomise_statistics  # noqa: E402

# One backbone per family with batch normalisations, each a different pattern: depthwise + squeeze-excite,
# branching Inception modules, pre-activation ResNet (normalisations before convolutions), in-model rescaling,
# dense concatenation, searched cells with separable convolutions. tests/test_backbones.py checks every registered
# backbone's feature model against Keras's own.
FOLD_CHECKED = ["mobilenet_v3_small", "inception_v3", "resnet50_v2", "efficientnet_v2_b0", "densenet121",
                "nasnet_mobile"]

ALL_AFTER_CONVOLUTIONS = {"mobilenet_v3_small", "inception_v3", "efficientnet_v2_b0"}


@pytest.mark.parametrize("name", backbone_params(FOLD_CHECKED, set(FOLD_CHECKED) - {"nasnet_mobile"}))
def test_backbones_fold_to_the_same_features(name):
    spec = get_spec(name)
    size = max(spec.min_input_size, 75)
    built = build_feature_model(name, weights="none", input_size=size, alpha=min(spec.alphas) if spec.alphas else None,
                                maps=True, max_pool=True, announce=lambda m: None)
    randomise_statistics(built.model, inputs=False)
    before = [w.copy() for w in built.model.get_weights()]
    px = np.random.default_rng(1).integers(0, 256, (3, size, size, 3), dtype=np.uint8)

    folded = fold_batch_norm(built.model)
    n_norms = sum(isinstance(x, keras.layers.BatchNormalization) for x in model_layers(built.model))
    assert n_norms > 0
    n_folded = sum(isinstance(x, PassThrough) for x in model_layers(folded))
    n_kept = sum(isinstance(x, keras.layers.BatchNormalization) for x in model_layers(folded))
    assert n_folded > 0 and n_folded + n_kept == n_norms
    if name in ALL_AFTER_CONVOLUTIONS:  # every one is a conv -> BN pair
        assert n_kept == 0

    ref = {k: np.asarray(v) for k, v in built.model(px.astype("float32"), training=False).items()}
    out = make_runner(built)(px)  # the default runner is the folded one
    for kind in ("avg", "max", "maps"):
        scale = float(np.abs(ref[kind]).max())
        assert scale > 0
        np.testing.assert_allclose(out[kind], ref[kind], rtol=0, atol=1e-4 * scale)
    for w0, w1 in zip(before, built.model.get_weights()):  # the user's model keeps its own layers and weights
        np.testing.assert_array_equal(w0, w1)


def test_only_exact_conv_then_norm_patterns_are_folded():
    inp = keras.Input((9, 9, 4))
    a = keras.layers.Conv2D(6, 3, use_bias=True, name="conv_bias")(inp)
    a = keras.layers.BatchNormalization(name="bn_folded_1")(a)
    b = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, name="dw")(inp)
    b = keras.layers.BatchNormalization(name="bn_folded_2")(b)
    c = keras.layers.Conv2D(6, 3, activation="relu", name="conv_relu")(inp)
    c = keras.layers.BatchNormalization(name="bn_after_activation")(c)
    d_conv = keras.layers.Conv2D(6, 3, name="conv_two_uses")(inp)
    d = keras.layers.BatchNormalization(name="bn_shared_input")(d_conv)
    e = keras.layers.Conv2D(6, 3, name="conv_channel_axis")(inp)
    e = keras.layers.BatchNormalization(axis=1, name="bn_other_axis")(e)
    f = keras.layers.Dense(6, name="dense")(keras.layers.Flatten()(inp))
    f = keras.layers.BatchNormalization(name="bn_after_dense")(f)
    merged = keras.layers.Concatenate()([a, b, c, d, d_conv, e])
    model = keras.Model(inp, {"maps": merged, "vec": f})
    randomise_statistics(model, seed=3, inputs=False)

    folded = fold_batch_norm(model)
    kinds = {layer.name: type(layer) for layer in folded.layers}
    assert kinds["bn_folded_1"] is PassThrough and kinds["bn_folded_2"] is PassThrough
    for kept in ("bn_after_activation", "bn_shared_input", "bn_other_axis", "bn_after_dense"):
        assert issubclass(kinds[kept], keras.layers.BatchNormalization), kept
    assert folded.get_layer("conv_bias").use_bias and folded.get_layer("dw").use_bias

    x = np.random.default_rng(2).normal(0, 1, (2, 9, 9, 4)).astype("float32")
    ref, out = model(x, training=False), folded(x, training=False)
    for k in ("maps", "vec"):
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=1e-5, atol=1e-5)


def test_efficientnet_from_a_weights_file_divides_by_the_variance_as_its_imagenet_build_does(tmp_path):
    """Keras's ImageNet EfficientNet divides its input by the variance (an extra Rescaling it adds only when built
    with weights="imagenet"); built without weights and loaded from a file, the feature model must do the same."""
    mean = np.array([0.485, 0.456, 0.406], dtype="float32")
    var = np.array([0.229, 0.224, 0.225], dtype="float32") ** 2  # what Keras's ImageNet file stores
    donor = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    (norm,) = [x for x in donor.layers if isinstance(x, keras.layers.Normalization)]
    norm.adapt_mean.assign(mean)
    norm.adapt_variance.assign(var)
    norm.finalize_state()
    path = tmp_path / "effnet.weights.h5"
    donor.save_weights(path)

    def norm_out(weights):
        built = build_feature_model("efficientnet_b0", weights=weights, input_size=32, announce=lambda m: None)
        base = next(x for x in built.model.layers if isinstance(x, keras.Model))
        (n,) = [x for x in base.layers if isinstance(x, keras.layers.Normalization)]
        return np.asarray(n(np.full((1, 1, 1, 3), 0.7, dtype="float32"))).ravel()

    np.testing.assert_allclose(norm_out(str(path)), (0.7 - mean) / var, rtol=1e-5)  # not (0.7 - mean) / stddev
    np.testing.assert_allclose(norm_out("none"), 0.7, rtol=1e-6)  # random weights: statistics 0 and 1, untouched


def test_convnext_runs_as_depthwise_convolutions_and_erf_gelu_with_the_same_features():
    """ConvNeXt's depthwise convolutions are grouped Conv2D layers (TensorFlow runs them through XLA, tf2onnx cannot
    convert them) and its gelu traces to Erfc (not in ONNX): the runtimes' copy has the same function without them."""
    built = build_feature_model("convnext_tiny", weights="none", input_size=32, maps=True, announce=lambda m: None)
    rng = np.random.default_rng(0)
    for layer in model_layers(built.model):
        for w in layer.weights:
            if w.path.endswith("gamma"):  # LayerScale starts at 1e-6: make the residual branches count
                w.assign(rng.uniform(0.3, 1.0, tuple(w.shape)).astype("float32"))
    copy = portable_copy(built.model)
    grouped = [x for x in model_layers(built.model) if type(x) is keras.layers.Conv2D and x.groups > 1]
    assert len(grouped) == 18
    assert not any(type(x) is keras.layers.Conv2D and x.groups > 1 for x in model_layers(copy))
    assert sum(isinstance(x, keras.layers.DepthwiseConv2D) for x in model_layers(copy)) == 18
    assert portable_copy(fold_batch_norm(build_feature_model("mobilenet_v2", "none", 32,
                                                             announce=lambda m: None).model)) is not None
    px = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ref = {k: np.asarray(v) for k, v in built.model(px.astype("float32"), training=False).items()}
    out = make_runner(built)(px)  # the Keras runtime runs the copy
    for kind in ("avg", "maps"):
        scale = float(np.abs(ref[kind]).max())
        np.testing.assert_allclose(out[kind], ref[kind], rtol=0, atol=1e-5 * scale)
