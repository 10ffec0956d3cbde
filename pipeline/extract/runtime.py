"""Runtimes: what turns a batch of pixels into features. One interface, two implementations.

A :class:`Runtime` is built from a :class:`~pipeline.backbones.ModelConfig` and called on
``(n, s, s, 3)`` uint8 RGB pixels; it returns ``{kind: array}`` for the config's feature kinds. It also says what
it is (``name``, ``version``, ``device``, ``provider`` and a ``note``), which the cache records for every run.

* :class:`KerasRuntime` runs the Keras feature model (preprocessing built in) with its batch normalisations folded
  into the convolutions (:mod:`pipeline.extract.fold`) through a compiled ``tf.function`` on TensorFlow.
* :class:`~pipeline.extract.onnx_runtime.OnnxRuntime` runs the same model exported to ONNX
  (:mod:`pipeline.extract.onnx_export`) in ONNX Runtime: 1.4-4x faster on CPU, and CUDA / TensorRT on a GPU. It
  checks itself against the Keras model on the first real batch of every run.

:func:`make_runtime` is the one factory; ``auto`` (the default) takes ONNX Runtime when it is installed and the
export works, Keras otherwise, and says why in one line.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.backbones import BuiltBackbone, ModelConfig, build_feature_model
from pipeline.errors import HeadbenchError
from pipeline.machine import cpu_cores, gpu_available

RUNTIME_CHOICES = ("auto", "onnx", "keras")


def configure_threads() -> None:
    """Set TensorFlow up for extraction: all cores inside ops and one inter-op thread on CPU; on a GPU, memory
    growth, so that TensorFlow takes only what it needs and leaves the rest to an ONNX Runtime CUDA session.

    Measured 151 vs 139 img/s for the unfolded MobileNetV2 against TensorFlow's defaults on an AVX-512 machine; with
    batch normalisations folded (:mod:`pipeline.extract.fold`) the two settings were within noise on an AVX2 machine.
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


class RuntimeUnavailableError(HeadbenchError):
    """The runtime asked for explicitly cannot run here (``--runtime onnx`` without onnxruntime, or its export
    failed)."""


class Runtime:
    """Pixels in, features out. Subclasses set ``name``, ``version`` and ``device`` and implement :meth:`__call__`.

    Attributes
    ----------
    model : ModelConfig
    built : BuiltBackbone or None
        The Keras feature model. The ONNX runtime lets go of it once its parity check has passed, so that the
        Keras copy does not stay in memory beside the ONNX Runtime session.
    shapes : dict
        Per-row shape of each feature kind (``avg``, ``max``, ``maps``).
    name, version, device : str
        What runs the model, for logs and the cache's provenance.
    provider : str
        What executes the graph inside the runtime (``tensorflow``, ``CPUExecutionProvider``,
        ``CUDAExecutionProvider``...).
    note : str
        Why this runtime runs rather than the one asked for ("" when nothing needs saying).
    """

    name = "base"
    version = ""
    device = ""
    provider = ""

    def __init__(self, model: ModelConfig, built: BuiltBackbone) -> None:
        self.model = model
        self.built: BuiltBackbone | None = built
        d = built.feature_dim
        self.shapes: dict[str, tuple[int, ...]] = {"avg": (d,), "max": (d,), "maps": tuple(built.map_shape)}
        self.note = ""

    def describe(self) -> dict[str, str]:
        """Provenance of the run: ``runtime``, ``runtime_version``, ``device``, ``provider`` and ``note``.

        The cache stores it with every run (``run_info``). Read it after the first batch: the ONNX runtime's
        parity check may have switched it to Keras, and then says why in ``note``.
        """
        return {"runtime": self.name, "runtime_version": self.version, "device": self.device,
                "provider": self.provider, "note": self.note}

    def summary(self) -> str:
        """Runtime and version for the log (e.g. ``keras 3.15.1 (tensorflow) tensorflow 2.21.0``)."""
        return self.version if self.version.startswith(self.name) else f"{self.name} {self.version}"

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
        self.device = "GPU" if gpu_available() else f"CPU ({cpu_cores()} cores)"
        self.provider = backend
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
        from pipeline.extract.fold import fold_batch_norm, portable_copy

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


def build_model(model: ModelConfig, announce: Callable[[str], None] = print) -> BuiltBackbone:
    """The Keras feature model of ``model`` (preprocessing inside, outputs named by kind)."""
    return build_feature_model(model.backbone, model.weights, model.input_size, model.alpha,
                               maps="maps" in model.kinds, max_pool="max" in model.kinds, announce=announce)


def make_runtime(model: ModelConfig, runtime: str = "auto", log: Callable[[str], None] = print,
                 built: BuiltBackbone | None = None, parity_tolerance: float | None = None,
                 batch_size: int = 32) -> Runtime:
    """The runtime to extract with.

    Parameters
    ----------
    model : ModelConfig
    runtime : {"auto", "onnx", "keras"}
        ``keras``: the Keras model. ``onnx``: ONNX Runtime (an error when onnxruntime is missing or the model
        does not export). ``auto`` (default): ONNX Runtime when it is installed and the export works, else Keras,
        with one line saying why.
    log : callable
        Receives one-line notes (an export and its time, why another runtime than the one asked for runs).
    built : BuiltBackbone, optional
        An already built Keras feature model of ``model``.
    parity_tolerance : float, optional
        Largest ``max|onnx - keras| / max|keras|`` accepted on the first batch (default
        :data:`pipeline.extract.onnx_runtime.PARITY_TOLERANCE`).
    batch_size : int
        Largest batch the caller sends (a TensorRT engine is built for it).

    Returns
    -------
    Runtime

    Raises
    ------
    RuntimeUnavailableError
        ``runtime="onnx"`` and onnxruntime is not installed or the model cannot be exported.
    """
    if runtime not in RUNTIME_CHOICES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIME_CHOICES)}")
    note = ""
    if runtime != "keras":
        from pipeline.extract.onnx_runtime import onnxruntime_missing

        missing = onnxruntime_missing()
        if missing and runtime == "onnx":
            raise RuntimeUnavailableError(f"--runtime onnx needs ONNX Runtime ({missing}): pip install onnxruntime "
                                          f"tf2onnx (onnxruntime-gpu for a GPU), or use --runtime keras")
        if missing:
            note = f"ONNX Runtime is not available ({missing}; pip install onnxruntime tf2onnx)"
    configure_threads()  # TensorFlow runs the Keras runtime, the export and the ONNX parity reference
    built = built or build_model(model, announce=log)
    if runtime != "keras" and not note:
        from pipeline.extract.onnx_runtime import PARITY_TOLERANCE, open_onnx_runtime

        tol = PARITY_TOLERANCE if parity_tolerance is None else parity_tolerance
        try:
            return open_onnx_runtime(model, built, log=log, parity_tolerance=tol, batch_size=batch_size)
        except RuntimeUnavailableError as exc:
            if runtime == "onnx":
                raise
            note = str(exc)
    rt = KerasRuntime(model, built)
    if note:
        rt.note = note
        log(f"runtime: keras, because {note}")
    return rt
