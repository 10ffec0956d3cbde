"""Moved to :mod:`pipeline.views`; kept so that ``pipeline.extract.views`` still imports.

This name is the very module object of :mod:`pipeline.views` (not a copy of its names), so patching an attribute
through either name patches the one module.
"""

import sys

from pipeline import views as _module

sys.modules[__name__] = _module
