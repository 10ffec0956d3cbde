"""Backbone registry: which frozen CNNs headbench can run, and how each one must be fed.

One :class:`BackboneSpec` per backbone binds everything that must travel together: the Keras application that
builds it, its own ``preprocess_input`` (and the equivalent per-pixel affine map that is built into the feature
model, so pixels in ``[0, 255]`` go in and no caller can feed the wrong preprocessing), its default input size,
its pooled feature dimension and where its ImageNet weights come from.

:func:`register_backbone` adds a spec (this module registers the built-in ones; a test or a plug-in can add its
own), :func:`list_backbones` lists them (the command line's ``-b`` choices) and :func:`get_spec` is the one
lookup; an unknown name raises :class:`~pipeline.errors.BackboneError` listing the registered ones.
:func:`resolve_model` checks a backbone's options and resolves its weights into a :class:`ModelConfig`, and
:func:`build_features` builds the frozen feature model of one (the one factory; :func:`build_feature_model` does both,
for scripts and tests). Keras is imported lazily so that listing the registry is instant;
where Keras's application modules expose the ImageNet weights' URL and hash, they are read from there when needed.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import BackboneError, WeightsError

_KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"


def _mobilenet_file(alpha: float, size: int) -> tuple[str, str, str | None]:
    text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}[alpha]
    rows = size if size in (128, 160, 192, 224) else 224
    name = f"mobilenet_{text}_{rows}_tf_no_top.h5"
    return name, _KERAS_APPS + "mobilenet/" + name, None


def _mobilenet_v2_file(alpha: float, size: int) -> tuple[str, str, str | None]:
    rows = size if size in (96, 128, 160, 192, 224) else 224
    name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"
    return name, _KERAS_APPS + "mobilenet_v2/" + name, None


def _fixed_file(name: str, url: str, md5: str) -> Callable[[float, int], tuple[str, str, str | None]]:
    return lambda alpha, size: (name, url, md5)


def _mobilenet_v3_file(kind: str) -> Callable[[float, int], tuple[str, str, str | None]]:
    hashes = {"small": "d3e8ec802a04aa4fc771ee12a9a9b836", "large": "07fb09a5933dd0c8eaafa16978110389"}
    name = f"weights_mobilenet_v3_{kind}_224_1.0_float_no_top_v2.h5"
    return _fixed_file(name, _KERAS_APPS + "mobilenet_v3/" + name, hashes[kind])


def _keras_module(name: str) -> Any:
    """``keras.src.applications.<name>``: where Keras keeps each application's weight URLs and hashes."""
    return importlib.import_module(f"keras.src.applications.{name}")


def _convnext_file(variant: str) -> Callable[[float, int], tuple[str, str, str | None]]:
    """ConvNeXt no-top weights: ``BASE_WEIGHTS_PATH`` and ``WEIGHTS_HASHES`` (SHA-256) of Keras's module."""

    def files(alpha: float, size: int) -> tuple[str, str, str | None]:
        m = _keras_module("convnext")
        name = f"convnext_{variant}_notop.h5"
        return name, m.BASE_WEIGHTS_PATH + name, m.WEIGHTS_HASHES[f"convnext_{variant}"][1]

    return files


def _efficientnet_file(module: str, model: str, key: str) -> Callable[[float, int], tuple[str, str, str | None]]:
    """EfficientNet (V1 or V2) no-top weights: Keras names the file after the model (``efficientnetb1``,
    ``efficientnetv2-s``) and keeps the hashes under the variant (``b1``, ``-s``)."""

    def files(alpha: float, size: int) -> tuple[str, str, str | None]:
        m = _keras_module(module)
        name = f"{model}_notop.h5"
        return name, m.BASE_WEIGHTS_PATH + name, m.WEIGHTS_HASHES[key][1]

    return files


def _resnet_file(weights_name: str) -> Callable[[float, int], tuple[str, str, str | None]]:
    """ResNet / ResNetV2 no-top weights from ``keras.src.applications.resnet`` (which ResNetV2 loads through)."""

    def files(alpha: float, size: int) -> tuple[str, str, str | None]:
        m = _keras_module("resnet")
        name = f"{weights_name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
        return name, m.BASE_WEIGHTS_PATH + name, m.WEIGHTS_HASHES[weights_name][1]

    return files


def _module_url_file(module: str, url_attr: str, name: str, md5: str) -> Callable[[float, int],
                                                                                    tuple[str, str, str | None]]:
    """Weights whose URL Keras's module exposes (``url_attr``, a full URL or a base to which ``name`` is added)
    but whose hash it only passes inline to ``get_file``: the hash here is the one in that call (Keras 3.15)."""

    def files(alpha: float, size: int) -> tuple[str, str, str | None]:
        url = getattr(_keras_module(module), url_attr)
        return name, url if url.endswith(".h5") else url + name, md5

    return files


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that defines one registered backbone.

    Attributes
    ----------
    name : str
        Registry name used on the command line.
    builder : str
        Dotted path of the Keras application constructor (``keras.applications.MobileNetV2``).
    preprocess : str
        Dotted path of the matching ``preprocess_input``; recorded in every cache.
    preprocess_mode : str
        ``"tf"`` (x / 127.5 - 1), ``"caffe"`` (RGB->BGR, minus ImageNet means), ``"torch"`` (x / 255, minus mean,
        over std) or ``"in-model"`` (the network rescales by itself; pixels in [0, 255] go in).
    default_input_size : int
        Square input side the ImageNet weights were trained at.
    feature_dim : int
        Pooled feature length at width multiplier 1.0.
    map_side : int
        Side of the last spatial feature map at the default input size (the real shape is read off the built
        model; this is for listings).
    min_input_size : int
        Smallest input side the architecture accepts.
    alphas : tuple of float
        Width multipliers with ImageNet weights (empty: no ``alpha`` argument).
    stddev_twice : bool
        The network's input Normalization divides by the variance, not the standard deviation, with pretrained
        weights (EfficientNet: Keras adds a ``Rescaling(1 / stddev)`` layer only when built with
        ``weights="imagenet"``, so a model built without weights and then loaded lacks it; see
        :func:`_divide_by_variance`).
    imagenet_file : callable
        ``(alpha, input_size) -> (file name, URL, hash or None)`` of the no-top ImageNet weights, as Keras names
        and caches them under ``$KERAS_HOME/models`` (the hash is MD5 or SHA-256, as Keras checks it).
    summary : str
        One line for ``python cli.py backbones``: what it is.
    cost : str
        Relative cost on CPU, from ``bench/backbones.py`` (docs/benchmarks.md): CPU time per image as a multiple
        of MobileNetV2's at each one's native input size.
    family : str
        Architecture lineage: ``mobilenet`` (v1-v3), ``inception`` (InceptionV3, Xception, InceptionResNetV2),
        ``resnet`` (v1, v2), ``efficientnet`` (V1, V2), ``convnext``, ``densenet``, ``nasnet``. The default tests run
        one backbone of each family through ONNX Runtime (``--every-backbone``: all of them).
    """

    name: str
    builder: str
    preprocess: str
    preprocess_mode: str
    default_input_size: int
    feature_dim: int
    map_side: int
    min_input_size: int
    imagenet_file: Callable[[float, int], tuple[str, str, str | None]]
    summary: str
    alphas: tuple[float, ...] = field(default=())
    stddev_twice: bool = False
    cost: str = ""
    family: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_backbone(spec: BackboneSpec, replace: bool = False) -> BackboneSpec:
    """Add ``spec`` to the registry (the command line's ``-b`` choices and ``backbones`` come from it).

    Parameters
    ----------
    spec : BackboneSpec
        Its ``name`` must be lower case with underscores (how :func:`get_spec` looks names up).
    replace : bool
        Allow replacing a backbone registered under the same name.

    Returns
    -------
    BackboneSpec
        ``spec``, so that the call can decorate a module-level constant.

    Raises
    ------
    BackboneError
        The name is not in registry form, or is taken and ``replace`` is False.
    """
    if _key(spec.name) != spec.name or not spec.name:
        raise BackboneError(f"backbone name {spec.name!r} must be lower case with underscores")
    if spec.name in _REGISTRY and not replace:
        raise BackboneError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_backbone(name: str) -> None:
    """Remove a registered backbone (tests that registered a toy one); unknown names are ignored."""
    _REGISTRY.pop(_key(name), None)


def list_backbones() -> list[str]:
    """Names of the registered backbones, in registration order."""
    return list(_REGISTRY)


for _spec in (
        BackboneSpec(
            name="mobilenet",
            family="mobilenet",
            builder="keras.applications.MobileNet",
            preprocess="keras.applications.mobilenet.preprocess_input",
            preprocess_mode="tf",
            default_input_size=224,
            feature_dim=1024,
            map_side=7,
            min_input_size=32,
            alphas=(1.0, 0.75, 0.5, 0.25),
            imagenet_file=_mobilenet_file,
            summary="MobileNet v1 (Howard et al. 2017); light and fast on CPU",
        ),
        BackboneSpec(
            name="mobilenet_v2",
            family="mobilenet",
            builder="keras.applications.MobileNetV2",
            preprocess="keras.applications.mobilenet_v2.preprocess_input",
            preprocess_mode="tf",
            default_input_size=224,
            feature_dim=1280,
            map_side=7,
            min_input_size=32,
            alphas=(1.0, 0.35, 0.5, 0.75, 1.3, 1.4),
            imagenet_file=_mobilenet_v2_file,
            summary="MobileNetV2 (Sandler et al. 2018); the usual fast transfer-learning default",
        ),
        BackboneSpec(
            name="inception_v3",
            family="inception",
            builder="keras.applications.InceptionV3",
            preprocess="keras.applications.inception_v3.preprocess_input",
            preprocess_mode="tf",
            default_input_size=299,
            feature_dim=2048,
            map_side=8,
            min_input_size=75,
            imagenet_file=_fixed_file(
                "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                _KERAS_APPS + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "bcbd6486424b2319ff4ef7d526e38f63",
            ),
            summary="InceptionV3 (Szegedy et al. 2015); 8x8x2048 maps at 299, ~15x the compute of MobileNetV2",
        ),
        BackboneSpec(
            name="resnet50",
            family="resnet",
            builder="keras.applications.ResNet50",
            preprocess="keras.applications.resnet50.preprocess_input",
            preprocess_mode="caffe",
            default_input_size=224,
            feature_dim=2048,
            map_side=7,
            min_input_size=32,
            imagenet_file=_fixed_file(
                "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                _KERAS_APPS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "4d473c1dd8becc155b73f8504c6f6626",
            ),
            summary="ResNet50 (He et al. 2015); caffe-style BGR mean subtraction",
        ),
        BackboneSpec(
            name="efficientnet_b0",
            family="efficientnet",
            builder="keras.applications.EfficientNetB0",
            preprocess="keras.applications.efficientnet.preprocess_input",
            preprocess_mode="in-model",
            default_input_size=224,
            feature_dim=1280,
            map_side=7,
            min_input_size=32,
            imagenet_file=_fixed_file(
                "efficientnetb0_notop.h5",
                "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
                "50bc09e76180e00e4465e1a485ddc09d",
            ),
            summary="EfficientNetB0 (Tan & Le 2019); rescales inside the network",
            stddev_twice=True,
        ),
        BackboneSpec(
            name="mobilenet_v3_small",
            family="mobilenet",
            builder="keras.applications.MobileNetV3Small",
            preprocess="keras.applications.mobilenet_v3.preprocess_input",
            preprocess_mode="in-model",
            default_input_size=224,
            feature_dim=576,
            map_side=7,
            min_input_size=32,
            imagenet_file=_mobilenet_v3_file("small"),
            summary="MobileNetV3-Small (Howard et al. 2019); rescales inside the network",
        ),
        BackboneSpec(
            name="mobilenet_v3_large",
            family="mobilenet",
            builder="keras.applications.MobileNetV3Large",
            preprocess="keras.applications.mobilenet_v3.preprocess_input",
            preprocess_mode="in-model",
            default_input_size=224,
            feature_dim=960,
            map_side=7,
            min_input_size=32,
            imagenet_file=_mobilenet_v3_file("large"),
            summary="MobileNetV3-Large (Howard et al. 2019); rescales inside the network",
        ),
        *(
            BackboneSpec(
                name=f"convnext_{v}",
                builder=f"keras.applications.ConvNeXt{v.title()}",
                preprocess="keras.applications.convnext.preprocess_input",
                preprocess_mode="in-model",
                default_input_size=224,
                feature_dim=dim,
                map_side=7,
                min_input_size=32,
                imagenet_file=_convnext_file(v),
                family="convnext",
                summary=f"ConvNeXt-{v.title()} (Liu et al. 2022), ImageNet-1k; {what}; takes [0, 255], "
                        f"normalises inside",
            )
            for v, dim, what in (("tiny", 768, "28 M weights, LayerNorm, no batch norm"),
                                 ("small", 768, "50 M weights, Tiny with 27 blocks in stage 3"),
                                 ("base", 1024, "88 M weights, Small at 4/3 the width"))
        ),
        *(
            BackboneSpec(
                name=f"efficientnet_v2_{v}",
                builder=f"keras.applications.EfficientNetV2{v.upper()}",
                preprocess="keras.applications.efficientnet_v2.preprocess_input",
                preprocess_mode="in-model",
                default_input_size=size,
                feature_dim=dim,
                map_side=side,
                min_input_size=32,
                imagenet_file=_efficientnet_file("efficientnet_v2", f"efficientnetv2-{v}", v if v != "s" else "-s"),
                family="efficientnet",
                summary=f"EfficientNetV2-{v.upper()} (Tan & Le 2021); {what}; takes [0, 255], rescales inside",
            )
            for v, size, dim, side, what in (
                ("b0", 224, 1280, 7, "6 M weights, fused-MBConv early stages"),
                ("b1", 240, 1280, 8, "7 M weights"),
                ("b2", 260, 1408, 9, "9 M weights"),
                ("b3", 300, 1536, 10, "13 M weights"),
                ("s", 384, 1280, 12, "20 M weights"),
            )
        ),
        *(
            BackboneSpec(
                name=f"efficientnet_{v}",
                builder=f"keras.applications.EfficientNet{v.upper()}",
                preprocess="keras.applications.efficientnet.preprocess_input",
                preprocess_mode="in-model",
                default_input_size=size,
                feature_dim=dim,
                map_side=side,
                min_input_size=32,
                imagenet_file=_efficientnet_file("efficientnet", f"efficientnet{v}", v),
                family="efficientnet",
                summary=f"EfficientNet{v.upper()} (Tan & Le 2019); B0 scaled to {size} px; rescales inside the network",
                stddev_twice=True,
            )
            for v, size, dim, side in (("b1", 240, 1280, 8), ("b2", 260, 1408, 9), ("b3", 300, 1536, 10))
        ),
        *(
            BackboneSpec(
                name=f"resnet{depth}_v2",
                builder=f"keras.applications.ResNet{depth}V2",
                preprocess="keras.applications.resnet_v2.preprocess_input",
                preprocess_mode="tf",
                default_input_size=224,
                feature_dim=2048,
                map_side=7,
                min_input_size=32,
                imagenet_file=_resnet_file(f"resnet{depth}v2"),
                family="resnet",
                summary=f"ResNet{depth}V2 (He et al. 2016, pre-activation); {what}; x / 127.5 - 1",
            )
            for depth, what in ((50, "24 M weights"), (101, "43 M weights"))
        ),
        BackboneSpec(
            name="xception",
            builder="keras.applications.Xception",
            preprocess="keras.applications.xception.preprocess_input",
            preprocess_mode="tf",
            default_input_size=299,
            feature_dim=2048,
            map_side=10,
            min_input_size=71,
            imagenet_file=_module_url_file("xception", "WEIGHTS_PATH_NO_TOP",
                                           "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                                           "b0042744bf5b25fce3cb969f33bebb97"),
            family="inception",
            summary="Xception (Chollet 2017); depthwise-separable Inception, 21 M weights, 10x10 maps at 299",
        ),
        BackboneSpec(
            name="inception_resnet_v2",
            builder="keras.applications.InceptionResNetV2",
            preprocess="keras.applications.inception_resnet_v2.preprocess_input",
            preprocess_mode="tf",
            default_input_size=299,
            feature_dim=1536,
            map_side=8,
            min_input_size=75,
            imagenet_file=_module_url_file("inception_resnet_v2", "BASE_WEIGHT_URL",
                                           "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                                           "d19885ff4a710c122648d3b5c3b684e4"),
            family="inception",
            summary="InceptionResNetV2 (Szegedy et al. 2016); Inception with residual connections, 54 M weights",
        ),
        *(
            BackboneSpec(
                name=f"densenet{depth}",
                builder=f"keras.applications.DenseNet{depth}",
                preprocess="keras.applications.densenet.preprocess_input",
                preprocess_mode="torch",
                default_input_size=224,
                feature_dim=dim,
                map_side=7,
                min_input_size=32,
                imagenet_file=_module_url_file("densenet", f"DENSENET{depth}_WEIGHT_PATH_NO_TOP",
                                               f"densenet{depth}_weights_tf_dim_ordering_tf_kernels_notop.h5", md5),
                family="densenet",
                summary=f"DenseNet{depth} (Huang et al. 2017); {what}; torch-style x / 255, minus mean, over std",
            )
            for depth, dim, md5, what in (
                (121, 1024, "30ee3e1110167f948a6b9946edeeb738", "7 M weights"),
                (201, 1920, "c13680b51ded0fb44dff2d8f86ac8bb1", "18 M weights"),
            )
        ),
        BackboneSpec(
            name="nasnet_mobile",
            builder="keras.applications.NASNetMobile",
            preprocess="keras.applications.nasnet.preprocess_input",
            preprocess_mode="tf",
            default_input_size=224,
            feature_dim=1056,
            map_side=7,
            min_input_size=32,
            imagenet_file=_module_url_file("nasnet", "NASNET_MOBILE_WEIGHT_PATH_NO_TOP", "nasnet_mobile_no_top.h5",
                                           "1ed92395b5b598bdda52abe5c0dbfd63"),
            family="nasnet",
            summary="NASNet-A Mobile (Zoph et al. 2018); architecture-searched cells, 4 M weights, many small ops",
        ),
):
    register_backbone(_spec)
del _spec

MEASURED_COST = {
    "mobilenet": 1.3, "mobilenet_v2": 1.0, "inception_v3": 10.1, "resnet50": 8.1, "efficientnet_b0": 2.0,
    "mobilenet_v3_small": 0.4, "mobilenet_v3_large": 1.1, "convnext_tiny": 13.2, "convnext_small": 25.2,
    "convnext_base": 52.0, "efficientnet_v2_b0": 1.9, "efficientnet_v2_b1": 3.0, "efficientnet_v2_b2": 4.0,
    "efficientnet_v2_b3": 8.4, "efficientnet_v2_s": 18.1, "efficientnet_b1": 3.0, "efficientnet_b2": 3.7,
    "efficientnet_b3": 8.0, "resnet50_v2": 6.3, "resnet101_v2": 17.4, "xception": 17.6, "inception_resnet_v2": 27.9,
    "densenet121": 5.9, "densenet201": 9.2, "nasnet_mobile": 2.7,
}
"""ONNX Runtime CPU time per image over MobileNetV2's, each at its native input size (``bench/backbones.py`` on 2
cores, 2026-12-02, docs/benchmarks.md): the ``cost`` column of ``python cli.py backbones``."""
for _name, _ratio in MEASURED_COST.items():
    _REGISTRY[_name] = replace(_REGISTRY[_name], cost=f"x{_ratio:g}")
del _name, _ratio


def get_spec(name: str) -> BackboneSpec:
    """Look up a registered backbone.

    Raises
    ------
    BackboneError
        If ``name`` is not registered; the message lists what is.
    """
    key = _key(name)
    if key not in _REGISTRY:
        raise BackboneError(f"unknown backbone {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def backbone_label(name: str, alpha: float | None, input_size: int) -> str:
    """Short, file-name-safe label of a configured backbone, e.g. ``mobilenet_v2-a1.0-224``."""
    a = f"-a{alpha:g}" if alpha is not None else ""
    if alpha is not None and float(alpha).is_integer():
        a = f"-a{alpha:.1f}"
    return f"{name}{a}-{input_size}"


def check_options(spec: BackboneSpec, input_size: int | None, alpha: float | None) -> tuple[int, float | None]:
    """Validate and fill in ``input_size`` and ``alpha`` for ``spec``.

    Returns
    -------
    (int, float or None)
        The input size and width multiplier to use (``alpha`` is None for backbones without one).
    """
    size = input_size or spec.default_input_size
    if size < spec.min_input_size:
        raise BackboneError(f"{spec.name} needs --input-size >= {spec.min_input_size}, got {size}")
    if not spec.alphas:
        if alpha not in (None, 1.0):
            raise BackboneError(f"{spec.name} has no width multiplier; drop --alpha")
        return size, None
    a = 1.0 if alpha is None else float(alpha)
    if a not in spec.alphas:
        allowed = ", ".join(f"{x:g}" for x in spec.alphas)
        raise BackboneError(f"{spec.name} supports --alpha in {{{allowed}}}, got {a:g}")
    return size, a


# ---- weights --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from.

    Attributes
    ----------
    source : str
        ``"imagenet"``, ``"file"`` or ``"none"`` (random initialisation).
    path : str
        Local file the weights were read from ("" for random).
    sha256 : str
        SHA-256 of that file ("" for random).
    """

    source: str
    path: str
    sha256: str

    @property
    def tag(self) -> str:
        """Short tag used in cache file names: ``imagenet``, ``random`` or ``w`` + 8 hex of the file hash."""
        if self.source == "none":
            return "random"
        if self.source == "imagenet":
            return "imagenet"
        return "w" + self.sha256[:8]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def keras_models_dir() -> Path:
    """Where Keras caches downloaded weights: ``$KERAS_HOME/models`` (default ``~/.keras/models``)."""
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(base) / "models"


def resolve_weights(
    spec: BackboneSpec,
    weights: str,
    input_size: int,
    alpha: float | None,
    announce: Callable[[str], None] = print,
) -> WeightsInfo:
    """Turn the ``--weights`` value into a local file (or random init), downloading only when told to.

    Parameters
    ----------
    weights : str
        ``"imagenet"`` (Keras cache, else download, announced), ``"none"``/``"random"``, or a path to a
        ``.weights.h5`` / ``.h5`` / ``.keras`` file.
    announce : callable
        Receives one line before any download starts (downloads are never hidden).

    Raises
    ------
    WeightsError
        When the file does not exist, has an unsupported type, or ImageNet weights are neither cached nor
        downloadable; the message says how to fix it.
    """
    w = weights.strip()
    if w.lower() in ("none", "random"):
        return WeightsInfo("none", "", "")
    if w.lower() == "imagenet":
        fname, url, file_hash = spec.imagenet_file(alpha if alpha is not None else 1.0, input_size)
        local = keras_models_dir() / fname
        if not local.exists():
            announce(f"downloading ImageNet weights for {spec.name}: {url} -> {local}")
            try:
                import keras

                got = keras.utils.get_file(fname, origin=url, cache_subdir="models", file_hash=file_hash)
            except Exception as exc:  # network errors surface as bare Exception from Keras
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                reason = text.rsplit(" -- ", 1)[-1] if " -- " in text else text.replace(url, "").strip(" :")
                raise WeightsError(
                    f"cannot download ImageNet weights for {spec.name} ({reason[:120] or 'no network'}): pass "
                    f"--weights PATH to a local .weights.h5/.h5/.keras file, or put {fname} (from the URL above) in "
                    f"{local.parent}, or use --weights none for random features"
                ) from None
            local = Path(got)
        return WeightsInfo("imagenet", str(local), sha256_file(local))
    path = check_weights_file(w)
    return WeightsInfo("file", str(path.resolve()), sha256_file(path))


def check_weights_file(weights: str | os.PathLike) -> Path:
    """A weights file as Keras can load one: an existing ``.weights.h5`` / ``.h5`` / ``.keras`` file.

    Raises
    ------
    WeightsError
        It does not exist, is a folder, or has another extension (Keras picks the format by it).
    """
    path = Path(weights).expanduser()
    if not path.exists():
        raise WeightsError(f"weights file {weights} does not exist; pass an existing .weights.h5/.h5/.keras file, "
                           f"'imagenet' or 'none'")
    if path.is_dir() or not (path.name.endswith(".h5") or path.suffix == ".keras"):
        raise WeightsError(f"weights file {weights} is not a .weights.h5, .h5 or .keras file")
    return path


# ---- model identity -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The frozen feature model: backbone, input size, width multiplier, weights and the outputs it returns.

    What ``extract`` caches features of and ``predict`` and ``export`` rebuild; :func:`resolve_model` makes one.
    A frozen dataclass of plain values: it pickles to Ray workers as it is.

    Attributes
    ----------
    backbone : str
        Registry name (:func:`pipeline.backbones.list_backbones`).
    input_size : int
        Square input side in pixels.
    alpha : float or None
        Width multiplier (MobileNet v1/v2), else None.
    weights : WeightsInfo
        Resolved weights (local file and SHA-256, or random).
    kinds : tuple of str
        Outputs: ``avg`` always, then ``max`` and/or ``maps`` when asked for.
    """

    backbone: str
    input_size: int
    alpha: float | None
    weights: WeightsInfo
    kinds: tuple[str, ...] = ("avg",)

    @property
    def spec(self) -> BackboneSpec:
        """The registry entry."""
        return get_spec(self.backbone)

    @property
    def label(self) -> str:
        """File-name-safe label, e.g. ``mobilenet_v2-a1.0-224``."""
        return backbone_label(self.backbone, self.alpha, self.input_size)


def resolve_model(backbone: str, weights: str | WeightsInfo, input_size: int | None = None,
                  alpha: float | None = None, kinds: tuple[str, ...] = ("avg",),
                  announce: Callable[[str], None] = print) -> ModelConfig:
    """Check a backbone's options and resolve its weights into a :class:`ModelConfig` (no model is built).

    Parameters
    ----------
    backbone : str
        Registered name.
    weights : str or WeightsInfo
        ``"imagenet"``, ``"none"`` or a weights file path (see :func:`resolve_weights`), or weights already
        resolved (kept as they are: a file is hashed once per command).
    input_size, alpha : optional
        Square input side (default: the backbone's own) and width multiplier (MobileNets).
    kinds : tuple of str
        Outputs of the feature model.
    announce : callable
        Receives one line before any download starts.

    Raises
    ------
    BackboneError, WeightsError
        Unknown backbone, an option it does not support, unusable weights.
    """
    spec = get_spec(backbone)
    size, alpha = check_options(spec, input_size, alpha)
    info = weights if isinstance(weights, WeightsInfo) else resolve_weights(spec, weights, size, alpha,
                                                                            announce=announce)
    return ModelConfig(spec.name, size, alpha, info, tuple(kinds))


# ---- model ----------------------------------------------------------------------------------------------------


@dataclass
class BuiltBackbone:
    """A frozen feature model ready to run.

    ``model`` takes a batch of RGB pixels in ``[0, 255]`` (uint8 or float) of shape ``(n, s, s, 3)``; its
    preprocessing is built in. Outputs are named ``avg`` (always), ``max`` and ``maps`` (when asked for).
    """

    spec: BackboneSpec
    model: Any
    input_size: int
    alpha: float | None
    weights: WeightsInfo
    outputs: tuple[str, ...]
    map_shape: tuple[int, int, int]
    feature_dim: int

    @property
    def label(self) -> str:
        """File-name-safe label, e.g. ``mobilenet_v2-a1.0-224``."""
        return backbone_label(self.spec.name, self.alpha, self.input_size)


def _resolve(dotted: str) -> Any:
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def weights_mismatch(exc: BaseException) -> str:
    """A short reason from Keras's weight-loading error, whose message runs over many lines.

    Keras says ``A total of N objects could not be loaded. Example error message for object <Conv2D name=x, ...>:``
    and puts the useful detail (the shapes that differ) on the next line, followed by the variable's values.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    head = re.sub(r"\.?\s*Example error message.*$", "", lines[0]).strip()
    layer = re.search(r"for object <\w+ name=([^,>]+)", lines[0])
    detail = ""
    if len(lines) > 1:
        detail = re.split(r"\s*Target variable:", lines[1])[0]
        detail = re.sub(r"^The shape of .* must match\.\s*", "", detail).strip()
    if layer and detail:
        head += f"; e.g. layer {layer.group(1)}: {detail}"
    return head[:240].rstrip(" .:")


def preprocess_layers(spec: BackboneSpec) -> list:
    """Keras layers that do exactly what ``spec``'s ``preprocess_input`` does, for pixels in [0, 255].

    Built from standard layers only (Rescaling, per channel for ``"torch"``; a fixed 1x1 convolution for the BGR
    flip), so a saved feature or exported model loads in plain Keras without custom objects.
    """
    import keras

    if spec.preprocess_mode == "tf":
        return [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess_tf")]
    if spec.preprocess_mode == "in-model":
        return [keras.layers.Rescaling(1.0, name="to_float")]
    if spec.preprocess_mode == "caffe":
        mean_bgr = np.array([103.939, 116.779, 123.68], dtype="float32")
        kernel = np.zeros((1, 1, 3, 3), dtype="float32")
        for out in range(3):
            kernel[0, 0, 2 - out, out] = 1.0
        conv = keras.layers.Conv2D(3, 1, use_bias=True, trainable=False, name="preprocess_caffe")
        conv.build((None, None, None, 3))
        conv.set_weights([kernel, -mean_bgr])
        return [keras.layers.Rescaling(1.0, name="to_float"), conv]
    if spec.preprocess_mode == "torch":  # (x / 255 - mean) / std per channel, as one affine map
        mean = np.array([0.485, 0.456, 0.406], dtype="float64")
        std = np.array([0.229, 0.224, 0.225], dtype="float64")
        return [keras.layers.Rescaling(scale=(1.0 / (255.0 * std)).tolist(), offset=(-mean / std).tolist(),
                                       name="preprocess_torch")]
    raise BackboneError(f"no preprocessing layers for mode {spec.preprocess_mode!r}")


def _divide_by_variance(base: Any) -> None:
    """Make the input Normalization of a network built without weights compute what ImageNet weights expect.

    Keras's EfficientNet stores the ImageNet variance (stddev squared) in its Normalization layer, which divides by
    sqrt(variance) = stddev; the original network divides by the variance, so Keras adds ``Rescaling(1 / stddev)``
    after it, but only when the model is built with ``weights="imagenet"``. Built without weights (as here, so that
    no download is hidden) and then loaded from a file, that layer is missing and every feature is silently off.
    Squaring the loaded variance gives the same function, (x - mean) / variance, with standard layers only.
    """
    import keras

    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.Normalization)]
    if len(norms) != 1 or getattr(norms[0], "adapt_variance", None) is None:
        raise BackboneError(f"{base.name}: expected one input Normalization layer with stored statistics, found "
                            f"{len(norms)}; this Keras version builds the network differently")
    norm = norms[0]
    norm.adapt_variance.assign(np.square(np.asarray(norm.adapt_variance)))
    norm.finalize_state()


def build_feature_model(
    name: str,
    weights: str | WeightsInfo = "imagenet",
    input_size: int | None = None,
    alpha: float | None = None,
    maps: bool = False,
    max_pool: bool = False,
    announce: Callable[[str], None] = print,
    seed: int = 0,
) -> BuiltBackbone:
    """Resolve a backbone's options (:func:`resolve_model`) and build its frozen feature model
    (:func:`build_features`): for scripts and tests that start from a name.

    Parameters
    ----------
    name : str
        Registered backbone name (see :func:`list_backbones`).
    weights : str or WeightsInfo
        ``"imagenet"``, ``"none"`` or a path (see :func:`resolve_weights`), or already resolved weights.
    input_size : int, optional
        Square input side; default the backbone's own.
    alpha : float, optional
        Width multiplier (MobileNet v1/v2 only).
    maps : bool
        Also output the last spatial feature map.
    max_pool : bool
        Also output global max pooling.
    seed : int
        Seed of the random initialisation when ``weights="none"`` (so random features are reproducible).

    Returns
    -------
    BuiltBackbone
    """
    kinds = ("avg",) + (("max",) if max_pool else ()) + (("maps",) if maps else ())
    return build_features(resolve_model(name, weights, input_size, alpha, kinds, announce=announce), seed=seed)


def build_features(model: ModelConfig, seed: int = 0) -> BuiltBackbone:
    """Build the frozen feature model of a resolved :class:`ModelConfig` (its options checked and its weights
    resolved once, by :func:`resolve_model`; nothing is checked or hashed again here).

    Parameters
    ----------
    model : ModelConfig
        Outputs ``avg``, and ``max`` / ``maps`` when its ``kinds`` name them.
    seed : int
        Seed of the random initialisation of random weights (so random features are reproducible).

    Returns
    -------
    BuiltBackbone
    """
    spec, size, a, info = model.spec, model.input_size, model.alpha, model.weights
    max_pool, maps = "max" in model.kinds, "maps" in model.kinds
    import keras

    if info.source == "none":
        keras.utils.set_random_seed(seed)
    kwargs: dict[str, Any] = {"include_top": False, "input_shape": (size, size, 3), "weights": None}
    if a is not None:
        kwargs["alpha"] = a
    try:
        base = _resolve(spec.builder)(**kwargs)
    except ValueError as exc:
        raise BackboneError(f"{spec.name} cannot be built at input size {size}: {exc}") from None
    if info.path:
        try:
            with warnings.catch_warnings():  # a mismatched file makes Keras warn once per layer before it fails
                warnings.simplefilter("ignore")
                base.load_weights(info.path)
        except Exception as exc:
            raise WeightsError(
                f"weights file {info.path} does not fit {backbone_label(spec.name, a, size)} "
                f"({weights_mismatch(exc)}); is it a file for this backbone and width multiplier?"
            ) from None
        if spec.stddev_twice:
            _divide_by_variance(base)
    base.trainable = False
    inputs = keras.Input((size, size, 3), name="pixels")
    x = inputs
    for layer in preprocess_layers(spec):
        x = layer(x)
    fmap = base(x, training=False)
    outs = {"avg": keras.layers.GlobalAveragePooling2D(name="avg")(fmap)}
    if max_pool:
        outs["max"] = keras.layers.GlobalMaxPooling2D(name="max")(fmap)
    if maps:
        outs["maps"] = fmap
    model = keras.Model(inputs, outs, name=f"{spec.name}_features")
    map_shape = tuple(int(d) for d in fmap.shape[1:])
    return BuiltBackbone(
        spec=spec,
        model=model,
        input_size=size,
        alpha=a,
        weights=info,
        outputs=tuple(outs),
        map_shape=map_shape,  # type: ignore[arg-type]
        feature_dim=int(map_shape[-1]),
    )

