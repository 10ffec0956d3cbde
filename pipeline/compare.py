"""``compare``: the same results of several runs side by side, paired on the images they share.

Typical uses: with and without views, before and after fine-tuning, two backbones extracted on different days,
two seeds. The first run is the baseline; every other run is compared with it.

Rules
-----
1. **Images are matched by content, never by file order.** An image of one run is the same image in another when
   both its relative path and its content digest (SHA-256 of the file, from the run's ``splits.csv``, or for runs
   written before it, from its cache) agree; an image moved or renamed between runs is matched by its digest alone
   when that digest names a single image in each run. A path whose content changed is a different image.
2. **Runs of different class lists are not compared**, and neither are runs that share no scored image: one line
   says which. An image the two runs label differently is left out and counted.
3. **Scored images**: each run's final split (``test``, or ``val`` without one), as its pick's number is.
4. For every result key (``<backbone>__<head>``) of the baseline that the other run has too, and for the two runs'
   picks: both accuracies on the shared images, the discordant counts, the exact McNemar p-value, Holm-corrected over
   the keys of that pair of runs, and a paired bootstrap 95 % interval of the difference (other - baseline); tied
   when it contains 0 (:mod:`pipeline.stats`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.errors import CacheError, RunError
from pipeline.report import render_compare
from pipeline.results import Run, load_run, read_predictions, read_splits
from pipeline.stats import holm, paired_difference

__all__ = ["COMPARE_SCHEMA", "compare_runs", "match_images", "write_compare"]

COMPARE_SCHEMA = 1
"""Version of ``compare.json`` (docs/results-format.md, "compare.json")."""


def _digests(run: Run) -> dict[str, str]:
    """Relative path -> content digest of every image of the run."""
    rows = read_splits(run)
    if rows is not None:
        return {r["path"]: r["sha256"] for r in rows}
    from pipeline.cache import open_features

    for c in run.results.get("caches") or []:
        path = Path(str(c.get("path") or ""))
        if path.is_file():
            try:
                with open_features(path, kind=str(c.get("feature") or "avg")) as reader:
                    return dict(zip(reader.paths, reader.digests))
            except (CacheError, OSError):  # a damaged or changed cache: try the next one
                continue
    raise RunError(f"run {run.path} has no splits.csv and none of its caches can be read, so its images cannot be "
                   f"matched by content: rerun `python cli.py fit` on it")


def match_images(a: dict[str, str], b: dict[str, str]) -> list[tuple[str, str]]:
    """Pairs (path in a, path in b) of the same image (see rule 1 of the module docstring).

    Parameters
    ----------
    a, b : dict
        Relative path -> content digest, of the images scored in each run.

    Returns
    -------
    list of (str, str)
        In ``a``'s path order.
    """
    pairs = [(p, p) for p, d in a.items() if d and b.get(p) == d]
    used_a = {p for p, _ in pairs}
    used_b = set(used_a)

    def unique(side: dict[str, str], used: set[str]) -> dict[str, str]:
        by: dict[str, list[str]] = {}
        for p, d in side.items():
            if p not in used and d:
                by.setdefault(d, []).append(p)
        return {d: ps[0] for d, ps in by.items() if len(ps) == 1}

    ua, ub = unique(a, used_a), unique(b, used_b)
    pairs += [(pa, ub[d]) for d, pa in ua.items() if d in ub]
    order = {p: i for i, p in enumerate(a)}
    return sorted(pairs, key=lambda ab: order[ab[0]])


def _scored(run: Run) -> tuple[str, dict[str, dict[str, bool]], dict[str, str]]:
    """The run's final split, per result key its correctness per path on that split, and each path's true class."""
    split = str((run.results.get("protocol") or {}).get("final_splits", ["test"])[-1])
    right: dict[str, dict[str, bool]] = {}
    truth: dict[str, str] = {}
    for e in run.results["results"]:
        rows = [r for r in read_predictions(run, e) if r["split"] == split]
        right[str(e["key"])] = {r["path"]: r["true"] == r["pred"] for r in rows}
        for r in rows:
            truth.setdefault(r["path"], r["true"])
    return split, right, truth


def _pair(base: Run, other: Run, seed: int, index: int) -> dict[str, Any]:
    names_a = list(base.results["dataset"].get("class_names") or [])
    names_b = list(other.results["dataset"].get("class_names") or [])
    if names_a != names_b:
        raise RunError(f"runs {base.name} and {other.name} were fitted on different classes ({', '.join(names_a)} vs "
                       f"{', '.join(names_b)}): compare runs of the same classes")
    split_a, right_a, truth_a = _scored(base)
    split_b, right_b, truth_b = _scored(other)
    dig_a, dig_b = _digests(base), _digests(other)
    pairs = match_images({p: dig_a.get(p, "") for p in truth_a}, {p: dig_b.get(p, "") for p in truth_b})
    disagree = [(pa, pb) for pa, pb in pairs if truth_a[pa] != truth_b[pb]]
    pairs = [(pa, pb) for pa, pb in pairs if truth_a[pa] == truth_b[pb]]
    if not pairs:
        raise RunError(f"runs {base.name} ({split_a}, {len(truth_a)} images) and {other.name} ({split_b}, "
                       f"{len(truth_b)} images) share no scored image (matched by path and content digest): "
                       f"nothing to compare")
    by_path = sum(pa == pb for pa, pb in pairs)
    keys = [k for k in right_a if k in right_b]
    rows_in: list[tuple[str, str, str]] = [(k, k, k) for k in keys]
    best_a, best_b = str(base.results["best"]["key"]), str(other.results["best"]["key"])
    if best_a in right_a and best_b in right_b:
        rows_in.append(("picks", best_a, best_b))
    rows = []
    for j, (label, ka, kb) in enumerate(rows_in):
        ca = np.array([right_a[ka][pa] for pa, _ in pairs])
        cb = np.array([right_b[kb][pb] for _, pb in pairs])
        d = paired_difference(cb, ca, (int(seed), index, j))
        rows.append({"key": label, "base_key": ka, "other_key": kb, "n": d["n"],
                     "base_accuracy": float(ca.mean()), "other_accuracy": float(cb.mean()),
                     "base_only_right": d["b_only_right"], "other_only_right": d["a_only_right"],
                     "p_value": d["p_value"], "delta": d["delta"], "delta_interval": d["delta_interval"],
                     "tied": d["tied"]})
    for r, p in zip(rows, holm([r["p_value"] for r in rows])):
        r["p_holm"] = p
    return {"base": base.name, "other": other.name, "base_split": split_a, "other_split": split_b,
            "shared_images": len(pairs), "matched_by_path": by_path, "matched_by_digest_only": len(pairs) - by_path,
            "label_disagreements": len(disagree), "base_images": len(truth_a), "other_images": len(truth_b),
            "common_keys": keys, "rows": rows}


def compare_runs(run_dirs: Sequence[str | os.PathLike], seed: int = 0) -> dict[str, Any]:
    """Compare runs with the first one (see the module docstring); the content of ``compare.json``.

    Parameters
    ----------
    run_dirs : sequence of path
        Two or more run folders written by ``fit``.
    seed : int
        Seed of the paired bootstraps.

    Raises
    ------
    RunError
        Fewer than two runs, an unreadable run, runs of different classes or sharing no scored image.
    """
    if len(run_dirs) < 2:
        raise RunError("compare needs at least two run folders")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r.path) for r in runs]
    pairs = [_pair(runs[0], other, seed, i) for i, other in enumerate(runs[1:], start=1)]
    return {"schema_version": COMPARE_SCHEMA, "seed": int(seed),
            "runs": [{"name": r.name, "path": str(r.path.resolve()), "best": r.results["best"]["key"]} for r in runs],
            "pairs": pairs,
            "method": "images matched by relative path and content digest; exact McNemar on the discordant images, "
                      "Holm-corrected over the keys of each pair of runs; paired bootstrap 95 % interval of the "
                      "accuracy difference (other - base)"}


def write_compare(doc: dict[str, Any], out_html: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``compare.json`` beside the HTML page (``<stem>.json``) and the page itself.

    Raises
    ------
    RunError
        The files cannot be written.
    """
    out = Path(out_html)
    js = out.with_suffix(".json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for path, text in ((js, json.dumps(doc, indent=1, allow_nan=False)), (out, render_compare(doc))):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
    except OSError as exc:
        raise RunError(f"cannot write the comparison to {out} ({exc.strerror}): pass another --out") from None
    return out, js
