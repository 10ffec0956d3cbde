"""What a fit writes: the run folder (fitted heads, per-image predictions) and the content of results.json."""

from __future__ import annotations

import csv
import datetime as _dt
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline import package_versions
from pipeline.errors import FitError
from pipeline.fit.evaluate import HeadResult
from pipeline.fit.verdict import verdict
from pipeline.results import (OWNER_FILE, abandoned_partials, claim_partial, partial_builder, partial_dir,
                              result_key, slug)  # result_key and slug: the record's key rules, re-exported
from pipeline.stats import interval_spec

__all__ = ["DEFAULT_RUNS_DIR", "slug", "result_key", "default_out", "prepare_run_dir", "publish_run_dir",
           "discard_run_dir", "partial_dir", "save_head",
           "write_predictions", "write_splits", "cache_entry", "dataset_entry", "results_doc"]

DEFAULT_RUNS_DIR = Path("reports") / "runs"


def default_out(dataset: str) -> Path:
    """``reports/runs/<dataset>_<YYYYmmdd-HHMMSS>`` (with ``-2``, ``-3``... when taken)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = DEFAULT_RUNS_DIR / f"{slug(dataset)}_{stamp}"
    out, i = base, 2
    while out.exists() or partial_dir(out).exists():  # a fit started in the same second is building it
        out = base.with_name(f"{base.name}-{i}")
        i += 1
    return out


def prepare_run_dir(run_dir: Path, say: Callable[[str], None] = lambda _m: None) -> Path:
    """Make the folder a run is built in (:func:`partial_dir` of ``run_dir``, with ``heads/`` and ``predictions/``)
    and return it; :func:`publish_run_dir` makes the run appear complete at ``run_dir``.

    An unfinished folder of an earlier, interrupted fit into the same ``run_dir`` is replaced, and the unfinished
    folders that killed fits left beside it (under other names: a default ``--out`` has the time in it) are
    removed; ``say`` is told of each. The folder records this process as its builder (:data:`OWNER_FILE`), so a
    fit building into the same ``run_dir`` at the same time is never replaced.

    Raises
    ------
    FitError
        ``run_dir`` exists and is not empty (a finished run is never overwritten), another live fit is building
        it, or it cannot be created.
    """
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise FitError(f"run folder {run_dir} already exists and is not empty; pass another --out")
    work = partial_dir(run_dir)
    builder = partial_builder(work) if work.exists() else None
    if builder is not None:
        raise FitError(f"another fit (process {builder}) is building {run_dir} now: wait for it or pass another "
                       f"--out (if no fit is running, delete {work})")
    try:
        for stale in abandoned_partials(run_dir.parent):
            if stale != work:
                say(f"removed {stale}, the unfinished run folder of a fit that was killed")
                shutil.rmtree(stale, ignore_errors=True)
        if work.exists():
            say(f"replacing the unfinished run folder of an interrupted fit into {run_dir}")
            shutil.rmtree(work)
        (work / "heads").mkdir(parents=True)
        (work / "predictions").mkdir(parents=True)
        claim_partial(work)
    except OSError as exc:
        raise FitError(f"cannot create the run folder {run_dir} ({exc.strerror or exc}); pass a writable --out") \
            from None
    return work


def publish_run_dir(work: Path, run_dir: Path) -> None:
    """Move a complete run from its :func:`partial_dir` to ``run_dir`` in one rename (an empty ``run_dir`` is
    replaced)."""
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()
    (work / OWNER_FILE).unlink(missing_ok=True)
    work.replace(run_dir)


def discard_run_dir(work: Path) -> None:
    """Remove an unfinished run folder (after a failure or an interruption: nothing in it resumes)."""
    shutil.rmtree(work, ignore_errors=True)


def write_predictions(path: Path, res: HeadResult, paths: Sequence[str], splits: np.ndarray, labels: np.ndarray,
                      class_names: list[str]) -> None:
    """``predictions/<key>.csv``: one row per image of the final splits."""
    pred = np.argmax(res.proba, axis=1)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "true", "pred"] + [f"p_{c}" for c in class_names])
        for j, i in enumerate(res.final_rows):
            w.writerow([paths[i], splits[i], class_names[labels[i]], class_names[pred[j]]]
                       + [f"{v:.6g}" for v in res.proba[j]])


def save_head(res: HeadResult, kind: str, heads_dir: Path, key: str) -> str:
    """Save the fitted head (``.keras`` for Keras heads, joblib otherwise); its path relative to the run folder."""
    if kind == "keras":
        path = heads_dir / f"{key}.keras"
        res.estimator.save(path)
    else:
        import joblib

        path = heads_dir / f"{key}.joblib"
        joblib.dump(res.estimator, path)
    return f"heads/{path.name}"


def cache_entry(reader: Any, feature: str, data: str, feature_bytes: int) -> dict[str, Any]:
    """The ``caches[]`` entry of one cache (everything from its attributes: the file is not read again)."""
    m = reader.meta
    return {
        "path": str(Path(reader.path).resolve()), "sha256": str(m.get("content_sha256", "") or ""),
        "backbone": str(m.get("backbone")),
        "backbone_label": str(m.get("backbone_label")), "input_size": int(m.get("input_size", 0)),
        "preprocess": str(m.get("preprocess")), "resize": str(m.get("resize")),
        "alpha": m.get("alpha"), "pixel_rule": str(m.get("pixel_rule", "")),
        "weights_source": str(m.get("weights_source")), "weights_path": str(m.get("weights_path", "")),
        "weights_sha256": str(m.get("weights_sha256")),
        "feature": feature, "feature_shape": [int(s) for s in reader.shape], "n_rows": int(m.get("n_rows", 0)),
        "extract_seconds": float(m.get("extract_seconds", 0.0) or 0.0), "versions": dict(m.get("versions", {})),
        "command": str(m.get("command", "")), "created": str(m.get("created", "")),
        "data": data, "feature_bytes": int(feature_bytes),
        "views": dict(m["views"]) if isinstance(m.get("views"), dict) else None,
    }


def _counts(labels: np.ndarray, splits: np.ndarray, class_names: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for s in ("train", "val", "test"):
        m = splits == s
        if m.any():
            c = np.bincount(labels[m], minlength=len(class_names))
            out[s] = {name: int(c[i]) for i, name in enumerate(class_names)}
    return out


def dataset_entry(name: str, root: str, class_names: list[str], labels: np.ndarray, splits: np.ndarray,
                  protocol: Any, failed: list[tuple[str, str]]) -> dict[str, Any]:
    """The ``dataset`` object of results.json."""
    all_counts = np.bincount(labels, minlength=len(class_names))
    return {
        "name": name, "root": root, "class_names": class_names,
        "counts": _counts(labels, splits, class_names), "split_source": protocol.split_source,
        "split_rule": protocol.split_rule, "failed": [{"path": p, "reason": r} for p, r in failed],
        "imbalance_ratio": float(all_counts.max() / max(1, all_counts.min())),
    }


def write_splits(path: Path, paths: Sequence[str], splits: np.ndarray, labels: np.ndarray, class_names: list[str],
                 digests: Sequence[str]) -> None:
    """``splits.csv``: ``path,split,class,sha256`` for every image of the run (the final splits as fitted, and each
    file's content digest, which ``compare`` matches images of two runs by)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "class", "sha256"])
        for p, s, y, d in zip(paths, splits, labels, digests):
            w.writerow([p, s, class_names[int(y)], d])
    tmp.replace(path)


def results_doc(schema_version: int, command: str, seed: int, dataset: dict[str, Any], protocol: dict[str, Any],
                caches: list[dict[str, Any]], results: list[dict[str, Any]], skipped: list[dict[str, Any]],
                memory_budget: dict[str, Any], report_split: str, correct: dict[str, dict[str, np.ndarray]],
                rule: str, audit: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole results.json: ``best`` is the result the pick rule chose, with every other result compared with it
    on the same images (:func:`pipeline.fit.verdict.verdict`)."""
    if not results:
        why = "; ".join(f"{s['head']} on {s['backbone_label']}: {s['reason']}" for s in skipped[:3])
        raise FitError(f"every head was skipped ({why}); pass a larger --memory-budget")
    best = verdict(results, correct, report_split, str(protocol["selection"]), rule, seed)
    chosen = next((r for r in results if r["key"] == best["key"]), {})
    if isinstance(chosen.get("leak_free"), dict) and best["split"] in chosen["leak_free"]:
        best["leak_free"] = chosen["leak_free"][best["split"]]
    doc = {
        "schema_version": schema_version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "seed": int(seed),
        "versions": package_versions(("numpy", "scikit-learn", "scipy", "keras", "tensorflow", "h5py", "joblib")),
        "memory_budget": memory_budget,
        "dataset": dataset,
        "protocol": protocol,
        "statistics": interval_spec(seed),
        "caches": caches,
        "results": results,
        "skipped": skipped,
        "best": best,
    }
    if audit is not None:
        doc["audit"] = audit
    return doc
