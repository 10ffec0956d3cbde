"""What a head is told about the data it is fitted on (:class:`HeadContext`): one small module below the head
registry (:mod:`pipeline.fit.heads`) and the forms that fit heads (:mod:`pipeline.fit.forms`), so both type it
without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.fit.dense import HOLDOUT_MAX_ROWS

__all__ = ["HeadContext", "NYSTROEM_COMPONENTS"]

NYSTROEM_COMPONENTS = 1_000
"""Landmark rows of the Nystroem map that approximates the RBF kernel above :data:`SVM_EXACT_MAX_ROWS`: measured on
10,000 training rows of MobileNetV2 features, 1,000 landmarks + a linear SVM reached the exact RBF SVM's accuracy
within 0.5 point."""


@dataclass(frozen=True)
class HeadContext:
    """What a head factory needs to know about the data it will be fitted on.

    Attributes
    ----------
    n_features : int
        Columns of the 2-D input (spatial maps count ``h * w * c``).
    n_classes : int
    n_rows : int
        Training rows of the final fit (cross-validation folds see fewer).
    min_class_rows : int
        Rows of the smallest class in the final training set.
    class_weight : {None, "balanced"}
        As the estimators take it (``FitConfig.head_class_weight`` maps the CLI's ``none``); anything else is an
        error here, so no head reads it again.
    seed : int
    input_shape : tuple of int
        Shape of one input row as cached (``(d,)`` or ``(h, w, c)``).
    knn_index_rows : int or None
        Rows of the bounded k-NN index (None: every training row).
    nystroem_components : int
        Landmark rows of the Nystroem map of the approximate RBF SVM.
    work_bytes : int or None
        Memory a batch form may use for derived arrays it keeps (e.g. kernel-mapped rows); None: no limit.
    holdout_max_rows : int
        Most training rows the dense head holds out (in memory) for early stopping.
    form : str
        The form the head is fitted in (``exact`` or its batch form's name; see :class:`Form`).
    """

    n_features: int
    n_classes: int
    n_rows: int
    min_class_rows: int
    class_weight: str | None = None
    seed: int = 0
    input_shape: tuple[int, ...] = ()
    knn_index_rows: int | None = None
    nystroem_components: int = NYSTROEM_COMPONENTS
    work_bytes: int | None = None
    holdout_max_rows: int = HOLDOUT_MAX_ROWS
    form: str = "exact"

    def __post_init__(self) -> None:
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
