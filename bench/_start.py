"""Start-up shared by the scripts under ``bench/``: the repo root on ``sys.path``, TensorFlow's native chatter off.

Every script begins with ``import _start`` and ``REPO = _start.start(__name__)`` (``python bench/NAME.py`` puts
``bench/`` on ``sys.path``, so ``_start`` imports by name); a child process of a script that is not the script
itself (a ``python -c`` snippet) puts ``bench/`` on its path and calls ``_start.start()``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start(name: str = "__main__") -> Path:
    """Put the repository root on ``sys.path`` and, in a program, filter TensorFlow's native chatter; return the root.

    Call it before anything imports TensorFlow. TensorFlow's C++ layers write their CUDA probing (``cudart_stub``,
    ``cuInit``) and absl's ``WARNING: All log messages before absl::InitializeLog()`` banner straight to file
    descriptor 2 while it is imported, before Python can configure its logging and whatever
    ``TF_CPP_MIN_LOG_LEVEL`` says, so those lines can only be dropped at the descriptor. The CLI does this the same
    way (:func:`pipeline.quiet.filter_native_stderr`, called by ``cli.main``), so a benchmark prints what the tool
    would: its own lines, warnings, tracebacks and real native errors, without the chatter. Setting
    ``TF_CPP_MIN_LOG_LEVEL`` to ``0`` or ``1`` keeps every line.

    Parameters
    ----------
    name : str
        The calling module's ``__name__``. Only ``"__main__"`` (the script that was run, or a child process that
        asks for it) replaces standard error; a bench module imported by another (``backbones.py`` uses
        ``extract.py``'s helpers) or loaded by a test (``tests/test_fit_scale.py`` loads ``fit_scale.py``) only
        gets the path, so the importing process's standard error is left as it is.

    Returns
    -------
    pathlib.Path
        The repository root (the folder holding ``cli.py`` and ``pipeline/``).
    """
    sys.path.insert(0, str(REPO))  # first, so this checkout's ``pipeline`` wins over any installed copy
    if name == "__main__":
        from pipeline.quiet import filter_native_stderr

        filter_native_stderr()
    return REPO
