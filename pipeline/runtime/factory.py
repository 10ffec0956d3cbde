"""The one runtime factory: which runtime extracts or predicts, and why.

:func:`make_runtime` sits above both implementations (:mod:`pipeline.runtime.keras`, :mod:`pipeline.runtime.onnx`):
``auto`` (the default) takes the runtime :func:`choose_auto` names for this machine's facts (a GPU, whether
ONNX Runtime is installed, and on a CPU both runtimes timed once for the model, :mod:`pipeline.runtime.timing`) and
says why in the device line; when ONNX Runtime is chosen but its export
or session fails, Keras runs, saying why in one line. Callers that need another (a test's wrapped runtime, a
benchmark's prebuilt one) take a :data:`RuntimeFactory` with it as the default.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from pipeline.backbones import BuiltBackbone, ModelConfig, build_features
from pipeline.runtime.base import Runtime, RuntimeUnavailableError
from pipeline.runtime.keras import KerasRuntime, configure_threads
from pipeline.machine import gpu_available
from pipeline.runtime.onnx import (GPU_PROVIDERS, PARITY_TOLERANCE, OnnxRuntime, onnxruntime_missing,
                                   open_onnx_runtime)
from pipeline.runtime.onnx_export import Convert, stored_model_path, to_onnx
from pipeline.runtime.timing import Timing, read_timing, time_and_keep, timing_path, timing_pixels

RUNTIME_CHOICES = ("auto", "onnx", "keras")

@dataclass(frozen=True)
class AutoFacts:
    """What ``auto`` chooses the runtime by, as measured on the machine it runs on (:func:`auto_facts`).

    Attributes
    ----------
    onnx_missing : str
        Why ONNX Runtime cannot run here ("" when it can).
    onnx_gpu : bool
        The installed ONNX Runtime has a GPU provider (CUDA or TensorRT; ``onnxruntime-gpu`` lists them even where
        no GPU is present, and the session then says in one line that the CPU runs).
    keras_gpu : bool
        TensorFlow sees a GPU.
    measured : Timing, optional
        Both runtimes' CPU per image for the model on this machine, which decides on a CPU (:func:`make_runtime`
        reads it, or times both, :mod:`pipeline.runtime.timing`; a caller may hand one in).
    """

    onnx_missing: str = ""
    onnx_gpu: bool = False
    keras_gpu: bool = False
    measured: Timing | None = None

    @property
    def on_cpu(self) -> bool:
        """Both runtimes can run and neither has a GPU: the measured timing decides."""
        return not (self.onnx_missing or self.onnx_gpu or self.keras_gpu)


def auto_facts() -> AutoFacts:
    """The facts of this machine for :func:`choose_auto` (imports TensorFlow: call it where a model is about to be
    built)."""
    missing = onnxruntime_missing()
    onnx_gpu = False
    if not missing:
        import onnxruntime as ort

        onnx_gpu = any(p in ort.get_available_providers() for p in GPU_PROVIDERS)
    return AutoFacts(missing, onnx_gpu, gpu_available())


def choose_auto(facts: AutoFacts) -> tuple[str, str]:
    """The runtime ``auto`` takes, and why, in the words of the device line.

    A GPU goes first: ONNX Runtime's CUDA / TensorRT path where it is installed, else TensorFlow's. On a CPU, the
    runtime that needed less CPU per image when both were timed on this machine for this model
    (:mod:`pipeline.runtime.timing`): no single fact of the CPU says which, as measured (docs/benchmarks.md "Which
    runtime auto takes": ONNX Runtime 2.2x cheaper for MobileNetV2 on AVX2 and 1.24-1.30x on AVX-512, equal for
    InceptionV3 there, and TensorFlow's folded graph cheaper for some larger backbones on the same AVX-512 CPUs).

    Parameters
    ----------
    facts : AutoFacts

    Returns
    -------
    (str, str)
        ``("onnx" | "keras", why)``.

    Raises
    ------
    ValueError
        On a CPU (:attr:`AutoFacts.on_cpu`) without ``facts.measured``.
    """
    if facts.onnx_missing:
        return "keras", f"ONNX Runtime is not available ({facts.onnx_missing}; pip install onnxruntime tf2onnx)"
    if facts.onnx_gpu:
        return "onnx", "auto: onnx, ONNX Runtime has a GPU provider (CUDA / TensorRT)"
    if facts.keras_gpu:
        return "keras", "auto: keras, TensorFlow sees a GPU and the installed ONNX Runtime has no GPU provider"
    t = facts.measured
    if t is None:
        raise ValueError("on a CPU auto chooses by both runtimes' timing: AutoFacts.measured is needed")
    other = "keras" if t.faster == "onnx" else "onnx"
    ms = {"keras": t.keras_ms, "onnx": t.onnx_ms}
    return t.faster, (f"auto: {t.faster}, {ms[t.faster]:.1f} ms CPU per image against {other}'s {ms[other]:.1f} "
                      f"on this machine ({t.source})")


RuntimeFactory = Callable[..., Runtime]
"""What :func:`make_runtime` is, as the engines call it: ``(model, runtime="auto", log=print, built=None,
parity_tolerance=None, batch_size=32) -> Runtime`` (they never pass its ``convert`` or ``facts``)."""


def make_runtime(model: ModelConfig, runtime: str = "auto", log: Callable[[str], None] = print,
                 built: BuiltBackbone | None = None, parity_tolerance: float | None = None,
                 batch_size: int = 32, convert: Convert = to_onnx, facts: AutoFacts | None = None) -> Runtime:
    """The runtime to extract with.

    Parameters
    ----------
    model : ModelConfig
    runtime : {"auto", "onnx", "keras"}
        ``keras``: the Keras model. ``onnx``: ONNX Runtime (an error when onnxruntime is missing or the model
        does not export). ``auto`` (default): the one :func:`choose_auto` names for ``facts`` (its reason becomes
        the runtime's ``choice``, which the device line prints); when that is ONNX Runtime and it cannot run the
        model, Keras, with one line saying why.
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
    facts : AutoFacts, optional
        What ``auto`` chooses by (default: :func:`auto_facts` of this machine).

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
    configure_threads()  # TensorFlow runs the Keras runtime, the export and the ONNX parity reference
    note, choice = "", ""
    if runtime == "onnx":
        missing = onnxruntime_missing()
        if missing:
            raise RuntimeUnavailableError(f"--runtime onnx needs ONNX Runtime ({missing}): pip install onnxruntime "
                                          f"tf2onnx (onnxruntime-gpu for a GPU), or use --runtime keras")
    elif runtime == "auto":
        facts = facts or auto_facts()
        if facts.on_cpu:
            return _timed_on_cpu(model, built or build_features(model), log, parity_tolerance,
                                 batch_size, convert, facts)
        runtime, why = choose_auto(facts)
        note, choice = (why, "") if facts.onnx_missing else ("", why)
    built = built or build_features(model)
    if runtime == "onnx":
        try:
            rt = _open_onnx(model, built, log, parity_tolerance, batch_size, convert)
            rt.choice = choice
            return rt
        except RuntimeUnavailableError as exc:
            if not choice:
                raise
            note = str(exc)
    return _keras(model, built, log, choice, note)


def _open_onnx(model: ModelConfig, built: BuiltBackbone, log: Callable[[str], None], parity_tolerance: float | None,
               batch_size: int, convert: Convert) -> OnnxRuntime:
    tol = PARITY_TOLERANCE if parity_tolerance is None else parity_tolerance
    return open_onnx_runtime(model, built, log=log, parity_tolerance=tol, batch_size=batch_size, convert=convert)


def _keras(model: ModelConfig, built: BuiltBackbone, log: Callable[[str], None], choice: str, note: str
           ) -> KerasRuntime:
    """The Keras runtime; with ``note`` (why not ONNX Runtime, when auto wanted it) said in one line."""
    rt = KerasRuntime(model, built)
    rt.choice = choice if not note else ""
    if note:
        rt.note = note
        log(f"runtime: keras, because {note}")
    return rt


def _timed_on_cpu(model: ModelConfig, built: BuiltBackbone, log: Callable[[str], None],
                  parity_tolerance: float | None, batch_size: int, convert: Convert, facts: AutoFacts) -> Runtime:
    """auto on a CPU: the runtime with less CPU per image by the timing handed in or stored for this machine, else
    both timed now (:func:`pipeline.runtime.timing.time_and_keep`). Only what runs is built: a stored timing that
    names Keras opens no ONNX session, one that names ONNX Runtime folds no Keras copy."""
    path = timing_path(stored_model_path(model))
    measured = facts.measured or read_timing(path)
    onnx_rt: OnnxRuntime | None = None
    keras_rt: KerasRuntime | None = None
    if measured is None or measured.faster == "onnx":
        try:
            onnx_rt = _open_onnx(model, built, log, parity_tolerance, batch_size, convert)
        except RuntimeUnavailableError as exc:
            return _keras(model, built, log, "", str(exc))
        if measured is None:
            keras_rt = KerasRuntime(model, built)
            measured = time_and_keep(path, keras_rt, onnx_rt.unchecked, timing_pixels(model.input_size, batch_size),
                                     log=log)
    name, why = choose_auto(replace(facts, measured=measured))
    rt: Runtime = onnx_rt if name == "onnx" and onnx_rt is not None else keras_rt or KerasRuntime(model, built)
    rt.choice = why
    return rt
