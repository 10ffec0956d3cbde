"""Which result a run recommends: the pick rules, and the one tie rule of selection scores.

A rule sees each result's selection score and its standard error (``results[].selection``), never a final-split
number, so the headline stays untouched by the choice.

- ``best``: the highest selection score (the earliest result in run order on an exact tie, within
  :data:`SCORE_TIE`).
- ``one_se``: among the results whose selection score is within one standard error of the best (the best's own
  standard error, Nadeau-Bengio corrected over cross-validation folds, or the binomial one over val images), the
  first in the heads' ``strength_rank`` order (logistic regression, RBF SVM, dense, linear SVM, k-NN, nearest
  centroid); among several results of that head (several backbones), the highest score.
- ``one_se_simple``: the same, in the heads' ``simplicity_rank`` order (nearest centroid first): the classic
  one-standard-error rule.

The default (:data:`DEFAULT_RULE`) is the rule with the lowest mean regret across training sizes in
``bench/pick.py`` (docs/benchmarks.md, "Choosing the pick rule").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pipeline.fit.heads import HEADS
from pipeline.results import SCORE_TIE, first_best  # the record's tie rule, re-exported for the pick rules

__all__ = ["PICK_RULES", "DEFAULT_RULE", "SCORE_TIE", "Pick", "pick", "first_best"]


@dataclass(frozen=True)
class Pick:
    """A rule's choice.

    Attributes
    ----------
    index : int
        Position of the picked entry in the list given.
    rule : str
    reason : str
        One sentence saying why.
    within : list of int
        Entries within noise of the best selection score (the rule's candidates; for ``best``, those within one
        standard error, for information).
    """

    index: int
    rule: str
    reason: str
    within: list[int]


def _rank(attr: str) -> Callable[[str], int]:
    def rank(head: str) -> int:
        spec = HEADS.get(head)
        return int(getattr(spec, attr)) if spec is not None else 99
    return rank


_ORDERS: dict[str, tuple[Callable[[str], int], str]] = {
    "one_se": (_rank("strength_rank"), "strongest head"),
    "one_se_simple": (_rank("simplicity_rank"), "simplest head"),
}

PICK_RULES = ("best", "one_se", "one_se_simple")
"""Registered rule names (``fit --pick``)."""

DEFAULT_RULE = "one_se"


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def pick(entries: Sequence[dict[str, Any]], rule: str = DEFAULT_RULE) -> Pick:
    """Apply a pick rule to results entries.

    Parameters
    ----------
    entries : sequence of dict
        Each with ``key``, ``head`` and ``selection`` = ``{"score", "se"}`` (``se`` may be missing or None: then
        0, and only exact ties are within noise).
    rule : str
        One of :data:`PICK_RULES`.

    Returns
    -------
    Pick

    Raises
    ------
    ValueError
        An unknown rule or no entry (callers check user input first).
    """
    if rule not in PICK_RULES:
        raise ValueError(f"unknown pick rule {rule!r}; choose one of {', '.join(PICK_RULES)}")
    if not entries:
        raise ValueError("internal: nothing to pick from")
    scores = [float(e["selection"]["score"]) for e in entries]
    ses = [float(e["selection"].get("se") or 0.0) for e in entries]
    top = first_best(scores)
    threshold = scores[top] - ses[top]
    within = [i for i, s in enumerate(scores) if s >= threshold - SCORE_TIE]
    best_e = entries[top]
    if len(entries) == 1:
        return Pick(0, rule, f"the only result ({best_e['key']}).", [0])
    if rule == "best":
        others = len(within) - 1
        tail = (f"; {others} other result{'s' if others != 1 else ''} within one standard error of it"
                if others else "; no other result within one standard error of it")
        return Pick(top, rule, f"highest selection score ({_fmt(scores[top])} \u00b1 {_fmt(ses[top])}){tail}.",
                    within)
    order, what = _ORDERS[rule]
    chosen = min(within, key=lambda i: (order(str(entries[i]["head"])), -scores[i], i))
    if chosen == top:
        if len(within) == 1:
            reason = (f"highest selection score ({_fmt(scores[top])} \u00b1 {_fmt(ses[top])}), more than one "
                      f"standard error above every other result.")
        else:
            reason = (f"highest selection score ({_fmt(scores[top])} \u00b1 {_fmt(ses[top])}), and the {what} of "
                      f"the {len(within)} results within one standard error of it.")
    else:
        reason = (f"the {what} among the {len(within)} results within one standard error of the best selection "
                  f"score ({best_e['key']}: {_fmt(scores[top])} \u00b1 {_fmt(ses[top])}); its own is "
                  f"{_fmt(scores[chosen])}, a difference the selection data cannot tell from noise.")
    return Pick(chosen, rule, reason, within)
