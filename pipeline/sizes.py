"""How the project writes a number of bytes in its lines: ``1.5 GB`` (decimal units, one decimal), one rule for
the memory plan's lines and the free-space checks alike."""

from __future__ import annotations

__all__ = ["fmt_bytes"]


def fmt_bytes(n: float) -> str:
    """``1.5 GB``-style size (decimal units: kB, MB, GB, TB; whole bytes below 1 kB).

    Parameters
    ----------
    n : float
        A size in bytes.

    Returns
    -------
    str
    """
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
