"""Augmented views of each image, cached beside its centre view (``extract --views K``).

A :class:`ViewSpec` says how many views each image gets, of which kinds, and the seed that makes them
deterministic per (image, view index, seed). It is part of the cache signature: rows extracted with another spec
are never mixed with these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VIEW_RULE = "headbench-views-1"
"""Version of the augmentation rule; bump it when the pixels of a view change (old views are then rebuilt)."""

VIEW_KINDS = ("flip", "crop", "rotate", "color")


@dataclass(frozen=True)
class ViewSpec:
    """How many augmented views each image gets, of which kinds, from which seed.

    Attributes
    ----------
    n : int
        Views per image besides the centre view (0: none).
    kinds : tuple of str
        Augmentation kinds among :data:`VIEW_KINDS`.
    seed : int
        Seed of the per-(image, view) random parameters.
    """

    n: int = 0
    kinds: tuple[str, ...] = ()
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        """The ``views`` attribute of a cache (``{"n": 0}`` when there are none)."""
        if not self.n:
            return {"n": 0}
        return {"n": int(self.n), "kinds": list(self.kinds), "seed": int(self.seed), "rule": VIEW_RULE}

    @classmethod
    def from_json(cls, obj: dict[str, Any] | None) -> "ViewSpec":
        """Inverse of :meth:`to_json` (``None`` or ``{"n": 0}``: no views)."""
        if not obj or not obj.get("n"):
            return NO_VIEWS
        return cls(int(obj["n"]), tuple(obj.get("kinds", ())), int(obj.get("seed", 0)))


NO_VIEWS = ViewSpec()
