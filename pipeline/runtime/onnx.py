"""The ONNX Runtime implementation of :class:`~pipeline.runtime.base.Runtime`, checked against Keras every run.

:func:`open_onnx_runtime` exports the Keras feature model once (:mod:`pipeline.runtime.onnx_export`; later runs
reuse the stored file), opens an ONNX Runtime session on the best execution provider present and returns an
:class:`OnnxRuntime`.

Parity check
------------
On the first real batch of every run (the first call whose pixels are not all zero: the engines' warm-up batch is
zeros) the session is checked. When the stored file carries the probe features its export computed with Keras
(:mod:`pipeline.runtime.probe`), the session runs the probe and is held to them, and the batch's features must be
finite: no Keras run (0.1 ms instead of 1.1 ms of CPU per image of a 398-image folder, docs/benchmarks.md).
Otherwise (a file exported before probes, or a probe that does not match) up to :data:`PARITY_IMAGES` images of the
batch also go through the Keras model, eagerly, in float32 on the CPU. ``describe()["parity_check"]`` records which (``stored probe`` or ``keras``). If
``max|onnx - keras| / max|keras|`` of any output exceeds :data:`PARITY_TOLERANCE` the runtime tries the next
execution provider (a GPU provider that computes in reduced precision), and in the end falls back to Keras for the
whole run, with one log line that says why; the reason is in :meth:`OnnxRuntime.describe`'s ``note``, which the
cache records with the run. Once the check has passed the runtime lets go of the Keras model; after an eager Keras
reference it also returns that reference's memory to the system (:func:`release_memory`), so neither stays beside
the session: that check raises peak memory for a few seconds only.

A gross mismatch on the CPU provider (above :data:`GROSS_MISMATCH`: no rounding does that; the stored file's weights
are damaged while its key still matches) exports the model again, once per run, with a line naming the stored file,
and the check starts over on every provider with the new file. If the new file still fails, or cannot be exported,
the run goes on as above (next provider, then Keras) and the line says so.

Execution providers
-------------------
:func:`choose_providers` orders what the installed onnxruntime offers: TensorRT (only when its libraries are
installed too; float32, engines cached beside the exported models), then CUDA (TF32 off, so it computes in full
float32 like the CPU), then the CPU. With ``onnxruntime-gpu`` and a GPU, extraction runs on the GPU; a provider
that cannot start is skipped with one log line.

Threads
-------
On the CPU a batch runs as pieces of :data:`PIECE_IMAGES` images, one run per core at a time, each run on one thread
(:func:`cpu_lanes`, :func:`batch_pieces`), instead of one run of the whole batch over one thread per core: a small
piece's activations stay in the core's caches, and a run on one thread has no parallel section where one thread
waits for another that the decoding threads (or anything else) have taken the core from. MobileNetV2 ran 1.45x
faster for it on a 2-core machine, EfficientNet-B0 1.34x, ConvNeXt-T 1.29x, ResNet50 1.10x, InceptionV3 1.01x, with
features bit for bit the same (docs/benchmarks.md). Spinning is off: a spinning thread burns the time the decoding
threads need. On a GPU provider, one run of the whole batch, with one CPU thread for the few nodes left on the CPU.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.backbones import BuiltBackbone, ModelConfig
from pipeline.machine import cpu_cores
from pipeline.runtime.base import Runtime, RuntimeUnavailableError
from pipeline.runtime.keras import KerasRuntime
from pipeline.runtime.onnx_export import Convert, ExportError, ensure_exported, file_identity, to_onnx
from pipeline.runtime.probe import PROBE_PROP, decode_probe, keras_features, probe_pixels, relative_difference

PARITY_TOLERANCE = 1e-4
"""Largest accepted ``max|onnx - keras| / max|keras|`` on the first batch (float32 runtimes agree to ~1e-6)."""
GROSS_MISMATCH = 0.1
"""A parity difference above this (x max|Keras|) on the CPU provider means a damaged stored model, not rounding:
float32 runtimes agree to ~1e-6, and the largest rounding differences measured are 7.8e-3 (TF32 on a GPU) and 5.5e-3
(EfficientNetV2 with very wide random batch-norm statistics, Keras against its own folded copy; docs/benchmarks.md),
more than ten times below it, while damaged weights give differences of the order of the features themselves."""
PARITY_IMAGES = 2
"""Images of the first batch also run through the Keras model for the parity check. An export or runtime fault
shows on any image; the eager reference costs ~0.15 s of CPU per MobileNetV2 image (measured: 1.1-1.5 s for 8
images), which 398 images at 150 img/s would feel."""
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"


def onnxruntime_missing() -> str:
    """Why ONNX Runtime cannot be used here ("" when it can be imported)."""
    try:
        import onnxruntime  # noqa: F401  (only whether it imports)
    except ImportError:
        return "onnxruntime is not installed"
    return ""


def choose_providers(available: Sequence[str], tensorrt_libraries: bool) -> list[str]:
    """Execution providers to try, best first: TensorRT, CUDA, then the CPU (always last).

    Parameters
    ----------
    available : sequence of str
        ``onnxruntime.get_available_providers()``: what the installed build was compiled with (``onnxruntime-gpu``
        lists CUDA and TensorRT even on a machine without a GPU; the session then says what really runs).
    tensorrt_libraries : bool
        Whether TensorRT's own libraries are installed (the TensorRT provider needs them beside onnxruntime-gpu).
    """
    order = []
    if "TensorrtExecutionProvider" in available and tensorrt_libraries:
        order.append("TensorrtExecutionProvider")
    if "CUDAExecutionProvider" in available:
        order.append("CUDAExecutionProvider")
    return order + [CPU_PROVIDER]


def tensorrt_installed() -> bool:
    """Whether TensorRT's libraries can be found (the ``tensorrt`` wheels, or ``libnvinfer`` on the system)."""
    import ctypes.util
    import importlib.util

    for mod in ("tensorrt_libs", "tensorrt"):
        with contextlib.suppress(ImportError, ValueError):
            if importlib.util.find_spec(mod) is not None:
                return True
    return ctypes.util.find_library("nvinfer") is not None


PIECE_IMAGES = 2
"""Most images per ONNX Runtime run on the CPU (see the module's Threads). CPU ms per image against one run of 32
images on 2 threads, 2-core Intel Xeon with AVX-512, pieces run two at a time: MobileNetV2 7.78 -> 5.50 (pieces of
4: 5.95), EfficientNet-B0 15.59 -> 12.02 (12.36), ConvNeXt-T 112.1 -> 88.6 (93.2), ResNet50 52.6 -> 48.4 (46.6),
InceptionV3 67.0 -> 66.7 (64.3); pieces of 1 were no faster than 2, and gave ConvNeXt-T other last bits (2e-7)."""


def cpu_lanes(cores: int, provider: str) -> int:
    """Runs of one batch's pieces at a time: one per core on the CPU provider, one (the whole batch) with a GPU
    provider. Each run has one ONNX Runtime thread."""
    return 1 if provider in GPU_PROVIDERS else max(1, cores)


def batch_pieces(n: int, lanes: int, most: int = PIECE_IMAGES) -> list[slice]:
    """The pieces ``n`` images run in: consecutive, as even as can be, at most ``most`` images each when that gives
    every lane one or more (more pieces otherwise, down to ones of 2 images), never a piece of one image unless the
    batch is one, and a single piece with one lane.

    Examples
    --------
    >>> [s.stop - s.start for s in batch_pieces(7, 2)]
    [3, 2, 2]
    >>> [s.stop - s.start for s in batch_pieces(32, 16, 4)]
    [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    """
    if lanes <= 1 or n <= 1:
        return [slice(0, n)]
    count = min(max(math.ceil(n / max(1, most)), lanes), n // 2)  # n // 2: pieces of 2 images or more
    base, extra = divmod(n, count)
    bounds = [i * base + min(i, extra) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def provider_options(provider: str, input_size: int, batch_size: int, cache_dir: Path) -> dict[str, Any]:
    """Options of one execution provider: float32 everywhere (the parity check holds GPUs to the CPU's results)."""
    if provider == "CUDAExecutionProvider":
        return {"use_tf32": 0}
    if provider == "TensorrtExecutionProvider":
        shape = lambda n: f"pixels:{n}x{input_size}x{input_size}x3"  # noqa: E731
        return {"trt_fp16_enable": False, "trt_int8_enable": False, "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache_dir / "tensorrt"), "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache_dir / "tensorrt"), "trt_profile_min_shapes": shape(1),
                "trt_profile_opt_shapes": shape(batch_size), "trt_profile_max_shapes": shape(batch_size)}
    return {}


def make_session(path: Path, providers: Sequence[str], threads: int, input_size: int, batch_size: int) -> Any:
    """An ONNX Runtime session on ``providers`` (best first; ONNX Runtime drops one that cannot start)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: a provider that cannot start is reported by this module
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # On the CPU, no memory pattern: with it the second run allocates the whole pattern afresh, and in a process
    # that has loaded TensorFlow its page faults cost 1.0-1.5 s of system time for InceptionV3 (0.1 s without
    # TensorFlow), paid by a run's first real batch; without it runs reuse the arena's blocks, the same speed from
    # the third run on, and the peak RSS is lower (docs/benchmarks.md). GPU providers keep it (not measured there).
    so.enable_mem_pattern = bool(providers) and providers[0] in GPU_PROVIDERS
    if any(p in GPU_PROVIDERS for p in providers) and hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
            ort.preload_dlls(msvc=False)  # CUDA / cuDNN from the nvidia-* wheels that the [gpu] extra installs
    opts = [(p, provider_options(p, input_size, batch_size, path.parent)) for p in providers]
    return ort.InferenceSession(str(path), so, providers=opts, enable_fallback=0)


class OnnxRuntime(Runtime):
    """The exported feature model in an ONNX Runtime session, checked against Keras on the first real batch.

    Parameters
    ----------
    model : ModelConfig
    built : BuiltBackbone
        The Keras feature model the file was exported from (the parity reference, and the fallback).
    path : Path
        The exported ``.onnx`` file.
    providers : sequence of str
        Execution providers to try, best first (:func:`choose_providers`).
    log : callable
    parity_tolerance : float
    batch_size : int
        Largest batch the engines send (TensorRT builds its engine for it).
    session_factory : callable, optional
        ``(path, providers, threads, input_size, batch_size) -> session``; :func:`make_session` by default.
    reexport : callable, optional
        ``(built) -> path``: exports the model again over a stored file found damaged (a gross mismatch on the CPU
        provider, :data:`GROSS_MISMATCH`); called at most once. None: never (the mismatch falls back as any other).
    cores : int, optional
        Cores the CPU provider's pieces run on at once (:func:`cpu_lanes`; this process's usable cores by default).
    """

    name = "onnxruntime"

    def __init__(self, model: ModelConfig, built: BuiltBackbone, path: Path, providers: Sequence[str],
                 log: Callable[[str], None] = print, parity_tolerance: float = PARITY_TOLERANCE,
                 batch_size: int = 32, session_factory: Callable[..., Any] = make_session,
                 reexport: Callable[[BuiltBackbone], Path] | None = None, cores: int | None = None) -> None:
        super().__init__(model, built)
        import onnxruntime as ort

        self.path = path
        self.version = ort.__version__
        self.log = log
        self.tolerance = parity_tolerance
        self.batch_size = batch_size
        self._factory = session_factory
        self._keras: KerasRuntime | None = None
        self._checked = False
        self.parity = ""
        self.parity_check = ""
        self._providers = list(providers)
        self._all_providers = list(providers)
        self._reexport = reexport
        self._reexported = False
        self.threads = 1  # ONNX Runtime's threads per run (see the module's Threads)
        self.cores = cores or cpu_cores()
        self._lanes_pool: ThreadPoolExecutor | None = None
        self._open(self._providers)

    def _open(self, providers: list[str]) -> None:
        """Open a session on the first of ``providers`` that starts; record what really runs."""
        while True:
            self.lanes = cpu_lanes(self.cores, providers[0])
            try:
                self._session = self._factory(self.path, providers, self.threads, self.model.input_size,
                                              self.batch_size)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                if len(providers) == 1:
                    raise RuntimeUnavailableError(f"ONNX Runtime cannot open {self.path.name} on {providers[0]} "
                                                  f"({_first_line(exc)})") from exc
                self.log(f"runtime: {providers[0]} cannot start ({_first_line(exc)}); trying {providers[1]}")
                providers = providers[1:]
                continue
            break
        got = list(self._session.get_providers())
        self.provider = got[0] if got else CPU_PROVIDER
        if self.provider != providers[0]:
            self.log(f"runtime: {providers[0]} is installed but could not start (a GPU, or its CUDA / cuDNN / "
                     f"TensorRT libraries, missing?); ONNX Runtime runs on {self.provider}")
            self.lanes = cpu_lanes(self.cores, self.provider)
        self._providers = providers[providers.index(self.provider):] if self.provider in providers else [self.provider]
        self.device = (f"GPU ({self.provider.replace('ExecutionProvider', '')})" if self.provider in GPU_PROVIDERS
                       else f"CPU ({cpu_cores()} cores)")
        self._input = self._session.get_inputs()[0].name
        self._outputs = [o.name for o in self._session.get_outputs()]
        modelmeta = getattr(self._session, "get_modelmeta", None)  # stand-in sessions of tests may have none
        stored = modelmeta().custom_metadata_map.get(PROBE_PROP) if modelmeta is not None else None
        self._probe = decode_probe(stored, self.model.input_size)

    def describe(self) -> dict[str, str]:
        """Runtime provenance (see :meth:`Runtime.describe`), plus ``threads``, ``parity`` (the difference found)
        and ``parity_check`` (what it was measured against: ``stored probe`` or ``keras``)."""
        if self._keras is not None:
            return {**self._keras.describe(), "note": self.note, "parity": self.parity,
                    "parity_check": self.parity_check}
        return {**super().describe(), "threads": str(self.threads), "runs_at_once": str(self.lanes),
                "parity": self.parity, "parity_check": self.parity_check}

    def summary(self) -> str:
        if self._keras is not None:
            return self._keras.summary()
        lanes = (f", pieces of {PIECE_IMAGES} images, {self.lanes} at once on one thread each"
                 if self.provider not in GPU_PROVIDERS else "")
        return f"{self.name} {self.version} ({self.provider}{lanes})"

    def _run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The session's outputs for ``pixels``: one run, or on the CPU its pieces' runs, :attr:`lanes` at once."""
        x = np.ascontiguousarray(pixels, dtype=np.uint8)
        pieces = batch_pieces(len(x), self.lanes)
        if len(pieces) == 1:
            return dict(zip(self._outputs, self._session.run(self._outputs, {self._input: x})))
        if self._lanes_pool is None:
            self._lanes_pool = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="onnx-run")
        parts = list(self._lanes_pool.map(lambda s: self._session.run(self._outputs, {self._input: x[s]}), pieces))
        return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(self._outputs)}

    def unchecked(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The session's outputs, without the first-batch check (which stays for the first real batch): for timing
        the session (:mod:`pipeline.runtime.timing`)."""
        return self._run(pixels)

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        if self._keras is not None:
            return self._keras(pixels)
        out = self._run(pixels)
        if not self._checked and pixels.any():
            out = self._check(pixels, out)
        return out

    def _reference(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The Keras model's outputs, eagerly and in float32 on the CPU."""
        return {k: v for k, v in keras_features(self.built, pixels).items() if k in self._outputs}

    def _check(self, pixels: np.ndarray, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check the session on the first real batch: by the stored probe when the file has one and the batch's
        features are finite (:mod:`pipeline.runtime.probe`), else against Keras on the batch's first images; export
        a damaged file again, then try the next provider, then Keras, if they differ."""
        if self._probe is not None and all(np.isfinite(v).all() for v in out.values()) and self._probe_passes():
            return out
        sub = pixels[:PARITY_IMAGES]
        ref = self._reference(sub)
        while True:
            err = relative_difference({k: v[:len(sub)] for k, v in out.items()}, ref)
            self.parity, self.parity_check = f"{err:.1e}", "keras"
            if err <= self.tolerance:
                self._passed()
                return out
            reason = (f"ONNX Runtime ({self.provider}) differs from Keras by {err:.1e} x max|Keras| (tolerance "
                      f"{self.tolerance:.0e}) on the first batch")
            if self._reexported:
                reason += f", also after {self.path.name} was exported again"
            if self._damaged(err):
                if self._export_again(reason):
                    out = self._run(pixels)
                    continue
                reason = self.note
            if len(self._providers) > 1:
                self.log(f"runtime: {reason}; trying {self._providers[1]}")
                self.note = reason
                self._open(self._providers[1:])
                out = self._run(pixels)
                continue
            return self._fall_back(pixels, reason)

    def _probe_passes(self) -> bool:
        """Run the probe through this session and compare with the features stored at export (True: checked)."""
        err = relative_difference(self._run(probe_pixels(self.model.input_size)), self._probe)  # type: ignore[arg-type]
        if err > self.tolerance:
            return False  # checked against Keras on the real batch, which says what is wrong
        self.parity, self.parity_check = f"{err:.1e}", "stored probe"
        self._passed(collect=False)
        return True

    def _passed(self, collect: bool = True) -> None:
        """The session is checked: the Keras model may go. After an eager Keras reference, its freed arenas go back
        to the system (:func:`release_memory`); after the probe there are none, and a full garbage collection of
        TensorFlow's objects would cost 0.15-0.2 s of CPU on the first batch for nothing."""
        self._checked = True
        self.built = None
        self._reexport = None
        if collect:
            release_memory()

    def _damaged(self, err: float) -> bool:
        """Whether a parity difference ``err`` says the stored file is damaged and it may still be exported again."""
        return (err > GROSS_MISMATCH and self.provider == CPU_PROVIDER and self._reexport is not None
                and not self._reexported)

    def _export_again(self, reason: str) -> bool:
        """Export the model again over the damaged stored file and reopen it on every provider (True when done;
        False, with the reason in ``note``, when the export or the new session failed)."""
        self._reexported = True
        reexport, self._reexport = self._reexport, None
        self.log(f"runtime: {reason}: the stored model {self.path} looks damaged; exporting it again")
        try:
            self.path = reexport(self.built)  # type: ignore[misc, arg-type]
        except ExportError as exc:
            self.note = (f"{reason}; the stored model {self.path} looks damaged and could not be replaced ({exc}); "
                         f"delete it")
            return False
        try:
            self._open(list(self._all_providers))
        except RuntimeUnavailableError as exc:
            self.note = f"{reason}; {self.path.name} was exported again but does not open ({exc})"
            return False
        return True

    def _fall_back(self, pixels: np.ndarray, reason: str) -> dict[str, np.ndarray]:
        """Run on Keras from here on (one line with ``reason``); Keras's features of ``pixels``."""
        self.log(f"runtime: keras, because {reason}")
        self.note = reason
        self.choice = ""  # auto's reason was for ONNX Runtime, which no longer runs: the note says why
        self._checked = True
        self._session = None
        self._keras = KerasRuntime(self.model, self.built)  # type: ignore[arg-type]
        self.name, self.version, self.device, self.provider = (self._keras.name, self._keras.version,
                                                               self._keras.device, self._keras.provider)
        return self._keras(pixels)


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc keeps it otherwise).

    The eager Keras reference of the parity check leaves ~0.5 GB of freed memory in the allocator's arenas
    (MobileNetV2, measured); without this the process would keep it for the whole run.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)


def open_onnx_runtime(model: ModelConfig, built: BuiltBackbone, log: Callable[[str], None] = print,
                      parity_tolerance: float = PARITY_TOLERANCE, batch_size: int = 32,
                      convert: Convert = to_onnx) -> OnnxRuntime:
    """Export (or reuse) the ONNX model of ``built`` and open it on the best execution provider present.

    Parameters
    ----------
    model : ModelConfig
    built : BuiltBackbone
        The Keras feature model (exported when its ONNX model is not stored yet; the parity reference).
    log : callable
    parity_tolerance : float
    batch_size : int
        Largest batch the caller sends.
    convert : callable, optional
        ``(built) -> ModelProto``, the conversion of an export (default
        :func:`pipeline.runtime.onnx_export.to_onnx`); also that of the export again over a damaged stored file.

    Raises
    ------
    RuntimeUnavailableError
        The model cannot be exported or opened, or the store cannot be used (one line with the reason).
    """
    import onnxruntime as ort

    warn_two_builds(log)
    try:
        path = ensure_exported(model, built, log=log, convert=convert)
    except ExportError as exc:
        raise RuntimeUnavailableError(str(exc)) from None
    identity = file_identity(path)

    def reexport(reference: BuiltBackbone) -> Path:
        """Export ``model`` again over the stored file opened here (found damaged by the parity check)."""
        return ensure_exported(model, reference, log=log, replacing=identity, convert=convert)

    providers = choose_providers(ort.get_available_providers(), tensorrt_installed())
    return OnnxRuntime(model, built, path, providers, log=log, parity_tolerance=parity_tolerance,
                       batch_size=batch_size, reexport=reexport)


def warn_two_builds(log: Callable[[str], None]) -> None:
    """One line when both the CPU and the GPU build of onnxruntime are installed (they overwrite each other)."""
    import importlib.metadata as md

    have = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(md.PackageNotFoundError):
            md.version(dist)
            have.append(dist)
    if len(have) == 2:
        log("warning: both onnxruntime and onnxruntime-gpu are installed and share one module; for the GPU run "
            "`pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`")
