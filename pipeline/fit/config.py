"""One validated configuration object for the fit stage.

:class:`FitConfig` holds every option of a fit (what ``python cli.py fit`` is asked for). It checks them once,
when it is made: an unknown head, feature kind, class weight, pick rule or selection place, ``exclude_leaks``
without the audit, or a memory budget that is not a size is a :class:`~pipeline.errors.FitError` of one line,
raised before any cache is opened. A FitConfig that exists is valid, and it is frozen (its sequences are tuples),
so :func:`pipeline.fit.run.run_fit` and everything it calls read one object that cannot change under them.
``dataclasses.replace`` makes a changed copy, checked again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pipeline.audit import AuditConfig
from pipeline.cache.format import FEATURE_KINDS
from pipeline.errors import FitError, check_choice
from pipeline.fit.heads import resolve_heads
from pipeline.fit.pick import DEFAULT_RULE, PICK_RULES
from pipeline.fit.plan import CostPolicy, MemoryBudget, memory_budget
from pipeline.fit.protocol import SELECT_ON

__all__ = ["FitConfig", "CLASS_WEIGHTS", "FEATURE_KINDS"]

CLASS_WEIGHTS = ("none", "balanced")
"""The ``class_weight`` choices: ``none``, or ``balanced`` (classes weighted by inverse frequency)."""


def _names(value: str | Path | Sequence[str | Path] | None) -> tuple | None:
    """A sequence option as a tuple (one string or path counts as one item; None stays None)."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class FitConfig:
    """The options of one fit, checked once.

    Attributes
    ----------
    cache_dir : path, default "cache"
        Folder searched for complete caches (ignored when ``caches`` is given).
    caches : tuple of path, optional
        Explicit cache files (all of one dataset).
    dataset : str, optional
        Dataset to pick when the folder holds caches of several datasets: its name, or its folder (a path) when
        two datasets share a name. Default: the dataset extracted last (the fit's log is told which).
    backbones : tuple of str, optional
        Keep only caches of these backbones (name like ``mobilenet_v2`` or label like ``mobilenet_v2-a1.0-224``).
    heads : tuple of str
        Head names or ``all`` (given as None: all registered heads). Stored resolved: the registered names to
        fit, in registry order, each once (:func:`pipeline.fit.heads.resolve_heads`).
    features : {"avg", "max", "maps"}
        Which cached features to fit on (``maps`` must have been extracted with ``--maps``); the choices are the
        cache's :data:`pipeline.cache.format.FEATURE_KINDS`.
    class_weight : {"none", "balanced"}
        ``balanced`` weights the classes by inverse frequency (:data:`CLASS_WEIGHTS`).
    seed : int
        Seed of the hash split, the folds, the search subsample and every head.
    out : path, optional
        Run folder (must not exist or be empty); default ``reports/runs/<dataset>_<timestamp>``.
    command : str
        The command line, recorded as provenance (default: a description of the ``run_fit`` call).
    memory_budget : str, optional
        ``--memory-budget`` (e.g. ``"2GB"``): how much memory the features may take; default half of the machine's
        memory. Features that do not fit are streamed from the cache (see :mod:`pipeline.fit.plan`). Parsed once
        into :attr:`budget`.
    policy : CostPolicy, optional
        Thresholds of the cost plan (default: the documented ones, :attr:`cost_policy`).
    views : bool, default True
        Let every head choose among view modes when the caches hold augmented views (``extract --views K``; see
        :mod:`pipeline.fit.views`); False fits on centre views only (recorded as turned off).
    pick : str, default "one_se"
        The rule that picks the recommended result from the selection scores (:mod:`pipeline.fit.pick`).
    select_on : {"auto", "cv", "val"}
        Where hyperparameters and the pick are chosen (:data:`pipeline.fit.protocol.SELECT_ON`).
    audit : bool, default True
        Audit the images once the splits are fixed (duplicates, leaks, suspect labels, outliers:
        :mod:`pipeline.audit`), into ``audit/`` and results.json's ``audit``.
    exclude_leaks : bool, default False
        Move every final-split image with a duplicate in train out of the final split (its split becomes
        ``excluded``); needs ``audit``.
    audit_config : AuditConfig, optional
        The audit's settings (default: the documented rules, seeded by ``seed`` and bounded by the memory budget:
        :meth:`audit_settings`).
    budget : MemoryBudget
        The parsed memory budget (not a parameter: made from ``memory_budget``).

    Raises
    ------
    FitError
        An unknown head, pick rule, ``select_on``, feature kind or class weight; ``exclude_leaks`` without
        ``audit``; a memory budget that is not a positive size. Each is one line naming the option.
    """

    cache_dir: str | Path = "cache"
    caches: tuple[str | Path, ...] | None = None
    dataset: str | None = None
    backbones: tuple[str, ...] | None = None
    heads: tuple[str, ...] | None = None
    features: str = "avg"
    class_weight: str = "none"
    seed: int = 0
    out: str | Path | None = None
    command: str = ""
    memory_budget: str | None = None
    policy: CostPolicy | None = None
    views: bool = True
    pick: str = DEFAULT_RULE
    select_on: str = "auto"
    audit: bool = True
    exclude_leaks: bool = False
    audit_config: AuditConfig | None = None
    budget: MemoryBudget = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # the one place a frozen FitConfig is written: while it is made
        set_(self, "caches", _names(self.caches))
        set_(self, "backbones", _names(self.backbones))
        heads = _names(self.heads)
        set_(self, "heads", tuple(resolve_heads(list(heads) if heads else None)))
        for option, value, choices in (("--pick", self.pick, PICK_RULES), ("--select-on", self.select_on, SELECT_ON),
                                       ("--features", self.features, FEATURE_KINDS),
                                       ("--class-weight", self.class_weight, CLASS_WEIGHTS)):
            check_choice(option, value, choices, FitError)
        if self.exclude_leaks and not self.audit:
            raise FitError("--exclude-leaks needs the audit (drop --no-audit)")
        set_(self, "budget", memory_budget(self.memory_budget))

    @property
    def cost_policy(self) -> CostPolicy:
        """The cost plan's thresholds: :attr:`policy`, or the documented ones."""
        return self.policy or CostPolicy()

    @property
    def head_class_weight(self) -> str | None:
        """The class weight as the heads take it: ``"balanced"`` or None."""
        return "balanced" if self.class_weight == "balanced" else None

    def audit_settings(self) -> AuditConfig:
        """The audit's settings: :attr:`audit_config`, or the documented rules with the fit's seed, a similarity
        block of the budget's buffer share (an eighth, between 16 MB and 256 MB) and the budget as its memory."""
        if self.audit_config is not None:
            return self.audit_config
        block = int(min(256 * 2**20, max(16 * 2**20, self.budget.buffer_bytes)))
        return AuditConfig(seed=self.seed, block_bytes=block, memory_bytes=self.budget.bytes)
