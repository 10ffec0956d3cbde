"""Moved to :mod:`pipeline.runtime.fold`; kept so that ``pipeline.extract.fold`` still imports.

This name is the very module object of :mod:`pipeline.runtime.fold` (not a copy of its
names), so patching an attribute through either name patches the one module.
"""

import sys

from pipeline.runtime import fold as _module

sys.modules[__name__] = _module
