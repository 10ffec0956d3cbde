"""Nearest neighbours of image embeddings by cosine distance: exact and blocked up to a stated size, an index above.

Rows are L2-normalised embeddings, so the cosine distance of two rows is ``1 - x . y``. Three ways, chosen by the
number of rows (:func:`choose_search`):

* up to :data:`EXACT_MAX_ROWS` rows, an **exact** search: blocks of query rows times every row (one matrix product
  per block, sized to the memory share), the ``k`` smallest of each row kept. With ``faiss-cpu`` installed
  (``pip install headbench[audit]``) its exact flat index does the same search about 4x faster (its selection of
  the ``k`` smallest runs in native code); the result is the same up to float rounding.
* above it, with ``faiss-cpu``, an **approximate** graph index (HNSW, 32 links per node): on 2 cores a million rows
  of 128 dimensions take minutes where the exact search would take hours; neighbours it misses make a few
  near-duplicates and outlier scores go unseen, never invent one (every reported distance is a real distance).
* above it without ``faiss-cpu`` the search is skipped, and the audit says so in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Neighbours", "knn", "choose_search", "EXACT_MAX_ROWS", "have_faiss"]

EXACT_MAX_ROWS = 200_000
"""Largest number of rows searched exactly (about a minute at 100,000 rows of 128 dimensions on 2 cores)."""
HNSW_LINKS = 32
HNSW_EF_SEARCH = 64


def have_faiss() -> bool:
    """Whether ``faiss-cpu`` can be imported (the ``audit`` extra)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def choose_search(n_rows: int, faiss_ok: bool | None = None) -> str:
    """``"exact"``, ``"faiss-flat"``, ``"faiss-hnsw"`` or ``"skipped"`` for ``n_rows`` rows."""
    ok = have_faiss() if faiss_ok is None else faiss_ok
    if n_rows <= EXACT_MAX_ROWS:
        return "faiss-flat" if ok else "exact"
    return "faiss-hnsw" if ok else "skipped"


@dataclass
class Neighbours:
    """The ``k`` nearest other rows of each query row.

    Attributes
    ----------
    index : ndarray of int64, shape (n_query, k)
        Row numbers into the reference rows, nearest first; -1 where fewer than ``k`` other rows exist.
    distance : ndarray of float32, shape (n_query, k)
        Cosine distances (``inf`` where ``index`` is -1).
    method : str
        How they were found (see :func:`choose_search`).
    """

    index: np.ndarray
    distance: np.ndarray
    method: str


def _exact(Q: np.ndarray, R: np.ndarray, k: int, self_rows: np.ndarray | None, block_bytes: int
           ) -> tuple[np.ndarray, np.ndarray]:
    nq, nr = len(Q), len(R)
    kk = min(k, nr - (1 if self_rows is not None else 0))
    idx = np.full((nq, k), -1, dtype=np.int64)
    dist = np.full((nq, k), np.inf, dtype=np.float32)
    if kk <= 0:
        return idx, dist
    block = int(max(16, min(4096, block_bytes // max(1, 8 * nr))))
    for s in range(0, nq, block):
        sim = Q[s:s + block] @ R.T
        if self_rows is not None:
            sim[np.arange(len(sim)), self_rows[s:s + block]] = -np.inf
        part = np.argpartition(-sim, kk - 1, axis=1)[:, :kk] if kk < nr else np.argsort(-sim, axis=1)[:, :kk]
        top = np.take_along_axis(sim, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        idx[s:s + block, :kk] = np.take_along_axis(part, order, axis=1)
        dist[s:s + block, :kk] = 1.0 - np.take_along_axis(top, order, axis=1)
    return idx, dist


def _faiss(Q: np.ndarray, R: np.ndarray, k: int, self_search: bool, method: str
           ) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    d = R.shape[1]
    if method == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        index.add(np.ascontiguousarray(R, dtype=np.float32))
        index.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * k + 2)
    else:
        index = faiss.IndexFlatIP(d)
        index.add(np.ascontiguousarray(R, dtype=np.float32))
    extra = 1 if self_search else 0
    sim, idx = index.search(np.ascontiguousarray(Q, dtype=np.float32), min(len(R), k + extra))
    idx = idx.astype(np.int64)
    if self_search:  # drop each row itself (wherever the index placed it among equal distances)
        is_self = idx == np.arange(len(Q))[:, None]
        order = np.argsort(is_self, axis=1, kind="stable")[:, :k]  # non-self first, in the index's order
        idx, sim = np.take_along_axis(idx, order, axis=1), np.take_along_axis(sim, order, axis=1)
        pad = k - idx.shape[1]
        if pad > 0:
            idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
            sim = np.pad(sim, ((0, 0), (0, pad)), constant_values=-np.inf)
    else:
        pad = k - idx.shape[1]
        if pad > 0:
            idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
            sim = np.pad(sim, ((0, 0), (0, pad)), constant_values=-np.inf)
    dist = np.where(idx >= 0, 1.0 - sim, np.inf).astype(np.float32)
    return idx, dist


def knn(R: np.ndarray, k: int, Q: np.ndarray | None = None, *, method: str | None = None,
        block_bytes: int = 256 * 2**20) -> Neighbours:
    """The ``k`` nearest rows of ``R`` to every row of ``Q`` (to every other row of ``R`` when ``Q`` is None).

    Parameters
    ----------
    R : ndarray, shape (n, d)
        Reference rows, L2-normalised.
    k : int
    Q : ndarray, shape (m, d), optional
        Query rows, L2-normalised; None searches ``R`` against itself, each row excluded from its own neighbours.
    method : str, optional
        Force one of :func:`choose_search`'s answers (default: chosen by ``len(R)``).
    block_bytes : int
        Memory for one block of similarities in the exact search.

    Returns
    -------
    Neighbours
    """
    R = np.ascontiguousarray(R, dtype=np.float32)
    self_search = Q is None
    Qa = R if Q is None else np.ascontiguousarray(Q, dtype=np.float32)
    how = method or choose_search(len(R))
    if how == "skipped" or len(R) == 0 or len(Qa) == 0:
        return Neighbours(np.full((len(Qa), k), -1, np.int64), np.full((len(Qa), k), np.inf, np.float32), how)
    if how.startswith("faiss"):
        idx, dist = _faiss(Qa, R, k, self_search, how)
    else:
        idx, dist = _exact(Qa, R, k, np.arange(len(R)) if self_search else None, block_bytes)
    return Neighbours(idx, np.maximum(dist, 0.0).astype(np.float32), how)
