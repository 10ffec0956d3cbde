"""``auto`` on a CPU: both runtimes timed once on this machine for a model, and the result kept beside its export.

Which runtime needs less CPU per image depends on the CPU and the model together, and by more than any rule of one
fact can say (docs/benchmarks.md "Which runtime auto takes"): ONNX Runtime needed 2.2x less for MobileNetV2 on AVX2
and 1.24-1.30x less on AVX-512, the same for InceptionV3 there, while on the same AVX-512 CPUs TensorFlow's folded
graph ran some of the larger backbones (ConvNeXt, ResNet) with less. So the first ``auto`` run of a model on a machine
times both on the same pixels in alternating rounds (:func:`time_runtimes`: noise of a shared machine falls on both
alike) and stores the medians in a small JSON file next to the exported model (:func:`timing_path`); later runs read
it. The stored timing is kept only for the same machine (CPU model, its feature flags, usable cores) and the same
export key (model, weights, tool versions, which the model file's name carries), so a new machine or a new
onnxruntime is timed again. A stored file that cannot be read or does not match is timed over; one that cannot be
written costs one line, and the next run times again.
"""

from __future__ import annotations

import hashlib
import json
import resource
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.atomic import write_then_commit
from pipeline.machine import cpu_cores, cpu_flags, cpu_model

TIMING_ROUNDS = 3
"""Alternating rounds after each runtime's warm-up call; the median of each runtime's rounds is kept."""
TIMING_MAX_IMAGES = 32
"""Images per timed call (at most the run's batch): a MobileNetV2 batch is ~0.2 s of CPU on 2 cores."""
TIMING_FORMAT = 2
"""Bumped when a runtime's way of running a batch changes, so that timings of the old way are taken again: 2, the CPU
session's batch runs as pieces on one thread each, several at once (:mod:`pipeline.runtime.onnx`)."""


@dataclass(frozen=True)
class Timing:
    """CPU milliseconds per image of each runtime, as measured on this machine.

    Attributes
    ----------
    keras_ms, onnx_ms : float
        Median over :data:`TIMING_ROUNDS` rounds, all threads of the process.
    source : str
        ``"timed now"``, ``"stored"`` (read from :func:`timing_path`) or ``"given"`` (handed in by a caller).
    """

    keras_ms: float
    onnx_ms: float
    source: str = "given"

    @property
    def faster(self) -> str:
        """The runtime with less CPU per image (``"onnx"`` on a tie)."""
        return "keras" if self.keras_ms < self.onnx_ms else "onnx"


def machine_key() -> dict[str, Any]:
    """What a stored timing holds for: the CPU's model name, a digest of its feature flags, and the usable cores."""
    flags = " ".join(sorted(cpu_flags()))
    return {"cpu": cpu_model(), "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "cores": cpu_cores()}


def process_cpu_seconds() -> float:
    """CPU seconds of this process so far, all threads, user + system."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def time_runtimes(runs: dict[str, Callable[[np.ndarray], Any]], pixels: np.ndarray, rounds: int = TIMING_ROUNDS,
                  clock: Callable[[], float] = process_cpu_seconds) -> dict[str, float]:
    """Median CPU milliseconds per image of each callable on ``pixels``.

    Each runs once untimed (tracing, allocations), then ``rounds`` times, alternating which goes first, so a load
    that comes and goes falls on all of them alike.

    Parameters
    ----------
    runs : dict of str to callable
        ``pixels -> anything``, by name.
    pixels : ndarray
        ``(n, s, s, 3)`` uint8.
    rounds : int
    clock : callable
        CPU seconds so far (default :func:`process_cpu_seconds`).

    Returns
    -------
    dict of str to float
    """
    for run in runs.values():
        run(pixels)
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            start = clock()
            runs[name](pixels)
            times[name].append(1000 * (clock() - start) / len(pixels))
    return {name: statistics.median(v) for name, v in times.items()}


def timing_pixels(input_size: int, batch_size: int) -> np.ndarray:
    """Fixed pseudo-random pixels to time on (the same every run: a model's cost does not depend on its input)."""
    n = max(1, min(batch_size, TIMING_MAX_IMAGES))
    return np.random.default_rng(0).integers(0, 256, (n, input_size, input_size, 3), dtype=np.uint8)


def timing_path(model_path: Path) -> Path:
    """Where the timing of the model stored at ``model_path`` is kept: beside it, ``<stem>.timing.json``."""
    return model_path.with_name(model_path.stem + ".timing.json")


def read_timing(path: Path) -> Timing | None:
    """The timing stored at ``path`` for this machine, or None (absent, unreadable, another machine or format)."""
    try:
        data = json.loads(path.read_text())
        if data.get("format") != TIMING_FORMAT or data.get("machine") != machine_key():
            return None
        ms = data["ms_per_image"]
        keras_ms, onnx_ms = float(ms["keras"]), float(ms["onnx"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if not (np.isfinite(keras_ms) and np.isfinite(onnx_ms) and keras_ms > 0 and onnx_ms > 0):
        return None
    return Timing(keras_ms, onnx_ms, "stored")


def write_timing(path: Path, timing: Timing, images: int) -> None:
    """Store ``timing`` at ``path`` atomically (:func:`pipeline.atomic.write_then_commit`).

    Raises
    ------
    OSError
        The folder cannot be written.
    """
    data = {"format": TIMING_FORMAT, "machine": machine_key(), "images": images, "rounds": TIMING_ROUNDS,
            "ms_per_image": {"keras": timing.keras_ms, "onnx": timing.onnx_ms}}
    text = json.dumps(data, indent=1)
    write_then_commit(path, lambda tmp: tmp.write_text(text))


def time_and_keep(path: Path, keras: Callable[[np.ndarray], Any], onnx: Callable[[np.ndarray], Any],
                  pixels: np.ndarray, log: Callable[[str], None] = print) -> Timing:
    """Both runtimes timed now on ``pixels`` (:func:`time_runtimes`), the result stored at ``path`` for later runs.

    Parameters
    ----------
    path : Path
        :func:`timing_path` of the exported model.
    keras, onnx : callable
        ``pixels -> features`` of each runtime (ONNX Runtime's without its first-batch check, which stays for the
        run's first real batch).
    pixels : ndarray
    log : callable
        One line saying both are timed (it costs a few batches, once per machine), one more when the result cannot
        be kept.

    Returns
    -------
    Timing
    """
    log(f"runtime: auto times keras and onnx on {len(pixels)} images ({TIMING_ROUNDS} rounds each), once on this "
        f"machine for this model")
    ms = time_runtimes({"keras": keras, "onnx": onnx}, pixels)
    timing = Timing(ms["keras"], ms["onnx"], "timed now")
    try:
        write_timing(path, timing, len(pixels))
    except OSError as exc:
        log(f"runtime: cannot keep the timing in {path} ({exc.strerror or exc}); the next run times again")
    return timing
