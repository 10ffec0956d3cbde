"""Duplicates: exact (same file content) and near (close in the embedding), grouped into clusters and classified.

Rules
-----
* **Exact**: two images with the same content digest (SHA-256 of the file, recorded in the cache).
* **Near**: two images at a cosine distance of at most ``t``, where ``t`` is :data:`NEAR_FACTOR` times the median
  distance of an image to its nearest other image (images that are exact copies left out of that median). The
  threshold is relative to the dataset: a folder of near-identical product shots and one of varied field photos get
  thresholds on their own scale.
* **Clusters** are the connected groups of such pairs. A cluster is ``across_classes`` when it holds more than one
  class (conflicting labels, whatever its splits), else ``across_splits`` when it holds more than one split, else
  ``within_split``.
* **Leaks**: a final-split image (``val`` or ``test``) whose nearest training image is an exact or near duplicate.
  The final numbers are also given without them, and ``fit --exclude-leaks`` drops them from the final split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.audit.neighbors import Neighbours

__all__ = ["NEAR_FACTOR", "KINDS", "near_threshold", "Duplicates", "find_duplicates", "find_leaks"]

NEAR_FACTOR = 0.3
"""Near-duplicate threshold as a fraction of the median nearest-neighbour distance (see docs/audit.md for how it
was chosen)."""
KINDS = ("across_classes", "across_splits", "within_split")


def near_threshold(nn_distance: np.ndarray, factor: float = NEAR_FACTOR) -> tuple[float, float]:
    """``(threshold, median)``: ``factor`` x the median of the positive nearest-neighbour distances."""
    d = np.asarray(nn_distance, dtype=np.float64)
    d = d[np.isfinite(d) & (d > 1e-6)]
    if not len(d):
        return 0.0, 0.0
    median = float(np.median(d))
    return factor * median, median


@dataclass
class Duplicates:
    """Clusters of duplicates, most suspicious first.

    Attributes
    ----------
    rows : list of dict
        One per image in a cluster: ``cluster, row, nearest_row, distance, kind``.
    pairs : int
        Pairs of images within the threshold or of the same content.
    exact_pairs : int
        Pairs of the same content.
    counts : dict
        Clusters per kind.
    """

    rows: list[dict[str, object]]
    pairs: int
    exact_pairs: int
    counts: dict[str, int]


def _exact_pairs(digests: Sequence[str]) -> list[tuple[int, int]]:
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(digests):
        if d:
            groups.setdefault(str(d), []).append(i)
    return [(g[0], j) for g in groups.values() if len(g) > 1 for j in g[1:]]


def _nearest_in(g: np.ndarray, Z: np.ndarray, nn: Neighbours, digests: Sequence[str]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Each member's nearest other member of cluster ``g`` (positions into ``g``) and the distance to it; an exact
    copy is at distance 0 whatever the features say. Small clusters are compared in full, large ones through the
    neighbour lists (linear in the cluster's size)."""
    pos = {int(r): a for a, r in enumerate(g)}
    if len(g) <= 256:
        sims = Z[g] @ Z[g].T
        np.fill_diagonal(sims, -np.inf)
        near_i = np.argmax(sims, axis=1)
        dist = np.maximum(0.0, 1.0 - sims[np.arange(len(g)), near_i]).astype(np.float64)
    else:
        near_i = np.zeros(len(g), dtype=np.int64)
        dist = np.full(len(g), np.inf)
        for a, r in enumerate(g):
            for j, d in zip(nn.index[r], nn.distance[r]):
                if int(j) in pos and int(j) != int(r):
                    near_i[a], dist[a] = pos[int(j)], float(d)
                    break
    same: dict[str, list[int]] = {}
    for a, r in enumerate(g):
        if digests[r]:
            same.setdefault(str(digests[r]), []).append(a)
    for copies in same.values():
        for a in copies if len(copies) > 1 else ():
            near_i[a], dist[a] = (copies[1] if a == copies[0] else copies[0]), 0.0
    return near_i, dist


def find_duplicates(Z: np.ndarray, nn: Neighbours, digests: Sequence[str], labels: np.ndarray,
                    splits: np.ndarray, threshold: float) -> Duplicates:
    """Exact and near duplicates of the rows of ``Z`` from their neighbours ``nn`` (of ``Z`` against itself)."""
    n = len(Z)
    exact = _exact_pairs(digests)
    hit = (nn.index >= 0) & (nn.distance <= threshold)
    qi, kj = np.nonzero(hit)
    near = np.stack([qi, nn.index[qi, kj]], axis=1) if len(qi) else np.zeros((0, 2), np.int64)
    both = np.concatenate([near, np.asarray(exact, dtype=np.int64).reshape(-1, 2)])
    if not len(both):
        return Duplicates([], 0, 0, {k: 0 for k in KINDS})
    both = np.unique(np.sort(both, axis=1), axis=0)
    both = both[both[:, 0] != both[:, 1]]
    graph = coo_matrix((np.ones(len(both)), (both[:, 0], both[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for i in np.unique(both):
        members.setdefault(int(comp[i]), []).append(int(i))
    exact_set = {(min(a, b), max(a, b)) for a, b in exact}
    clusters = []
    for group in members.values():
        g = np.array(sorted(group))
        near_i, dist = _nearest_in(g, Z, nn, digests)
        kind = ("across_classes" if len(set(labels[g].tolist())) > 1 else
                "across_splits" if len(set(splits[g].tolist())) > 1 else "within_split")
        clusters.append((KINDS.index(kind), float(dist.min()), g, near_i, dist, kind))
    clusters.sort(key=lambda c: (c[0], c[1], int(c[2][0])))
    rows: list[dict[str, object]] = []
    for cid, (_, _, g, near_i, dist, kind) in enumerate(clusters):
        for a in np.argsort(dist, kind="stable"):
            rows.append({"cluster": cid, "row": int(g[a]), "nearest_row": int(g[near_i[a]]),
                         "distance": float(dist[a]), "kind": kind})
    counts = {k: sum(1 for c in clusters if c[5] == k) for k in KINDS}
    return Duplicates(rows, int(len(both)), len(exact_set), counts)


def find_leaks(nn: Neighbours, splits: np.ndarray, final_splits: Sequence[str], digests: Sequence[str],
               threshold: float) -> np.ndarray:
    """Boolean mask over all rows: a final-split image with an exact duplicate in train, or a training image among
    its neighbours ``nn`` (of all rows, each row's ``k`` nearest) within ``threshold``.

    A near duplicate is closer than nearly every other image, so it is among the ``k`` nearest unless more than
    ``k`` other images are nearer still (then they are near duplicates themselves, and the image is reported in
    their cluster).
    """
    splits = np.asarray(splits).astype(str)
    final = np.isin(splits, list(final_splits))
    train = splits == "train"
    train_digests = {str(d) for d, t in zip(digests, train) if t and d}
    same = np.array([bool(f and d and str(d) in train_digests) for d, f in zip(digests, final)], dtype=bool)
    ok = nn.index >= 0
    near = ok & (nn.distance <= threshold) & train[np.where(ok, nn.index, 0)]
    return same | (final & near.any(axis=1))
