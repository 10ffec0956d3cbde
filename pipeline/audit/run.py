"""The audit of one run's images: duplicates, leaks, suspect labels and outliers, from cached features.

:func:`run_audit` takes the run's images (paths, labels, splits, content digests) and one or more feature sources
(one per cache of the run) and returns an :class:`Audit`. With several caches, the audit uses the one whose features
give the best out-of-fold accuracy of the audit's own logistic regression (the backbone that separates the classes
best also tells look-alikes apart best, and its probabilities make the label scores); ``chosen_by`` records it.

Steps, each with its rule in its own module: embedding (:mod:`~pipeline.audit.space`), out-of-fold probabilities
and suspect labels (:mod:`~pipeline.audit.labels`), nearest neighbours (:mod:`~pipeline.audit.neighbors`),
duplicates and leaks (:mod:`~pipeline.audit.duplicates`), outliers (:mod:`~pipeline.audit.outliers`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.audit.duplicates import NEAR_FACTOR, Duplicates, find_duplicates, find_leaks, near_threshold
from pipeline.audit.labels import OutOfFold, default_model, label_issues, out_of_fold_proba
from pipeline.audit.neighbors import EXACT_MAX_ROWS, HNSW_LINKS, choose_search, knn
from pipeline.audit.outliers import OUTLIER_IQR, outlier_fence, outlier_scores
from pipeline.audit.space import FULL_DIM_ROWS, Embedding, embed

__all__ = ["AuditConfig", "AuditSource", "AuditImages", "Audit", "run_audit", "K_NEIGHBOURS"]

K_NEIGHBOURS = 10


@dataclass(frozen=True)
class AuditConfig:
    """The audit's settings (the defaults are the documented rules)."""

    k: int = K_NEIGHBOURS
    near_factor: float = NEAR_FACTOR
    outlier_iqr: float = OUTLIER_IQR
    folds: int | None = None
    """Folds of the out-of-fold probabilities (default: 5, or 3 from 2,000 images on)."""
    seed: int = 0
    search: str | None = None
    """Force a search method of :func:`pipeline.audit.neighbors.choose_search` (default: by size)."""
    full_dim_rows: int = FULL_DIM_ROWS
    block_bytes: int = 256 * 2**20
    """Memory for one block of similarities in the exact search (``fit`` sets it from its memory budget)."""
    memory_bytes: int | None = None
    """The memory the neighbour search may take (``fit``: its memory budget); above it the search is skipped with
    one line. None: no limit."""
    make_model: Callable[[], Any] = default_model


@dataclass(frozen=True)
class AuditSource:
    """One cache's features of the run's images: ``read(i)`` returns the features of run images ``i``."""

    label: str
    file: str
    read: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class AuditImages:
    """The run's images, in run order."""

    paths: Sequence[str]
    labels: np.ndarray
    splits: np.ndarray
    class_names: Sequence[str]
    digests: Sequence[str]
    final_splits: Sequence[str]


@dataclass
class Audit:
    """What the audit found (row numbers are run rows)."""

    images: AuditImages
    source: AuditSource
    chosen_by: str
    embedding: Embedding
    oof: OutOfFold
    search: str
    duplicates: Duplicates
    threshold: float
    median_nn: float
    leaked: np.ndarray
    """Boolean mask over the run's rows: a final-split image with a duplicate in train."""
    label_rows: np.ndarray
    suggested: np.ndarray
    label_scores: np.ndarray
    class_thresholds: np.ndarray
    outlier_rows: np.ndarray
    outlier_score: np.ndarray
    fence: float
    config: AuditConfig
    skipped: list[str] = field(default_factory=list)
    excluded: bool = False
    seconds: float = 0.0

    @property
    def n_outliers(self) -> int:
        """Images above the outlier fence."""
        return int((self.outlier_score[self.outlier_rows] > self.fence).sum()) if len(self.outlier_rows) else 0

    def lines(self) -> list[str]:
        """One line per kind, as ``fit`` prints them."""
        d, c = self.duplicates, self.duplicates.counts
        leaks = self.leak_counts()
        out = [f"audit ({self.source.label}, {len(self.images.paths):,} images, {self.seconds:.1f} s): "
               + (f"{d.exact_pairs} exact and {d.pairs - d.exact_pairs} near-duplicate pairs in "
                  f"{sum(c.values())} clusters ({c['across_classes']} across classes, {c['across_splits']} across "
                  f"splits, {c['within_split']} within a split)" if self.search != "skipped" else
                  f"{d.exact_pairs} exact-duplicate pairs ({sum(c.values())} clusters)"),
               "audit: " + (", ".join(f"{v} {s} image{'s' if v != 1 else ''}" for s, v in leaks.items()) +
                            " with a duplicate in train" + (" (excluded: --exclude-leaks)" if self.excluded else
                                                            " (leaks; fit --exclude-leaks drops them)")
                            if sum(leaks.values()) else "no final-split image has a duplicate in train"),
               f"audit: {len(self.label_rows)} suspect label{'s' if len(self.label_rows) != 1 else ''} "
               f"(out-of-fold logistic regression, accuracy {self.oof.accuracy:.3f})",
               f"audit: {self.n_outliers} outlier{'s' if self.n_outliers != 1 else ''} (mean distance to "
               f"{self.config.k} nearest images above {self.fence:.3f})"]
        return out + [f"audit: {s}" for s in self.skipped]

    def leak_counts(self) -> dict[str, int]:
        """Leaked images per final split."""
        splits = np.asarray(self.images.splits)
        return {s: int((self.leaked & (splits == s)).sum()) for s in self.images.final_splits}

    def to_json(self, files: dict[str, str]) -> dict[str, Any]:
        """The ``audit`` object of results.json."""
        d = self.duplicates
        names = list(self.images.class_names)
        in_clusters = len({r["row"] for r in d.rows})
        return {
            "cache": {"backbone_label": self.source.label, "file": self.source.file, "chosen_by": self.chosen_by},
            "images": len(self.images.paths),
            "seconds": round(float(self.seconds), 3),
            "embedding": self.embedding.to_json(),
            "search": {"method": self.search, "k": self.config.k, "exact_max_rows": EXACT_MAX_ROWS},
            "duplicates": {
                "exact_pairs": d.exact_pairs, "near_pairs": d.pairs - d.exact_pairs, "clusters": dict(d.counts),
                "images": in_clusters, "threshold": self.threshold, "median_nn_distance": self.median_nn,
                "near_factor": self.config.near_factor,
                "rule": (f"same content digest, or cosine distance <= {self.config.near_factor} x the median "
                         f"nearest-neighbour distance ({self.median_nn:.4f})"),
            },
            "leaks": {"counts": self.leak_counts(), "excluded": bool(self.excluded),
                      "rule": "a final-split image whose nearest training image is an exact or near duplicate"},
            "label_issues": {
                "count": int(len(self.label_rows)), "folds": int(self.oof.folds),
                "oof_accuracy": None if not np.isfinite(self.oof.accuracy) else float(self.oof.accuracy),
                "model": "StandardScaler + LogisticRegression(C=0.01, max_iter=100, tol=1e-3), out-of-fold",
                "class_thresholds": {names[j]: (float(t) if np.isfinite(t) else None)
                                     for j, t in enumerate(self.class_thresholds)},
                "rule": "the held-out prediction is another class, or (confident learning) another class's "
                        "out-of-fold probability >= that class's mean self-probability; ranked by 1 - p(given class)",
            },
            "outliers": {"count": self.n_outliers, "fence": (self.fence if np.isfinite(self.fence) else None),
                         "iqr_factor": self.config.outlier_iqr,
                         "rule": f"mean cosine distance to the {self.config.k} nearest images > Q3 + "
                                 f"{self.config.outlier_iqr} x IQR"},
            "skipped": list(self.skipped),
            "files": dict(files),
        }


def search_bytes(n: int, dim: int, k: int, method: str, block_bytes: int) -> int:
    """Memory of the neighbour search: the index's copy of the vectors (faiss), its graph links (HNSW), the
    neighbour lists and one block of similarities (exact)."""
    index = n * dim * 4 if method.startswith("faiss") else 0
    links = n * 2 * HNSW_LINKS * 4 if method == "faiss-hnsw" else 0
    return int(index + links + n * k * 12 + (block_bytes if method == "exact" else 0))


def _prepare(src: AuditSource, n: int, labels: np.ndarray, n_classes: int, cfg: AuditConfig
             ) -> tuple[Embedding, OutOfFold]:
    emb = embed(src.read, n, cfg.seed, cfg.full_dim_rows)
    return emb, out_of_fold_proba(emb.Z, labels, n_classes, cfg.seed, cfg.make_model, cfg.folds)


def run_audit(images: AuditImages, sources: Sequence[AuditSource], config: AuditConfig | None = None,
              exclude_leaks: bool = False) -> Audit:
    """Audit the run's images from the first-best of ``sources`` (see the module docstring)."""
    t0 = time.perf_counter()
    cfg = config or AuditConfig()
    n = len(images.paths)
    labels = np.asarray(images.labels, dtype=np.int64)
    splits = np.asarray(images.splits).astype(str)
    n_classes = len(images.class_names)
    best: tuple[float, int, Embedding, OutOfFold] | None = None
    accs = []
    for i, src in enumerate(sources):
        emb, oof = _prepare(src, n, labels, n_classes, cfg)
        acc = oof.accuracy if np.isfinite(oof.accuracy) else -1.0
        accs.append(f"{src.label} {oof.accuracy:.3f}")
        if best is None or acc > best[0]:
            best = (acc, i, emb, oof)
        del emb, oof
    if best is None:
        raise ValueError("run_audit needs at least one feature source")
    _, si, emb, oof = best
    src = sources[si]
    chosen_by = ("the run's only cache" if len(sources) == 1 else
                 "best out-of-fold accuracy of the audit's logistic regression: " + ", ".join(accs))
    Z = emb.Z
    skipped: list[str] = []
    method = cfg.search or choose_search(n)
    k = max(1, min(cfg.k, n - 1))
    need = search_bytes(n, Z.shape[1], k, method, cfg.block_bytes)
    if cfg.memory_bytes is not None and method != "skipped" and need > cfg.memory_bytes:
        skipped.append(f"near duplicates, leaks by likeness and outliers skipped: the neighbour search of {n:,} "
                       f"rows needs about {need / 2**20:,.0f} MiB, over the memory budget of "
                       f"{cfg.memory_bytes / 2**20:,.0f} MiB (pass a larger --memory-budget)")
        method = "skipped"
    nn = knn(Z, k, method=method, block_bytes=cfg.block_bytes)
    if method == "skipped" and not skipped:
        skipped.append(f"near duplicates, leaks by likeness and outliers skipped: {n:,} rows are over the exact "
                       f"search's {EXACT_MAX_ROWS:,}; pip install 'headbench[audit]' (faiss-cpu) for the "
                       f"approximate index (exact copies and suspect labels are still checked)")
        threshold, median = 0.0, 0.0
    else:
        threshold, median = near_threshold(nn.distance[:, 0], cfg.near_factor)
    dups = find_duplicates(Z, nn, images.digests, labels, splits, threshold if method != "skipped" else -1.0)
    leaked = find_leaks(nn, splits, images.final_splits, images.digests, threshold if method != "skipped" else -1.0)
    rows, suggested, scores, class_t = label_issues(oof, labels)
    out_score = outlier_scores(nn) if method != "skipped" else np.full(n, np.nan)
    fence = outlier_fence(out_score, cfg.outlier_iqr)
    finite = np.flatnonzero(np.isfinite(out_score))
    out_rows = finite[np.lexsort((finite, -out_score[finite]))]
    return Audit(images, src, chosen_by, emb, oof, method, dups, threshold, median, leaked, rows, suggested, scores,
                 class_t, out_rows, out_score, fence, cfg, skipped, bool(exclude_leaks), time.perf_counter() - t0)
