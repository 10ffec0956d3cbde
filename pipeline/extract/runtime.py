"""Moved to :mod:`pipeline.runtime` (:mod:`~pipeline.runtime.base`, :mod:`~pipeline.runtime.keras`,
:mod:`~pipeline.runtime.factory`); these names are re-exported so that ``pipeline.extract.runtime`` still imports."""

from pipeline.machine import cpu_cores, gpu_available
from pipeline.runtime.base import Runtime, RuntimeUnavailableError
from pipeline.runtime.factory import RUNTIME_CHOICES, make_runtime
from pipeline.runtime.keras import KerasRuntime, build_model, configure_threads, make_runner

__all__ = ["cpu_cores", "gpu_available", "Runtime", "RuntimeUnavailableError", "RUNTIME_CHOICES", "make_runtime",
           "KerasRuntime", "build_model", "configure_threads", "make_runner"]
