"""The one runtime factory: which runtime extracts or predicts, and why.

:func:`make_runtime` sits above both implementations (:mod:`pipeline.runtime.keras`, :mod:`pipeline.runtime.onnx`):
``auto`` (the default) takes the runtime :func:`choose_auto` names for this machine's facts (a GPU, AVX-512,
whether ONNX Runtime is installed) and says why in the device line; when ONNX Runtime is chosen but its export
or session fails, Keras runs, saying why in one line. Callers that need another (a test's wrapped runtime, a
benchmark's prebuilt one) take a :data:`RuntimeFactory` with it as the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.backbones import BuiltBackbone, ModelConfig
from pipeline.runtime.base import Runtime, RuntimeUnavailableError
from pipeline.runtime.keras import KerasRuntime, build_model, configure_threads
from pipeline.machine import cpu_flags, gpu_available
from pipeline.runtime.onnx import GPU_PROVIDERS, PARITY_TOLERANCE, onnxruntime_missing, open_onnx_runtime
from pipeline.runtime.onnx_export import Convert, to_onnx

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
    avx512 : bool
        The CPU has AVX-512 (``avx512f``).
    """

    onnx_missing: str = ""
    onnx_gpu: bool = False
    keras_gpu: bool = False
    avx512: bool = False


def auto_facts() -> AutoFacts:
    """The facts of this machine for :func:`choose_auto` (imports TensorFlow: call it where a model is about to be
    built)."""
    missing = onnxruntime_missing()
    onnx_gpu = False
    if not missing:
        import onnxruntime as ort

        onnx_gpu = any(p in ort.get_available_providers() for p in GPU_PROVIDERS)
    return AutoFacts(missing, onnx_gpu, gpu_available(), "avx512f" in cpu_flags())


def choose_auto(facts: AutoFacts) -> tuple[str, str]:
    """The runtime ``auto`` takes, and why, in the words of the device line.

    A rule per CPU feature, from the pipeline run on both runtimes on the same images in the same run
    (``bench/extract.py``, docs/benchmarks.md "Which runtime auto takes"): with AVX-512, TensorFlow's folded model
    made as many images/s as ONNX Runtime or more (MobileNetV2 on two sets and InceptionV3, 0.98-1.39x) and needs
    no export and no parity check; without it (AVX2), ONNX Runtime made 2.2-2.4x less CPU per image. A GPU goes
    first: ONNX Runtime's CUDA / TensorRT path where it is installed, else TensorFlow's. Timing both on each run's
    first batch was not taken: it would build, export and run two models on every run to decide what this rule
    already says.

    Parameters
    ----------
    facts : AutoFacts

    Returns
    -------
    (str, str)
        ``("onnx" | "keras", why)``.
    """
    if facts.onnx_missing:
        return "keras", f"ONNX Runtime is not available ({facts.onnx_missing}; pip install onnxruntime tf2onnx)"
    if facts.onnx_gpu:
        return "onnx", "auto: onnx, ONNX Runtime has a GPU provider (CUDA / TensorRT)"
    if facts.keras_gpu:
        return "keras", "auto: keras, TensorFlow sees a GPU and the installed ONNX Runtime has no GPU provider"
    if facts.avx512:
        return "keras", ("auto: keras, with AVX-512 TensorFlow's folded model is as fast as ONNX Runtime and needs no "
                         "export or parity check")
    return "onnx", ("auto: onnx, without AVX-512 ONNX Runtime needs less CPU per image than TensorFlow "
                    "(MobileNetV2 2.2x, InceptionV3 1.3x)")


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
        runtime, why = choose_auto(facts)
        note, choice = (why, "") if facts.onnx_missing else ("", why)
    built = built or build_model(model, announce=log)
    if runtime == "onnx":
        tol = PARITY_TOLERANCE if parity_tolerance is None else parity_tolerance
        try:
            rt = open_onnx_runtime(model, built, log=log, parity_tolerance=tol, batch_size=batch_size,
                                   convert=convert)
            rt.choice = choice
            return rt
        except RuntimeUnavailableError as exc:
            if not choice:
                raise
            note = str(exc)
    rt = KerasRuntime(model, built)
    rt.choice = choice if not note else ""
    if note:
        rt.note = note
        log(f"runtime: keras, because {note}")
    return rt
