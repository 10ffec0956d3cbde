"""Facts of the machine this process runs on: usable cores, CPU features, the default decoding workers, and whether a
GPU is seen.

Below both the extract stage's options (:mod:`pipeline.extract.config`) and the runtimes (:mod:`pipeline.runtime`),
which both need them, so neither imports the other for them.
"""

from __future__ import annotations

import os

__all__ = ["cpu_cores", "cpu_flags", "cpu_model", "decode_threads", "gpu_available", "MAX_DECODE_THREADS"]


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and ``taskset`` narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _cpuinfo_field(name: str) -> str:
    """The first value of ``name`` in ``/proc/cpuinfo`` ("" where it is absent or not readable: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (``avx2``, ``avx512f``, ...); empty where ``/proc/cpuinfo`` is not
    readable (not Linux), which callers read as "nothing known"."""
    return frozenset(_cpuinfo_field("flags").split())


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else :func:`platform.processor`, "" where neither says)."""
    import platform

    return _cpuinfo_field("model name") or platform.processor()


MAX_DECODE_THREADS = 8
"""Most decoding workers by default (threads or processes, :mod:`pipeline.reader`); the cap was measured for
threads. Each image still holds the GIL for its Python steps, so a thread pool tops out
near 1,900 hymenoptera photos/s whatever the core count; past ~8 threads the threads only queue on the GIL and slow
each other (measured on a 16-core GPU node, docs/benchmarks.md "Feeding a GPU": 16 threads decoded at 0.79x and fed
a GPU at 0.68x the rate of 8; beside ONNX Runtime on the CPU, 8 decoding threads gave 1.18x the rate of 16)."""


def decode_threads(cores: int | None = None) -> int:
    """Default decoding workers: one per core available to the process, at most :data:`MAX_DECODE_THREADS`."""
    return max(1, min(cpu_cores() if cores is None else cores, MAX_DECODE_THREADS))


def gpu_available() -> bool:
    """Whether the Keras backend sees a GPU (TensorFlow backend; False elsewhere).

    Imports Keras (and TensorFlow): call it only where a model is about to run.
    """
    try:
        import keras

        if keras.backend.backend() != "tensorflow":
            return False
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    except Exception:  # a broken CUDA set-up must not stop a CPU run
        return False
