"""Rows for heads that learn in batches: in memory or read in blocks from a cache, with streaming statistics.

A :class:`RowSource` is what a batch learner sees: the labels of its rows (always in memory: one integer per row),
their features on demand (:meth:`~RowSource.take` for a bounded set of rows, :meth:`~RowSource.chunks` for a pass
over them in bounded blocks), and nothing else. :class:`ArraySource` serves rows of an array already in memory;
:class:`ReaderSource` reads them from an open :class:`pipeline.cache.FeatureReader`, so a pass over a million rows
holds one buffer of rows at a time. Both give the same rows; only the order of a shuffled pass differs (a reader
shuffles whole blocks of the file and then the rows inside a buffer of several blocks).

Statistics that standardisation and the nearest-centroid head need (per-feature mean and variance, per class) are
computed in one streaming pass with Chan's pairwise update in float64 (:class:`ClassMoments`), fitted on the rows
the head trains on only, so cross-validation never leaks a statistic of the rows it scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

__all__ = ["RowSource", "ArraySource", "ReaderSource", "ClassMoments", "class_moments", "stratified_subsample",
           "chunk_rows_for"]

CHUNK_BYTES = 64 << 20
"""Default size of one block of rows handed to a batch learner (64 MiB: large enough for BLAS to run at speed and
for HDF5 reads to be sequential, small next to any memory budget)."""


def chunk_rows_for(row_bytes: int, lo: int = 256) -> int:
    """Rows per block: :data:`CHUNK_BYTES` worth, at least ``lo`` (the memory budget bounds a pass through
    :attr:`pipeline.fit.plan.MemoryBudget.buffer_bytes`)."""
    return max(lo, int(CHUNK_BYTES // max(1, row_bytes)))


def stratified_subsample(labels: np.ndarray, rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded subsample of ``rows`` of about ``size`` rows with every class in proportion (at least one each).

    Parameters
    ----------
    labels : ndarray of int
        Class index of every row (indexed by ``rows``).
    rows : ndarray of int
        Candidate rows.
    size : int
        Rows wanted; all of ``rows`` when ``size >= len(rows)``.
    seed : int

    Returns
    -------
    ndarray of int
        Sorted subset of ``rows``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if size >= len(rows):
        return np.sort(rows)
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)[rows]
    classes, counts = np.unique(y, return_counts=True)
    want = np.maximum(1, np.floor(counts * size / len(rows)).astype(int))
    # hand out what rounding left over to the classes with the largest remainders
    rest = size - int(want.sum())
    if rest > 0:
        frac = counts * size / len(rows) - np.floor(counts * size / len(rows))
        for i in np.argsort(-frac, kind="stable")[:rest]:
            want[i] += 1
    want = np.minimum(want, counts)
    out = [rng.choice(rows[y == c], int(k), replace=False) for c, k in zip(classes, want)]
    return np.sort(np.concatenate(out))


class RowSource:
    """Rows a batch learner trains on: labels in memory, features on demand.

    Attributes
    ----------
    labels : ndarray of int, shape (n,)
        Class index (into :attr:`classes`) of each row.
    classes : ndarray of str
        Class names, in index order.
    shape : tuple of int
        Shape of one row's features.
    groups : ndarray of int or None
        The image each row belongs to, when rows include augmented views of the same images (a Keras head's
        early-stopping split keeps an image's rows together); None when each row is its own image.
    """

    labels: np.ndarray
    classes: np.ndarray
    shape: tuple[int, ...]
    groups: np.ndarray | None = None

    @property
    def n(self) -> int:
        """Number of rows."""
        return len(self.labels)

    @property
    def n_features(self) -> int:
        """Columns of one row once flattened."""
        return int(np.prod(self.shape))

    @property
    def row_bytes(self) -> int:
        """Bytes of one row as float32."""
        return 4 * self.n_features

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Features of rows ``idx`` (positions in this source), float32, in memory."""
        raise NotImplementedError

    def chunks(self, rows: np.ndarray | None = None, seed: int | None = None,
               chunk_rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """A pass over ``rows`` (all when None) as ``(features, labels)`` blocks of at most ``chunk_rows`` rows.

        With ``seed`` the pass is shuffled (deterministically for a seed); without it rows come in order.
        """
        raise NotImplementedError

    def subset(self, rows: np.ndarray) -> "RowSource":
        """The source of rows ``rows`` of this one (positions in this source)."""
        raise NotImplementedError


class ArraySource(RowSource):
    """Rows of an array already in memory (no copy until a block is asked for).

    Parameters
    ----------
    X : ndarray
        Features of at least the rows in ``index``.
    labels : ndarray of int
        Class index of each row of this source.
    classes : sequence of str
    index : ndarray of int, optional
        Row of ``X`` of each row of this source (default: all rows of ``X`` in order).
    """

    def __init__(self, X: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 index: np.ndarray | None = None) -> None:
        self.X = X
        self.index = np.arange(len(X)) if index is None else np.asarray(index, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = np.asarray([str(c) for c in classes])
        self.shape = tuple(int(s) for s in X.shape[1:])
        if len(self.labels) != len(self.index):
            raise ValueError("one label per row is needed")

    def array(self) -> np.ndarray:
        """All rows as one float32 array (a view when the source covers the whole array in order)."""
        if len(self.index) == len(self.X) and np.array_equal(self.index, np.arange(len(self.X))):
            return np.asarray(self.X, dtype=np.float32)
        return np.asarray(self.X[self.index], dtype=np.float32)

    def take(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.X[self.index[np.asarray(idx, dtype=np.int64)]], dtype=np.float32)

    def chunks(self, rows: np.ndarray | None = None, seed: int | None = None,
               chunk_rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rows = np.arange(self.n) if rows is None else np.asarray(rows, dtype=np.int64)
        if seed is not None:
            rows = rows[np.random.default_rng(seed).permutation(len(rows))]
        step = chunk_rows or chunk_rows_for(self.row_bytes)
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            yield self.take(part), self.labels[part]

    def subset(self, rows: np.ndarray) -> "ArraySource":
        rows = np.asarray(rows, dtype=np.int64)
        return ArraySource(self.X, self.labels[rows], self.classes, self.index[rows])


class ReaderSource(RowSource):
    """Rows read from an open cache in bounded blocks.

    Parameters
    ----------
    reader : FeatureReader
        From :func:`pipeline.cache.open_features`; ``reader.read(idx)`` returns float32 rows (maps in their stored
        type, converted here).
    index : ndarray of int
        Reader row (index into ``reader.paths``) of each row of this source.
    labels : ndarray of int
    classes : sequence of str
    block_rows : int
        Rows per read; a shuffled pass visits the blocks in a random order.
    buffer_blocks : int
        Blocks gathered and shuffled together before they are handed out (so that a buffer mixes rows from several
        places of the file: caches store rows class by class).
    """

    def __init__(self, reader: Any, index: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 block_rows: int = 1024, buffer_blocks: int = 16) -> None:
        self.reader = reader
        self.index = np.asarray(index, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = np.asarray([str(c) for c in classes])
        self.shape = tuple(int(s) for s in reader.shape)
        self.block_rows = max(1, int(block_rows))
        self.buffer_blocks = max(1, int(buffer_blocks))
        if len(self.labels) != len(self.index):
            raise ValueError("one label per row is needed")

    def _read(self, reader_rows: np.ndarray) -> np.ndarray:
        """Rows of the reader (ascending), read as one contiguous range when they are dense in it."""
        if len(reader_rows) == 0:
            return np.zeros((0, *self.shape), np.float32)
        lo, hi = int(reader_rows[0]), int(reader_rows[-1])
        if len(reader_rows) >= 0.5 * (hi - lo + 1):  # one sequential read beats many small ones
            block = self.reader.read(np.arange(lo, hi + 1))
            out = block[reader_rows - lo]
        else:
            out = self.reader.read(reader_rows)
        return np.asarray(out, dtype=np.float32)

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            return np.zeros((0, *self.shape), np.float32)
        order = np.argsort(self.index[idx], kind="stable")
        out = np.empty((len(idx), *self.shape), np.float32)
        for start in range(0, len(idx), self.block_rows * self.buffer_blocks):
            part = order[start:start + self.block_rows * self.buffer_blocks]
            out[part] = self._read(self.index[idx[part]])
        return out

    def chunks(self, rows: np.ndarray | None = None, seed: int | None = None,
               chunk_rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rows = np.arange(self.n) if rows is None else np.asarray(rows, dtype=np.int64)
        rows = rows[np.argsort(self.index[rows], kind="stable")]  # in file order: blocks are runs of the file
        blocks = [rows[i:i + self.block_rows] for i in range(0, len(rows), self.block_rows)]
        per_chunk = self.buffer_blocks
        if chunk_rows:
            per_chunk = max(1, min(per_chunk, chunk_rows // self.block_rows))
        rng = np.random.default_rng(seed) if seed is not None else None
        if rng is not None:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        for start in range(0, len(blocks), per_chunk):
            group = blocks[start:start + per_chunk]
            X = np.concatenate([self._read(self.index[b]) for b in group])
            pos = np.concatenate(group)
            if rng is not None:
                perm = rng.permutation(len(pos))
                X, pos = X[perm], pos[perm]
            yield X, self.labels[pos]

    def subset(self, rows: np.ndarray) -> "ReaderSource":
        rows = np.asarray(rows, dtype=np.int64)
        return ReaderSource(self.reader, self.index[rows], self.labels[rows], self.classes, self.block_rows,
                            self.buffer_blocks)


@dataclass
class ClassMoments:
    """Per-class count, mean and sum of squared deviations of every feature (float64).

    ``axis_rows`` tells how many values of a feature each row contributes (``h * w`` for per-channel statistics of
    maps, else 1).
    """

    count: np.ndarray  # (k,) values per class (rows x axis_rows)
    mean: np.ndarray  # (k, d)
    m2: np.ndarray  # (k, d)

    @property
    def total_count(self) -> float:
        """Values over all classes."""
        return float(self.count.sum())

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and population variance of every feature over all classes."""
        n = self.count.sum()
        present = self.count > 0
        mean = (self.count[present, None] * self.mean[present]).sum(axis=0) / n
        m2 = self.m2[present].sum(axis=0) + (self.count[present, None] * (self.mean[present] - mean) ** 2).sum(axis=0)
        return mean, m2 / n


def class_moments(chunks: Iterator[tuple[np.ndarray, np.ndarray]], n_classes: int,
                  pre: Callable[[np.ndarray], np.ndarray] | None = None, per_channel: bool = False) -> ClassMoments:
    """One pass of per-class moments over ``(features, labels)`` blocks.

    Parameters
    ----------
    chunks : iterator of (ndarray, ndarray)
        Blocks of rows and their class indices (e.g. :meth:`RowSource.chunks` without a seed).
    n_classes : int
    pre : callable, optional
        Applied to each block first (e.g. the signed cube root).
    per_channel : bool
        Statistics per last-axis channel over every other axis (maps), instead of per flattened feature.

    Returns
    -------
    ClassMoments
    """
    count = mean = m2 = None
    for X, y in chunks:
        if pre is not None:
            X = pre(np.asarray(X, dtype=np.float64))
        d = X.shape[-1] if per_channel else int(np.prod(X.shape[1:]))
        if count is None:
            count, mean, m2 = np.zeros(n_classes), np.zeros((n_classes, d)), np.zeros((n_classes, d))
        for c in np.unique(y):
            flat = X[y == c].reshape(-1, d)  # one class at a time: at most one class's rows copied
            nb = float(len(flat))
            mb = flat.mean(axis=0, dtype=np.float64)
            m2b = np.zeros(d)
            for start in range(0, len(flat), 4096):  # squared deviations in float64, 4,096 rows at a time
                dev = flat[start:start + 4096].astype(np.float64) - mb
                m2b += np.einsum("ij,ij->j", dev, dev)
            na = count[c]
            delta = mb - mean[c]
            tot = na + nb
            mean[c] = mean[c] + delta * (nb / tot)
            m2[c] = m2[c] + m2b + delta ** 2 * (na * nb / tot)
            count[c] = tot
    if count is None:
        raise ValueError("no rows to compute statistics on")
    return ClassMoments(count, mean, m2)
