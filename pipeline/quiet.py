"""Keep TensorFlow's native start-up chatter out of the tool's own output.

TensorFlow's C++ layers log through absl before anything in Python can configure them: on a machine without a GPU
every process prints ``cudart_stub.cc ... Could not find cuda drivers``, ``failed call to cuInit`` and a
``WARNING: All log messages before absl::InitializeLog()`` banner, whatever ``TF_CPP_MIN_LOG_LEVEL`` says. Those
lines come from native code writing to file descriptor 2, so they can only be filtered there:
:func:`filter_native_stderr` routes descriptor 2 through a pipe and a thread that drops such lines and passes every
other byte on unchanged (the tool's own messages, Python warnings, tracebacks, real native errors).

Dropped: the absl banner, native info and warning lines (``I``/``W`` + date, as absl formats them), native
error lines about CUDA probing (CUDA, cuInit, cuDNN, cuFFT, cuBLAS, TensorRT), and Ray's harmless notice that an
actor's constructor arguments sit in its object store. Kept: every other native error or fatal line. Nothing is dropped when the user set ``TF_CPP_MIN_LOG_LEVEL`` to ``0`` or ``1``.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} [\d:. ]+\d+ [\w./-]+:\d+\]"
    rb"|E\d{4} [\d:. ]+\d+ [\w./-]+:\d+\].*(?i:cuda|cuinit|cudnn|cufft|cublas|tensorrt)"
    # Ray Data keeps actor constructor arguments in the object store and says so once per actor (ray#53727)
    rb"|\[[\d\- :,]+ E \d+ \d+\] core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
    rb"object store)"
)

_installed: dict[str, object] = {}


def is_noise(line: bytes) -> bool:
    """Whether one line of native stderr output is start-up chatter to drop."""
    return bool(_NOISE.match(line))


def filter_native_stderr() -> None:
    """Filter TensorFlow's native chatter out of this process's standard error (once per process; idempotent).

    Call it before TensorFlow is imported. Does nothing when standard error has no file descriptor or the user
    asked for TensorFlow's logs (``TF_CPP_MIN_LOG_LEVEL`` 0 or 1).
    """
    if _installed or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") in ("0", "1"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
    except (OSError, ValueError):
        return
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as src:
            while True:
                chunk = src.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                out = b"".join(line + b"\n" for line in lines if not is_noise(line))
                if out:
                    os.write(saved, out)
        if pending and not is_noise(pending):
            os.write(saved, pending)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    _installed.update(saved=saved, thread=thread)
    atexit.register(restore_stderr)


def restore_stderr() -> None:
    """Put the original standard error back and pass on what the filter still holds (runs at exit)."""
    if not _installed:
        return
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    saved = _installed.pop("saved")
    thread = _installed.pop("thread")
    os.dup2(saved, 2)  # closes the pipe's last write end held by this process: the pump sees the end
    thread.join(timeout=2.0)  # type: ignore[attr-defined]
