"""The cost plan of a fit: where the features live, and how each head is fitted at its size.

For every cache the plan decides whether its features are held **in memory** or **streamed** from the cache, and
for every head which form fits it (its exact estimator, or the batch form that scales: see
:mod:`pipeline.fit.heads` and :mod:`pipeline.fit.forms`), on how many rows its hyperparameters are searched, and
what memory its bounded structures (a k-NN index, Nystroem landmarks, held-out rows) may take. A head whose bounded
structures cannot fit the budget is **skipped** with the reason; nothing is ever left to swap or crash.

Rules (their reasons are with each constant):

* Features in memory when :data:`MEMORY_FACTOR` times their float32 size fits the memory budget, else streamed.
* The hyperparameter search fits on a stratified subsample of at most :data:`SEARCH_MAX_ROWS` training rows (and of
  the budget's share); the chosen candidate is refitted on every training row.
* A head uses its exact form up to :attr:`HeadSpec.exact_max_rows` training rows with its features in memory, its
  batch form above, and its batch form whenever the features are streamed.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.errors import FitError
from pipeline.fit.heads import Form, HeadContext, HeadSpec, MemoryRoom
from pipeline.fit.stream import chunk_rows_for
from pipeline.sizes import fmt_bytes

__all__ = ["MemoryBudget", "CostPolicy", "HeadPlan", "CachePlan", "parse_memory", "default_memory_budget",
           "plan_cache", "plan_head", "SEARCH_MAX_ROWS", "MEMORY_FACTOR"]

SEARCH_MAX_ROWS = 10_000
"""Most training rows the hyperparameter search fits on. Candidates are ranked by accuracy on the rows they are
scored on; with every one of 10,000 rows scored once (k-fold) the standard error of an accuracy near 0.9 is 0.3 point,
and paired differences between candidates are measured more precisely still, so more rows rarely change the choice
while every candidate's fits would cost proportionally more. Regularisation chosen on fewer rows errs on the side of
more regularisation; the refit always uses every training row."""

MEMORY_FACTOR = 3
"""Features are held in memory when three times their float32 size fits the budget: the rows themselves, plus the
copies a head makes of its training rows (a standardised copy, the block it trains on)."""

BUDGET_SHARE = 0.5
"""Default memory budget: half of the machine's physical memory, leaving the rest to the operating system,
TensorFlow's own ~0.7 GB, the page cache that makes streaming fast, and other programs."""

MIN_SEARCH_ROWS_PER_CLASS = 10

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2 ** 10, "m": 1e6, "mb": 1e6, "mib": 2 ** 20,
          "g": 1e9, "gb": 1e9, "gib": 2 ** 30, "t": 1e12, "tb": 1e12, "tib": 2 ** 40}


def parse_memory(text: str) -> int:
    """Bytes of a memory size such as ``2GB``, ``1.5G``, ``512MiB`` or ``3000000000``.

    ``k``/``M``/``G``/``T`` (with or without ``B``) are decimal; ``KiB``/``MiB``/``GiB``/``TiB`` binary.

    Raises
    ------
    FitError
        Not a size, or not positive.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise FitError(f"--memory-budget {text!r} is not a size; write it like 2GB, 500MB or 1.5GiB")
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise FitError(f"--memory-budget {text!r} must be positive")
    return int(value)


@dataclass(frozen=True)
class MemoryBudget:
    """How much memory the fit's feature data may take, where that figure came from, and the one rule of how a fit
    shares it out.

    Shares of the budget, each the bound of one structure (named here, used everywhere):

    * :attr:`search_bytes`, a half: the hyperparameter search's rows with their copies (:func:`plan_cache`);
    * :attr:`work_bytes`, a quarter: one head's bounded structures -- a k-NN index, Nystroem landmarks, the dense
      head's weights with their optimizer state and its held-out rows (:func:`plan_head`);
    * :attr:`buffer_bytes`, an eighth: what a pass holds at once -- a streamed pass's rows
      (:attr:`CachePlan.buffer_rows`), scikit-learn's chunked pairwise work, the data audit's similarity block.
    """

    bytes: int
    source: str

    @property
    def search_bytes(self) -> int:
        """Half of the budget: the hyperparameter search's rows and their copies."""
        return int(self.bytes // 2)

    @property
    def work_bytes(self) -> int:
        """A quarter of the budget: one head's bounded structures."""
        return int(self.bytes // 4)

    @property
    def buffer_bytes(self) -> int:
        """An eighth of the budget: what one pass holds at once."""
        return int(self.bytes // 8)

    def to_json(self) -> dict[str, Any]:
        """The ``memory_budget`` object of results.json."""
        return {"bytes": int(self.bytes), "source": self.source}


def physical_memory() -> int | None:
    """Bytes of physical memory (``os.sysconf``), or None where the system does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget() -> MemoryBudget:
    """:data:`BUDGET_SHARE` of the machine's physical memory (4 GB when the system does not say)."""
    total = physical_memory()
    if not total:
        return MemoryBudget(4_000_000_000, "default: 4 GB (the machine's memory is unknown)")
    return MemoryBudget(int(total * BUDGET_SHARE),
                        f"default: {int(BUDGET_SHARE * 100)} % of the machine's {fmt_bytes(total)} of memory")


def memory_budget(text: str | None) -> MemoryBudget:
    """The budget of ``--memory-budget TEXT``, or the default one."""
    if text is None:
        return default_memory_budget()
    return MemoryBudget(parse_memory(text), f"--memory-budget {text}")


@dataclass(frozen=True)
class CostPolicy:
    """The thresholds of the cost plan (defaults: the module's and each head's constants).

    ``exact_max_rows`` overrides a head's :attr:`HeadSpec.exact_max_rows` by name (``0`` forces the batch form;
    the benchmark uses it to measure what each approximation costs against its exact form).
    """

    search_max_rows: int = SEARCH_MAX_ROWS
    memory_factor: float = MEMORY_FACTOR
    exact_max_rows: dict[str, int | None] = field(default_factory=dict)

    def max_rows(self, spec: HeadSpec) -> int | None:
        """Training rows up to which ``spec`` is fitted in its exact form."""
        return self.exact_max_rows.get(spec.name, spec.exact_max_rows)


@dataclass
class CachePlan:
    """Where one cache's features live during the fit."""

    in_memory: bool
    feature_bytes: int
    row_bytes: int
    budget: MemoryBudget
    search_max_rows: int
    reason: str

    @property
    def data(self) -> str:
        """``memory`` or ``streamed``."""
        return "memory" if self.in_memory else "streamed"

    @property
    def block_rows(self) -> int:
        """Rows per read of a streamed pass: blocks of 1,024 rows, fewer for wide rows (16 per buffer)."""
        return max(1, min(1024, self.buffer_rows // 4))

    @property
    def buffer_rows(self) -> int:
        """Rows a streamed pass holds at once: an eighth of the budget."""
        return max(16, int(self.budget.buffer_bytes // max(1, self.row_bytes)))


@dataclass
class HeadPlan:
    """How one head is fitted on one cache."""

    head: str
    form: Form | None
    data: str
    ctx: HeadContext
    reason: str
    skipped: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self, search: dict[str, Any]) -> dict[str, Any]:
        """The ``cost`` object of a result (or of a skipped head) in results.json."""
        form = self.form
        return {"form": form.name if form else None,
                "approximation": None if (form is None or form.exact) else form.summary,
                "data": self.data, **search, "reason": self.reason, **self.details}


def plan_cache(n_used: int, row_shape: tuple[int, ...], budget: MemoryBudget,
               policy: CostPolicy | None = None) -> CachePlan:
    """Decide whether a cache's features (``n_used`` rows of ``row_shape``) are held in memory or streamed."""
    policy = policy or CostPolicy()
    row_bytes = 4 * int(math.prod(row_shape))
    feature_bytes = n_used * row_bytes
    need = int(policy.memory_factor * feature_bytes)
    in_memory = need <= budget.bytes
    if in_memory:
        reason = (f"in memory: {fmt_bytes(feature_bytes)} of features as float32, x{policy.memory_factor:g} for "
                  f"working copies, within the memory budget of {fmt_bytes(budget.bytes)}")
    else:
        reason = (f"streamed from the cache: {fmt_bytes(feature_bytes)} of features as float32, x"
                  f"{policy.memory_factor:g} for working copies, exceed the memory budget of "
                  f"{fmt_bytes(budget.bytes)} ({budget.source})")
    # The search's rows and their working copies must fit the search share, by the same factor.
    search_cap = int(budget.search_bytes // (policy.memory_factor * row_bytes))
    return CachePlan(in_memory, feature_bytes, row_bytes, budget, max(1, min(policy.search_max_rows, search_cap)),
                     reason)


def plan_head(spec: HeadSpec, ctx: HeadContext, cache: CachePlan, search_rows: int,
              policy: CostPolicy | None = None) -> HeadPlan:
    """The form, data mode and bounded structures of one head on one cache (or why it is skipped).

    Parameters
    ----------
    spec : HeadSpec
    ctx : HeadContext
        The context of the final fit (``n_rows`` = training rows).
    cache : CachePlan
    search_rows : int
        Training rows the search fits on (all of them, or the subsample).
    policy : CostPolicy, optional

    Returns
    -------
    HeadPlan
    """
    policy = policy or CostPolicy()
    n = ctx.n_rows
    budget = cache.budget.bytes
    limit = policy.max_rows(spec)
    data = cache.data
    if search_rows < MIN_SEARCH_ROWS_PER_CLASS * ctx.n_classes and search_rows < n:
        return _skip(spec, ctx, data, f"the memory budget ({fmt_bytes(budget)}) holds only {search_rows} rows of "
                                      f"these features for the hyperparameter search; at least "
                                      f"{MIN_SEARCH_ROWS_PER_CLASS} per class are needed")
    if cache.in_memory and (limit is None or n <= limit):
        form = spec.exact_form
        reason = (f"exact: {n:,} training rows" + (f" <= {limit:,}" if limit is not None else "") +
                  ", features in memory")
    elif spec.exact_form.streams:  # its exact form learns in one pass over blocks anyway
        form = spec.exact_form
        reason = "exact, " + ("in memory" if cache.in_memory else cache.reason)
    elif cache.in_memory:
        form = spec.batch_form
        reason = f"{form.name}: {n:,} training rows > {limit:,} (the exact form does not scale)" if form else ""
    else:
        form = spec.batch_form
        reason = (f"{form.name}: " if form else "") + cache.reason
    if form is None:
        return _skip(spec, ctx, data, f"{spec.name} cannot learn from rows read in blocks, and its features do "
                                      f"not fit in memory: {cache.reason}")
    ctx = replace(ctx, form=form.name, work_bytes=cache.budget.work_bytes)
    if spec.memory is None:
        return HeadPlan(spec.name, form, data, ctx, reason, None, {})
    room = MemoryRoom(ctx, form, cache.row_bytes, min(n, cache.buffer_rows, chunk_rows_for(cache.row_bytes)), limit)
    fit = spec.memory(spec, room)
    if fit.too_big:
        return _skip(spec, fit.ctx, data, f"{fit.too_big} a quarter of the memory budget ({fmt_bytes(budget)})")
    return HeadPlan(spec.name, fit.form, data, fit.ctx, reason + fit.note, None, dict(fit.details))


def _skip(spec: HeadSpec, ctx: HeadContext, data: str, why: str) -> HeadPlan:
    return HeadPlan(spec.name, None, data, ctx, why, skipped=why)

