"""The audit's embedding of every image: the cache's pooled vector, L2-normalised, reduced for large caches.

Cosine distance on the backbone's pooled features is the audit's notion of "looks alike" (the same as FiftyOne's and
cleanlab's image audits use). Spatial maps are pooled by their mean first. The vectors are not centred: the mean
of a dataset is its typical image, and subtracting it drags an image unlike the rest (a photo of a rocket among
ants) towards the others (measured in docs/audit.md: the five unrelated photos planted in hymenoptera rank 1-7 of
413 among outliers uncentred, 8-31 centred). Up to :data:`FULL_DIM_ROWS` rows the
vectors keep every dimension; above it they are projected on their first :data:`REDUCED_DIM` principal components
(a truncated SVD of the unit vectors, uncentred like the rest, fitted on a seeded sample of :data:`PCA_SAMPLE`
rows) and normalised again: the exact search then costs a tenth
of the full-width one, and near-duplicates, which are near in every direction, stay near.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

__all__ = ["Embedding", "embed", "FULL_DIM_ROWS", "REDUCED_DIM", "PCA_SAMPLE"]

FULL_DIM_ROWS = 20_000
REDUCED_DIM = 128
PCA_SAMPLE = 20_000
BLOCK_ROWS = 4096


@dataclass
class Embedding:
    """Unit-length rows, one per image of the run, and how they were made.

    Attributes
    ----------
    Z : ndarray of float32, shape (n, d)
    source_dim : int
        Length of the cache's pooled vector.
    reduced : bool
        Whether ``Z`` holds principal components rather than the vectors themselves.
    """

    Z: np.ndarray
    source_dim: int
    reduced: bool

    def to_json(self) -> dict[str, object]:
        """How the audit's vectors were made, for results.json."""
        return {"source_dim": int(self.source_dim), "dim": int(self.Z.shape[1]), "reduced": bool(self.reduced),
                "how": (f"pooled features, normalised, projected on their first {self.Z.shape[1]} singular "
                        f"vectors, normalised" if self.reduced else "pooled features, normalised")}


def _pooled(block: np.ndarray) -> np.ndarray:
    block = np.asarray(block, dtype=np.float32)
    if block.ndim > 2:  # spatial maps (n, h, w, c): mean over space
        block = block.reshape(len(block), -1, block.shape[-1]).mean(axis=1)
    return block


def _unit(X: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norm, 1e-12)).astype(np.float32, copy=False)


def embed(read: Callable[[np.ndarray], np.ndarray], n: int, seed: int = 0,
          full_dim_rows: int = FULL_DIM_ROWS) -> Embedding:
    """The audit's vectors of rows ``0 .. n-1``.

    Parameters
    ----------
    read : callable
        ``read(rows)`` returns the cached features of those rows (pooled vectors or spatial maps).
    n : int
        Number of rows.
    seed : int
        Seed of the sample the principal components are fitted on.
    full_dim_rows : int
        Up to this many rows the vectors keep every dimension.
    """
    blocks: Iterable[np.ndarray] = (np.arange(s, min(n, s + BLOCK_ROWS)) for s in range(0, n, BLOCK_ROWS))
    if n <= full_dim_rows:
        X = np.concatenate([_unit(_pooled(read(b))) for b in blocks]) if n else np.zeros((0, 1), np.float32)
        return Embedding(X, X.shape[1], False)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, PCA_SAMPLE), replace=False))
    S = _unit(_pooled(read(sample))).astype(np.float64)
    _, _, vt = np.linalg.svd(S, full_matrices=False)
    comps = vt[:min(REDUCED_DIM, vt.shape[0])].T.astype(np.float32)
    Z = np.concatenate([_unit(_unit(_pooled(read(b))) @ comps) for b in blocks])
    return Embedding(Z, S.shape[1], True)
