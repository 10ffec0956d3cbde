"""Runtimes: what turns a batch of pixels into features. One interface, one implementation per engine of inference.

A :class:`Runtime` is built from a :class:`~pipeline.extract.config.ModelConfig` and called on
``(n, s, s, 3)`` uint8 RGB pixels; it returns ``{kind: array}`` for the config's feature kinds. It also says what
it is (``name``, ``version``, ``device``), which the cache records for every run.

:class:`KerasRuntime` runs the Keras feature model (preprocessing built in) with its batch normalisations folded
into the convolutions (:mod:`pipeline.extract.fold`) through a compiled ``tf.function`` on the TensorFlow backend.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from pipeline.backbones import BuiltBackbone, build_feature_model
from pipeline.extract.config import ModelConfig


def gpu_available() -> bool:
    """Whether the Keras backend sees a GPU (TensorFlow backend; False elsewhere)."""
    try:
        import keras

        if keras.backend.backend() != "tensorflow":
            return False
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    except Exception:  # a broken CUDA set-up must not stop a CPU run
        return False


def configure_threads() -> None:
    """Use all cores inside ops and one inter-op thread on CPU.

    Measured 151 vs 139 img/s for the unfolded MobileNetV2 against TensorFlow's defaults on an AVX-512 machine; with
    batch normalisations folded (:mod:`pipeline.extract.fold`) the two settings were within noise on an AVX2 machine.
    """
    try:
        import keras

        if keras.backend.backend() != "tensorflow":
            return
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(os.cpu_count() or 1)
    except RuntimeError:
        pass  # the runtime is already initialised in this process; its threading is fixed


class Runtime:
    """Pixels in, features out. Subclasses set ``name``, ``version`` and ``device`` and implement :meth:`__call__`.

    Attributes
    ----------
    model : ModelConfig
    built : BuiltBackbone
        The Keras feature model (its output shapes, and the reference for parity checks).
    name, version, device : str
        What runs the model, for logs and the cache's provenance.
    """

    name = "base"
    version = ""
    device = ""

    def __init__(self, model: ModelConfig, built: BuiltBackbone) -> None:
        self.model = model
        self.built = built

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-row shape of each feature kind."""
        d = self.built.feature_dim
        return {"avg": (d,), "max": (d,), "maps": tuple(self.built.map_shape)}

    def describe(self) -> dict[str, str]:
        """``{"runtime", "runtime_version", "device"}`` for provenance."""
        return {"runtime": self.name, "runtime_version": self.version, "device": self.device}

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError


class KerasRuntime(Runtime):
    """The Keras feature model, batch normalisations folded, compiled with ``tf.function`` on TensorFlow."""

    name = "keras"

    def __init__(self, model: ModelConfig, built: BuiltBackbone, fold: bool = True) -> None:
        super().__init__(model, built)
        import keras

        backend = keras.backend.backend()
        self.version = f"keras {keras.__version__} ({backend})"
        if backend == "tensorflow":
            import tensorflow as tf

            self.version += f" tensorflow {tf.__version__}"
        self.device = "GPU" if gpu_available() else f"CPU ({os.cpu_count()} cores)"
        self._run = make_runner(built, fold=fold)

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(pixels)


def make_runner(built: BuiltBackbone, fold: bool = True) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A fast inference callable ``pixels (n, s, s, 3) -> {output name: np.ndarray}``.

    With ``fold`` (the default) it runs a copy of the model whose batch normalisations are folded into the
    convolutions before them (:func:`pipeline.extract.fold.fold_batch_norm`: the same function up to float
    rounding, 1.15-1.45x faster for MobileNetV2 on CPU). The copy takes the weights as they are now: make a new
    runner after changing them. On the TensorFlow backend the model runs in a compiled ``tf.function`` over
    ``model(x, training=False)`` with a batch-polymorphic signature (1.4-1.6x faster than ``model.predict`` on CPU,
    and no retracing on the last, smaller batch); on other backends through ``model.predict_on_batch``.
    """
    import keras

    model = built.model
    if fold:
        from pipeline.extract.fold import fold_batch_norm

        try:
            model = fold_batch_norm(model)
        except Exception:  # noqa: BLE001 - a Keras release whose graph internals moved: the unfolded model is
            model = built.model  # the same function, only slower (tests/test_fold.py catches such a release)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        sig = [tf.TensorSpec((None, built.input_size, built.input_size, 3), tf.uint8)]
        fn = tf.function(lambda x: model(x, training=False), input_signature=sig, reduce_retracing=True)

        def run(pixels: np.ndarray) -> dict[str, np.ndarray]:
            out = fn(tf.convert_to_tensor(pixels, dtype=tf.uint8))
            return {k: v.numpy() for k, v in out.items()}

        return run

    def run_generic(pixels: np.ndarray) -> dict[str, np.ndarray]:
        out = model.predict_on_batch(pixels.astype("float32"))
        return {k: np.asarray(v) for k, v in out.items()}

    return run_generic


def build_model(model: ModelConfig, announce: Callable[[str], None] = print) -> BuiltBackbone:
    """The Keras feature model of ``model`` (preprocessing inside, outputs named by kind)."""
    return build_feature_model(model.backbone, model.weights, model.input_size, model.alpha,
                               maps="maps" in model.kinds, max_pool="max" in model.kinds, announce=announce)


def make_runtime(model: ModelConfig, runtime: str = "auto", log: Callable[[str], None] = print,
                 built: BuiltBackbone | None = None) -> Runtime:
    """The runtime to extract with.

    Parameters
    ----------
    model : ModelConfig
    runtime : {"auto", "onnx", "keras"}
        Which runtime; ``auto`` picks the fastest one available.
    log : callable
        Receives one-line notes (which runtime runs, and why another was not used).
    built : BuiltBackbone, optional
        An already built Keras feature model of ``model``.

    Returns
    -------
    Runtime
    """
    configure_threads()
    built = built or build_model(model, announce=log)
    return KerasRuntime(model, built)

