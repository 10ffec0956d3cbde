"""The one runtime factory: which runtime extracts or predicts, and why.

:func:`make_runtime` sits above both implementations (:mod:`pipeline.runtime.keras`, :mod:`pipeline.runtime.onnx`):
``auto`` (the default) takes ONNX Runtime when it is installed and the export works, Keras otherwise, and says why
in one line. Callers that need another (a test's wrapped runtime, a benchmark's prebuilt one) take a
:data:`RuntimeFactory` with it as the default.
"""

from __future__ import annotations

from typing import Callable

from pipeline.backbones import BuiltBackbone, ModelConfig
from pipeline.runtime.base import Runtime, RuntimeUnavailableError
from pipeline.runtime.keras import KerasRuntime, build_model, configure_threads
from pipeline.runtime.onnx import PARITY_TOLERANCE, onnxruntime_missing, open_onnx_runtime
from pipeline.runtime.onnx_export import Convert, to_onnx

RUNTIME_CHOICES = ("auto", "onnx", "keras")

RuntimeFactory = Callable[..., Runtime]
"""What :func:`make_runtime` is, as the engines call it: ``(model, runtime="auto", log=print, built=None,
parity_tolerance=None, batch_size=32) -> Runtime`` (they never pass its ``convert``)."""


def make_runtime(model: ModelConfig, runtime: str = "auto", log: Callable[[str], None] = print,
                 built: BuiltBackbone | None = None, parity_tolerance: float | None = None,
                 batch_size: int = 32, convert: Convert = to_onnx) -> Runtime:
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
        :data:`pipeline.runtime.onnx.PARITY_TOLERANCE`).
    batch_size : int
        Largest batch the caller sends (a TensorRT engine is built for it).
    convert : callable, optional
        ``(built) -> ModelProto``: how the Keras model becomes ONNX when it is not stored yet (default
        :func:`pipeline.runtime.onnx_export.to_onnx`); an error it raises is a failed export.

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
        missing = onnxruntime_missing()
        if missing and runtime == "onnx":
            raise RuntimeUnavailableError(f"--runtime onnx needs ONNX Runtime ({missing}): pip install onnxruntime "
                                          f"tf2onnx (onnxruntime-gpu for a GPU), or use --runtime keras")
        if missing:
            note = f"ONNX Runtime is not available ({missing}; pip install onnxruntime tf2onnx)"
    configure_threads()  # TensorFlow runs the Keras runtime, the export and the ONNX parity reference
    built = built or build_model(model, announce=log)
    if runtime != "keras" and not note:
        tol = PARITY_TOLERANCE if parity_tolerance is None else parity_tolerance
        try:
            return open_onnx_runtime(model, built, log=log, parity_tolerance=tol, batch_size=batch_size,
                                     convert=convert)
        except RuntimeUnavailableError as exc:
            if runtime == "onnx":
                raise
            note = str(exc)
    rt = KerasRuntime(model, built)
    if note:
        rt.note = note
        log(f"runtime: keras, because {note}")
    return rt
