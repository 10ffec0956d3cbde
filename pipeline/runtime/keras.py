"""The Keras runtime: the Keras feature model, batch normalisations folded, compiled with ``tf.function``.

:class:`KerasRuntime` runs the Keras feature model (preprocessing built in) with its batch normalisations folded
into the convolutions (:mod:`pipeline.runtime.fold`) through a compiled ``tf.function`` on TensorFlow.
The feature model itself is :func:`pipeline.backbones.build_features`'s (the ONNX runtime's export and parity
reference too); :func:`configure_threads` sets TensorFlow's threads up for extraction. Keras is
imported only when a model is built or run.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.backbones import BuiltBackbone, ModelConfig
from pipeline.machine import cpu_cores, gpu_available
from pipeline.runtime.base import Runtime


def configure_threads() -> None:
    """Set TensorFlow up for extraction: all cores inside ops and one inter-op thread on CPU; on a GPU, memory
    growth, so that TensorFlow takes only what it needs and leaves the rest to an ONNX Runtime CUDA session.

    Measured 151 vs 139 img/s for the unfolded MobileNetV2 against TensorFlow's defaults on an AVX-512 machine; with
    batch normalisations folded (:mod:`pipeline.runtime.fold`) the two settings were within noise on an AVX2 machine.
    """
    try:
        import keras

        if keras.backend.backend() != "tensorflow":
            return
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
            return
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(cpu_cores())
    except RuntimeError:
        pass  # the runtime is already initialised in this process; its threading is fixed


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
        self.device = "GPU" if gpu_available() else f"CPU ({cpu_cores()} cores)"
        self.provider = backend
        self._run = make_runner(built, fold=fold)

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(pixels)


def make_runner(built: BuiltBackbone, fold: bool = True) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A fast inference callable ``pixels (n, s, s, 3) -> {output name: np.ndarray}``.

    With ``fold`` (the default) it runs a copy of the model whose batch normalisations are folded into the
    convolutions before them (:func:`pipeline.runtime.fold.fold_batch_norm`: the same function up to float
    rounding, 1.15-1.45x faster for MobileNetV2 on CPU). The copy takes the weights as they are now: make a new
    runner after changing them. On the TensorFlow backend the model runs in a compiled ``tf.function`` over
    ``model(x, training=False)`` with a batch-polymorphic signature (1.4-1.6x faster than ``model.predict`` on CPU,
    and no retracing on the last, smaller batch); on other backends through ``model.predict_on_batch``.
    """
    import keras

    model = built.model
    if fold:
        from pipeline.runtime.fold import fold_batch_norm, portable_copy

        try:  # and ConvNeXt's grouped convolutions as depthwise ones (TensorFlow runs a grouped one through XLA)
            model = portable_copy(fold_batch_norm(model))
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
