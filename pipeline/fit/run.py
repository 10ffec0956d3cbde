"""The fit stage: cached features in, a run folder out (results.json, fitted heads, predictions, leaderboard).

One run compares heads on one dataset, across one or several feature caches of it (e.g. MobileNet and
MobileNetV2), by the protocol of :mod:`pipeline.fit.protocol`. All caches of a run are aligned on the images they have
in common, so every head and backbone is scored on the same rows and the same folds.

Run folder (default ``reports/runs/<dataset>_<YYYYmmdd-HHMMSS>/``)::

    results.json                 schema v1, documented in docs/results-format.md
    heads/<key>.joblib           scikit-learn Pipeline (joblib.load; predict() returns class names)
    heads/<key>.keras            dense head: plain Keras model, raw features in, softmax over class_names out
    predictions/<key>.csv        path,split,true,pred,p_<class>... for every row of the final splits

where ``<key>`` is ``<backbone label slug>__<head>`` (e.g. ``mobilenet_v2-a1.0-224__logreg``).
"""

from __future__ import annotations

import csv
import datetime as _dt
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline import package_versions
from pipeline.errors import CacheError, FitError
from pipeline.fit.evaluate import HeadResult, evaluate_head
from pipeline.fit.heads import HEADS, get_head, resolve_heads
from pipeline.fit.leaderboard import leaderboard_table
from pipeline.fit.protocol import plan_protocol, selection_folds
from pipeline.results import SCHEMA_VERSION, write_results

__all__ = ["FitRun", "run_fit", "leaderboard_table", "result_key", "FEATURE_KINDS", "CLASS_WEIGHTS"]

FEATURE_KINDS = ("avg", "max", "maps")
CLASS_WEIGHTS = ("none", "balanced")
DEFAULT_RUNS_DIR = Path("reports") / "runs"


@dataclass
class FitRun:
    """What :func:`run_fit` made.

    Attributes
    ----------
    run_dir : Path
        The run folder.
    results : dict
        The content of ``results.json``.
    report_path : Path or None
        The HTML report, when one was written.
    """

    run_dir: Path
    results: dict[str, Any]
    report_path: Path | None = None

    def leaderboard(self):
        """The leaderboard as a ``rich.table.Table`` (see :func:`leaderboard_table`)."""
        return leaderboard_table(self.results)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "cache"


def result_key(backbone_label: str, head: str) -> str:
    """``<backbone label slug>__<head>``, the name of a result and of its files."""
    return f"{_slug(backbone_label)}__{head}"


def _select_caches(cache_dir: str | Path, dataset: str | None, backbones: Sequence[str] | None) -> list[Path]:
    from pipeline.cache import find_caches

    cache_dir = Path(cache_dir)
    if backbones:
        found: list[Path] = []
        for b in backbones:
            for p in find_caches(cache_dir, dataset=dataset, backbone=b):
                if p not in found:
                    found.append(p)
    else:
        found = find_caches(cache_dir, dataset=dataset)
    if not found:
        what = [f"dataset {dataset!r}" if dataset else "", f"backbone {', '.join(backbones)}" if backbones else ""]
        what_s = " for " + " and ".join(w for w in what if w) if any(what) else ""
        raise CacheError(f"no complete feature caches in {cache_dir}{what_s}; make one with "
                         f"`python cli.py extract DATA_DIR --cache-dir {cache_dir}`")
    return found


def _check_one_dataset(metas: list[dict[str, Any]], searched: bool) -> None:
    """Refuse caches of several datasets (a dataset is its name and its folder)."""
    datasets = sorted({(str(m.get("dataset_name")), str(m.get("dataset_root"))) for m in metas})
    if len(datasets) > 1:
        names = sorted({name for name, _ in datasets})
        if searched and len(names) > 1:
            raise FitError(f"the caches hold several datasets: {', '.join(names)}; pick one with --dataset NAME")
        listing = "; ".join(f"{name} ({root})" for name, root in datasets)
        raise FitError(f"caches of different datasets mixed: {listing}; fit one dataset at a time "
                       f"(pass caches of one dataset, or keep datasets in separate cache folders)")


def _align(sets: list[Any]) -> tuple[list[str], list[np.ndarray]]:
    """Paths common to all feature sets (in the first set's order) and each set's row indices for them."""
    common = set(sets[0].paths)
    for fs in sets[1:]:
        common &= set(fs.paths)
    order = [p for p in sets[0].paths if p in common]
    rows = []
    for fs in sets:
        index = {p: i for i, p in enumerate(fs.paths)}
        rows.append(np.array([index[p] for p in order], dtype=np.int64))
    return order, rows


def _counts(labels: np.ndarray, splits: np.ndarray, class_names: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for s in ("train", "val", "test"):
        m = splits == s
        if m.any():
            c = np.bincount(labels[m], minlength=len(class_names))
            out[s] = {name: int(c[i]) for i, name in enumerate(class_names)}
    return out


def _cache_entry(fs: Any, feature: str, shape: tuple[int, ...]) -> dict[str, Any]:
    m = fs.meta
    return {
        "path": str(Path(fs.path).resolve()), "sha256": fs.file_sha256, "backbone": str(m.get("backbone")),
        "backbone_label": str(m.get("backbone_label")), "input_size": int(m.get("input_size", 0)),
        "preprocess": str(m.get("preprocess")), "resize": str(m.get("resize")),
        "alpha": m.get("alpha"), "pixel_rule": str(m.get("pixel_rule", "")),
        "weights_source": str(m.get("weights_source")), "weights_path": str(m.get("weights_path", "")),
        "weights_sha256": str(m.get("weights_sha256")),
        "feature": feature, "feature_shape": [int(s) for s in shape], "n_rows": int(m.get("n_rows", 0)),
        "extract_seconds": float(m.get("extract_seconds", 0.0) or 0.0), "versions": dict(m.get("versions", {})),
        "command": str(m.get("command", "")), "created": str(m.get("created", "")),
    }


def _default_out(dataset: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = DEFAULT_RUNS_DIR / f"{_slug(dataset)}_{stamp}"
    out, i = base, 2
    while out.exists():
        out = base.with_name(f"{base.name}-{i}")
        i += 1
    return out


def _write_predictions(path: Path, res: HeadResult, paths: list[str], splits: np.ndarray, labels: np.ndarray,
                       class_names: list[str]) -> None:
    pred = np.argmax(res.proba, axis=1)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "true", "pred"] + [f"p_{c}" for c in class_names])
        for j, i in enumerate(res.final_rows):
            w.writerow([paths[i], splits[i], class_names[labels[i]], class_names[pred[j]]]
                       + [f"{v:.6g}" for v in res.proba[j]])


def _save_head(res: HeadResult, heads_dir: Path, key: str) -> str:
    if get_head(res.head).kind == "keras":
        path = heads_dir / f"{key}.keras"
        res.estimator.save(path)
    else:
        import joblib

        path = heads_dir / f"{key}.joblib"
        joblib.dump(res.estimator, path)
    return f"heads/{path.name}"


def run_fit(cache_dir: str | Path = "cache", *, caches: Sequence[str | Path] | None = None,
            dataset: str | None = None, backbones: Sequence[str] | None = None,
            heads: Sequence[str] | None = None, features: str = "avg", class_weight: str = "none", seed: int = 0,
            out: str | Path | None = None, report: bool = True, command: str = "",
            log: Callable[[str], None] | None = None) -> FitRun:
    """Fit and compare heads on cached features and write a run folder.

    Parameters
    ----------
    cache_dir : path, default "cache"
        Folder searched for complete caches (ignored when ``caches`` is given).
    caches : sequence of path, optional
        Explicit cache files (all of one dataset).
    dataset : str, optional
        Dataset name to pick when the folder holds caches of several datasets.
    backbones : sequence of str, optional
        Keep only caches of these backbones (name like ``mobilenet_v2`` or label like ``mobilenet_v2-a1.0-224``).
    heads : sequence of str, optional
        Head names or ``all`` (default: all registered heads).
    features : {"avg", "max", "maps"}
        Which cached features to fit on (``maps`` must have been extracted with ``--maps``).
    class_weight : {"none", "balanced"}
    seed : int
        Seed of the hash split, the folds and every head.
    out : path, optional
        Run folder (must not exist or be empty); default ``reports/runs/<dataset>_<timestamp>``.
    report : bool
        Also write the HTML report, ``reports/<run folder name>.html``, with :func:`pipeline.report.write_report`.
    command : str
        The command line, recorded as provenance.
    log : callable, optional
        Receives one line per fitted head (progress).

    Returns
    -------
    FitRun

    Raises
    ------
    FitError
        Unknown head, feature kind or class weight; several datasets without ``dataset``; caches of different
        datasets or class sets; data the protocol cannot use (see :func:`pipeline.fit.protocol.plan_protocol`); an
        existing non-empty ``out``.
    CacheError
        No cache found, or one that cannot be read.
    """
    from pipeline.cache import read_features, read_meta

    say = log or (lambda _m: None)
    head_list = resolve_heads(list(heads) if heads else None)
    if features not in FEATURE_KINDS:
        raise FitError(f"unknown --features {features!r}; choose one of {', '.join(FEATURE_KINDS)}")
    if class_weight not in CLASS_WEIGHTS:
        raise FitError(f"unknown --class-weight {class_weight!r}; choose one of {', '.join(CLASS_WEIGHTS)}")
    cw = "balanced" if class_weight == "balanced" else None

    paths = [Path(p) for p in caches] if caches else _select_caches(cache_dir, dataset, backbones)
    metas = [read_meta(p) for p in paths]
    _check_one_dataset(metas, searched=not caches)
    sets = [read_features(p, kind=features) for p in paths]
    class_names = list(sets[0].class_names)
    for fs in sets[1:]:
        if list(fs.class_names) != class_names:
            raise FitError(f"caches disagree on the classes ({', '.join(class_names)} vs "
                           f"{', '.join(fs.class_names)}); extract them again from the same dataset folder")
    rel_paths, rows = _align(sets)
    if not rel_paths:
        raise FitError("the caches have no image in common; extract them again from the same dataset folder")
    dropped = max(len(fs.paths) for fs in sets) - len(rel_paths)
    if dropped:
        say(f"note: {dropped} images are not in every cache; comparing on the {len(rel_paths)} common ones")
    base = sets[0]
    labels = base.labels[rows[0]].astype(np.int64)
    cached_splits = base.splits[rows[0]].astype(str)
    splits, protocol = plan_protocol(cached_splits, labels, class_names, rel_paths, seed)
    folds = selection_folds(protocol, splits, labels, seed)
    ds_name = str(base.meta.get("dataset_name") or Path(str(base.meta.get("dataset_root", "dataset"))).name)

    run_dir = Path(out) if out is not None else _default_out(ds_name)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise FitError(f"run folder {run_dir} already exists and is not empty; pass another --out")
    (run_dir / "heads").mkdir(parents=True, exist_ok=True)
    (run_dir / "predictions").mkdir(parents=True, exist_ok=True)

    failed: dict[str, str] = {}
    for fs in sets:
        for p, reason in fs.failed:
            failed.setdefault(p, reason)
    all_counts = np.bincount(labels, minlength=len(class_names))
    dataset_json = {
        "name": ds_name, "root": str(base.meta.get("dataset_root", "")), "class_names": class_names,
        "counts": _counts(labels, splits, class_names), "split_source": protocol.split_source,
        "split_rule": protocol.split_rule, "failed": [{"path": p, "reason": r} for p, r in sorted(failed.items())],
        "imbalance_ratio": float(all_counts.max() / max(1, all_counts.min())),
    }

    cache_json: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    scores: list[float] = []
    used_labels: set[str] = set()
    for ci, (fs, r) in enumerate(zip(sets, rows)):
        X = fs.features[r]
        cache_json.append(_cache_entry(fs, features, tuple(X.shape[1:])))
        label = str(fs.meta.get("backbone_label") or fs.meta.get("backbone"))
        slug_label = _slug(label)
        if slug_label in used_labels:
            slug_label = f"{slug_label}-{ci}"
        used_labels.add(slug_label)
        for name in head_list:
            spec = HEADS[name]
            t0 = time.perf_counter()
            res = evaluate_head(spec, X, labels, splits, class_names, rel_paths, protocol, folds, seed, cw)
            key = f"{slug_label}__{name}"
            model_file = _save_head(res, run_dir / "heads", key)
            _write_predictions(run_dir / "predictions" / f"{key}.csv", res, rel_paths, splits, labels, class_names)
            entry = {"key": key, "cache_index": ci, "backbone_label": label, **res.to_json(),
                     "model_file": model_file, "predictions_file": f"predictions/{key}.csv"}
            results.append(entry)
            scores.append(res.selection_score)
            rep = res.metrics[protocol.report_split]
            say(f"{label:<24} {name:<11} {protocol.selection} acc {res.selection_score:.3f}  "
                f"{protocol.report_split} acc {rep['accuracy']:.3f}  ({time.perf_counter() - t0:.1f} s)")

    best_i = int(np.flatnonzero(np.array(scores) >= np.max(scores) - 1e-12)[0])
    best = results[best_i]
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or f"run_fit(heads={head_list}, features={features!r}, seed={seed})",
        "seed": int(seed),
        "versions": package_versions(("numpy", "scikit-learn", "keras", "tensorflow", "h5py", "joblib")),
        "dataset": dataset_json,
        "protocol": protocol.to_json(),
        "caches": cache_json,
        "results": results,
        "best": {"key": best["key"], "split": protocol.report_split, "metric": "accuracy",
                 "value": float(best["metrics"][protocol.report_split]["accuracy"])},
    }
    write_results(run_dir, doc)

    run = FitRun(run_dir=run_dir, results=doc)
    if report:
        from pipeline.report import write_report

        run.report_path = write_report([run_dir])  # reports/<run name>.html, as `python cli.py report RUN` does
    return run
