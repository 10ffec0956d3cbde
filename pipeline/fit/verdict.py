"""The run's verdict: which result it recommends, why, and how every other result compares with it on the same
images (results.json's ``best`` and ``results[].vs_pick``; rules in :mod:`pipeline.fit.pick` and
:mod:`pipeline.stats`)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from pipeline.fit.pick import pick
from pipeline.stats import corrected_paired_t, holm, min_detectable_difference, paired_difference

__all__ = ["verdict"]


def _selection_vs(other: dict[str, Any], chosen: dict[str, Any], selection: str,
                  correct: Mapping[str, Mapping[str, np.ndarray]], seed: tuple[int, ...]) -> dict[str, Any] | None:
    """The selection-score comparison of ``other`` with the pick, paired over the same folds or val images."""
    if selection == "cv":
        a = other["selection"].get("scores") or []
        b = chosen["selection"].get("scores") or []
        if len(a) < 2 or len(a) != len(b):
            return None
        k = len(a)
        t = corrected_paired_t(a, b, 1.0 / (k - 1))  # k-fold: each fold scores 1/k of the rows, fits the rest
        return {"method": "nadeau_bengio", "folds": k, "delta": t["delta"], "se": t["se"], "p_value": t["p_value"],
                "tied": bool(t["p_value"] >= 0.05)}
    va, vb = correct.get(other["key"], {}).get("val"), correct.get(chosen["key"], {}).get("val")
    if va is None or vb is None:
        return None
    d = paired_difference(va, vb, seed)
    return {"method": "paired_bootstrap_val", "n": d["n"], "delta": d["delta"], "delta_interval": d["delta_interval"],
            "p_value": d["p_value"], "tied": d["tied"]}


def verdict(entries: list[dict[str, Any]], correct: Mapping[str, Mapping[str, np.ndarray]], report_split: str,
            selection: str, rule: str, seed: int) -> dict[str, Any]:
    """Pick a result and compare every other one with it; sets ``vs_pick`` on each entry but the pick.

    Parameters
    ----------
    entries : list of dict
        results.json entries with ``key``, ``head``, ``selection`` and ``metrics`` (changed in place).
    correct : mapping
        ``key -> split -> bool array``: whether each head got each image of a final split right, the images in the
        same order for every key.
    report_split : str
        The split of the final numbers.
    selection : {"cv", "val"}
        How the run selected (decides how selection scores are paired).
    rule : str
        The pick rule (:data:`pipeline.fit.pick.PICK_RULES`).
    seed : int
        Seed of the paired bootstraps.

    Returns
    -------
    dict
        results.json's ``best``.
    """
    p = pick(entries, rule)
    chosen = entries[p.index]
    key = chosen["key"]
    others = [i for i in range(len(entries)) if i != p.index]
    comps: dict[int, dict[str, Any]] = {}
    for i in others:
        e = entries[i]
        a, b = correct.get(e["key"], {}).get(report_split), correct.get(key, {}).get(report_split)
        if a is None or b is None:
            continue
        d = paired_difference(a, b, (int(seed), 7, i))
        comps[i] = {"split": report_split, "n": d["n"], "pick_only_right": d["b_only_right"],
                    "other_only_right": d["a_only_right"], "p_value": d["p_value"], "delta": d["delta"],
                    "delta_interval": d["delta_interval"], "tied": d["tied"],
                    "selection": _selection_vs(e, chosen, selection, correct, (int(seed), 8, i))}
    adjusted = holm([comps[i]["p_value"] for i in comps])
    for i, ph in zip(comps, adjusted):
        comps[i]["p_holm"] = ph
        entries[i]["vs_pick"] = comps[i]
    chosen.pop("vs_pick", None)
    m = chosen["metrics"][report_split]
    n = int(m.get("n", 0))
    mdd = min_detectable_difference(n)
    within = [entries[i]["key"] for i in p.within if i != p.index]
    tied = [entries[i]["key"] for i in comps if comps[i]["tied"]]
    return {"key": key, "split": report_split, "metric": "accuracy", "value": float(m["accuracy"]),
            "interval": (m.get("intervals") or {}).get("accuracy"), "n": n, "rule": rule, "reason": p.reason,
            "tied_with": tied, "within_one_se": within, "min_detectable": mdd,
            "selection_is_final": bool(selection == "val" and report_split == "val")}
