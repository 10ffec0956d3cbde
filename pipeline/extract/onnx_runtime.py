"""Moved to :mod:`pipeline.runtime.onnx`; kept so that ``pipeline.extract.onnx_runtime`` still imports.

This name is the very module object of :mod:`pipeline.runtime.onnx` (not a copy of its
names), so patching an attribute through either name patches the one module.
"""

import sys

from pipeline.runtime import onnx as _module

sys.modules[__name__] = _module
