"""The one reader and writer of ``results.json``, the record a ``fit`` run leaves in its run folder.

``fit`` writes it with :func:`write_results`; ``report``, ``predict``, ``export`` and ``finetune`` read it with
:func:`load_run`, once per command and run folder. The record's rules live here and nowhere else: result keys and
slugs, the tie rule (:func:`first_best`), the builders of every object of the file (:func:`run_document` and the
``*_record`` functions), which result a name picks and the extraction it came from (:func:`select_head`,
:class:`RunHead`, :func:`resolve_run_weights`, :func:`run_model_config`: the feature model to rebuild, its weights
hashed once), head files bound to their entries by SHA-256 (:func:`head_file`), the run's lock and the commit of a
new result (:func:`commit_result`). The run folder's other files are written and read here too, each writer beside
its reader: ``splits.csv`` (:func:`write_splits`), ``predictions/<key>.csv`` (:func:`write_result_predictions`)
and the audit files' columns (:data:`AUDIT_COLUMNS`). The format is ``docs/results-format.md``;
:data:`SCHEMA_VERSION` is the version written, :data:`READABLE_VERSIONS` the versions read.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from pipeline import cache, package_versions
from pipeline.atomic import write_then_commit
from pipeline.backbones import ModelConfig, WeightsInfo, check_weights_file, resolve_model, sha256_file
from pipeline.errors import RunError, WeightsError
from pipeline.stats import interval_spec
from pipeline.views import VIEW_RULE, ViewSpec

__all__ = ["SCHEMA_VERSION", "READABLE_VERSIONS", "RESULTS_FILE", "Run", "load_run", "upgrade", "write_results",
           "jsonable", "put_result", "read_splits", "read_predictions", "read_audit", "SPLITS_FILE", "AUDIT_COLUMNS",
           "partial_dir", "LOCK_FILE", "run_lock", "file_sha256", "head_file", "commit_result", "staged_name",
           "pick_file_problem", "OWNER_FILE", "pid_alive", "claim_partial", "partial_builder", "abandoned_partials",
           "FINETUNE_HEAD", "SCORE_TIE", "slug", "cache_label", "result_key", "finetune_key", "first_best",
           "report_split", "EXTRACTION_KEYS", "RunHead", "find_results", "run_head", "select_head",
           "resolve_run_weights", "run_model_config", "SPLITS_COLUMNS", "write_splits", "write_csv",
           "PREDICTIONS_COLUMNS", "write_result_predictions", "cache_record", "dataset_record", "result_record", "skipped_record",
           "run_document", "split_counts", "RECORDED_VERSIONS"]

AUDIT_COLUMNS = {"duplicates": ("cluster", "path", "split", "class", "nearest", "distance", "kind"),
                 "label_issues": ("path", "split", "class", "suggested", "score"),
                 "outliers": ("path", "split", "class", "score")}
"""The columns of each audit file (docs/audit.md)."""

SCHEMA_VERSION = 3
"""The ``results.json`` schema version written by ``fit``. Version 3 added how sure every number is: the 95 %
intervals and image counts of every final-split metric (``results[].metrics[<split>].intervals``, ``.n``), the
selection score's standard error and fold scores (``results[].selection.se``, ``.scores``, ``.n``), every result
compared with the pick on the same images (``results[].vs_pick``), the pick rule and its reason (``best.rule``,
``best.reason``, ``best.tied_with``, ``best.interval``, ``best.n``), how intervals were computed (``statistics``),
where selection was asked for (``protocol.select_on``), the data audit (``audit``) and ``splits.csv``. Version 2
added the chosen candidate and its selection
score (``results[].selection``), how each head was fitted (``results[].cost``: form, approximation, streamed or in
memory, search subsample), the heads that were skipped with the reason (``skipped``) and the memory budget; a
version-1 reader would silently show neither the skipped heads nor the approximations."""

READABLE_VERSIONS = (1, 2, 3)
"""Schema versions :func:`load_run` reads (version 1 is brought to version 2's shape in memory: see
:func:`upgrade`; versions 1 and 2 lack every version-3 field, which readers show as absent)."""


# ---- the record's own rules: result keys, the report split, the tie rule ------------------------------------------

FINETUNE_HEAD = "finetune"
"""Head name of a fine-tuned model's result (its key: the starting head's with the head name replaced)."""

SCORE_TIE = 1e-12
"""Scores closer than this are equal (floating-point noise of means over folds)."""


def slug(text: str) -> str:
    """Letters, digits, ``.``, ``_`` and ``-`` of ``text`` (other runs become ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "cache"


def cache_label(meta: Mapping[str, Any]) -> str:
    """What a cache is called in a run, its results and its report: its ``backbone_label`` (the backbone with the
    width and input size that set it apart, e.g. ``mobilenet_v2-a0.5-160``), else its backbone's name (caches made
    before labels); "" when it has neither."""
    return str(meta.get("backbone_label") or meta.get("backbone") or "")


def result_key(backbone_label: str, head: str) -> str:
    """``<backbone label slug>__<head>``, the name of a result and of its files."""
    return f"{slug(backbone_label)}__{head}"


def finetune_key(start_key: str) -> str:
    """Key of the model fine-tuned from the result ``start_key``: same backbone part, head ``finetune``."""
    return f"{str(start_key).rsplit('__', 1)[0]}__{FINETUNE_HEAD}"


def report_split(final_splits: Sequence[str]) -> str:
    """The split whose numbers represent a head (``best``, the leaderboard, mistakes): the last of the protocol's
    ``final_splits`` (``test`` when there is one)."""
    return str(final_splits[-1])


def first_best(scores: Sequence[float]) -> int:
    """Index of the highest score; ties (within :data:`SCORE_TIE`) go to the earliest."""
    s = np.asarray(scores, dtype=np.float64)
    return int(np.flatnonzero(s >= np.nanmax(s) - SCORE_TIE)[0])


RESULTS_FILE = "results.json"
SPLITS_FILE = "splits.csv"
SPLITS_COLUMNS = ("path", "split", "class", "sha256")
"""The columns of ``splits.csv``, one row per image of the run (docs/results-format.md)."""

_REQUIRED_TOP = ("schema_version", "dataset", "protocol", "caches", "results", "best")
_REQUIRED_RESULT = ("key", "cache_index", "head", "metrics")


@dataclass(frozen=True)
class Run:
    """One run folder as read from disk.

    Attributes
    ----------
    path : Path
        The run folder.
    results : dict
        The parsed and checked ``results.json``.
    """

    path: Path
    results: dict

    @property
    def name(self) -> str:
        """The run folder's name (e.g. ``flowers5_20250101-120000``)."""
        return self.path.name


def partial_dir(run_dir: str | os.PathLike) -> Path:
    """Where ``fit`` builds a run until it is complete: ``.<name>.partial`` beside the run folder (hidden, so a
    glob like ``reports/runs/*`` never picks it up); the run appears at ``run_dir`` in one rename at the end."""
    run_dir = Path(run_dir)
    return run_dir.with_name(f".{run_dir.name}.partial")


def _unfinished(path: Path) -> bool:
    return (path.name.startswith(".") and path.name.endswith(".partial")) or partial_dir(path).is_dir()


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read and check the ``results.json`` of one run folder.

    Parameters
    ----------
    run_dir : path
        A folder written by ``fit`` (or the ``results.json`` inside it).

    Returns
    -------
    Run

    Raises
    ------
    RunError
        The folder or its ``results.json`` is missing, is not valid JSON, has a schema version this headbench does
        not read, or lacks a field every reader relies on. The message is one line saying what to do.
    """
    path = Path(run_dir).expanduser()
    if path.is_file() and path.name == RESULTS_FILE:
        path = path.parent
    if _unfinished(path) and not (path / RESULTS_FILE).is_file():
        raise RunError(f"run folder {path} is unfinished: its fit was interrupted or failed (or is still running); "
                       f"rerun the same `python cli.py fit` command to make it")
    if not path.is_dir():
        raise RunError(f"run folder {path} does not exist, so it is not a run folder: pass a folder written by "
                       f"`python cli.py fit`")
    file = path / RESULTS_FILE
    if not file.is_file():
        raise RunError(f"{file} is missing: {path} is not a run folder written by `python cli.py fit`")
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{file} cannot be read as JSON ({exc}): rerun `python cli.py fit` to rewrite it") from None
    _check(results, file)
    return Run(path=path, results=upgrade(results))


def _check(results: Any, file: Path) -> None:
    """Raise RunError unless ``results`` has the fields every reader relies on."""
    if not isinstance(results, dict):
        raise RunError(f"{file} holds no JSON object: rerun `python cli.py fit` to rewrite it")
    version = results.get("schema_version")
    if version not in READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_VERSIONS)
        raise RunError(f"{file} has schema_version {version!r}, this headbench reads {readable}: "
                       f"rerun `python cli.py fit` with this version")
    missing = [k for k in _REQUIRED_TOP if k not in results]
    if missing:
        raise RunError(f"{file} lacks {', '.join(missing)}: rerun `python cli.py fit` to rewrite it")
    wrong = [k for k in ("dataset", "protocol", "best") if not isinstance(results[k], dict)]
    if not isinstance(results["caches"], list) or not all(isinstance(c, dict) for c in results["caches"]):
        wrong.append("caches")
    if wrong:
        raise RunError(f"{file}: {', '.join(wrong)} not in the results format: rerun `python cli.py fit`")
    if not isinstance(results["results"], list) or not results["results"]:
        raise RunError(f"{file} lists no fitted head: rerun `python cli.py fit` with at least one head")
    for i, res in enumerate(results["results"]):
        lacking = [k for k in _REQUIRED_RESULT if not isinstance(res, dict) or k not in res]
        if lacking:
            raise RunError(f"{file}: results[{i}] lacks {', '.join(lacking)}: rerun `python cli.py fit`")
        if not isinstance(res["metrics"], dict) or not isinstance(res["cache_index"], int):
            raise RunError(f"{file}: results[{i}] is not in the results format: rerun `python cli.py fit`")
        if not 0 <= res["cache_index"] < len(results["caches"]):
            raise RunError(f"{file}: results[{i}] points to cache {res['cache_index']}, which is not listed")
        if version >= 2 and not (isinstance(res.get("selection"), dict)
                                 and isinstance(res["selection"].get("index"), int)):
            raise RunError(f"{file}: results[{i}] lacks its selection: rerun `python cli.py fit`")
    best = results["best"].get("key")
    keys = [r["key"] for r in results["results"]]
    if best is not None and best not in keys:
        raise RunError(f"{file}: best names {best!r}, which is none of its results ({', '.join(map(str, keys))}): "
                       f"the file was edited or mixed with another run's; rerun `python cli.py fit`")
    if version >= 2 and not isinstance(results.get("skipped", []), list):
        raise RunError(f"{file}: skipped is not in the results format: rerun `python cli.py fit`")


def _selection_of(res: dict[str, Any]) -> dict[str, Any] | None:
    """Version 1 recorded no chosen candidate: the search entry whose params the chosen params contain (the most
    specific, then the best mean), else the best mean -- what version-1 readers matched."""
    search = [e for e in (res.get("search") or []) if isinstance(e, dict)]
    chosen = res.get("params") if isinstance(res.get("params"), dict) else {}
    matches = [(j, e) for j, e in enumerate(search) if isinstance(e.get("params"), dict)
               and all(k in chosen and chosen[k] == v for k, v in e["params"].items())]
    scored = [(j, e) for j, e in enumerate(search) if isinstance(e.get("mean"), (int, float))]
    pool = matches or scored
    if not pool:
        return None

    def rank(je: tuple[int, dict]) -> tuple:
        mean = je[1].get("mean")
        return (len(je[1].get("params") or {}), mean if isinstance(mean, (int, float)) else float("-inf"), -je[0])

    j, e = max(pool, key=rank)
    return {"index": j, "score": e.get("mean"), "std": e.get("std")}


def upgrade(results: dict[str, Any]) -> dict[str, Any]:
    """A checked results dict in version 2's shape: version 1 gets ``selection`` per result (see above), ``cost``
    None (the plan was not recorded), no skipped heads and no memory budget. The file's ``schema_version`` is kept."""
    if results.get("schema_version") == 1:
        for res in results["results"]:
            res.setdefault("selection", _selection_of(res))
            res.setdefault("cost", None)
        results.setdefault("skipped", [])
        results.setdefault("memory_budget", None)
    return results


def write_results(run_dir: str | os.PathLike, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as the run folder's ``results.json`` (atomically: a reader sees the old file or the new one).

    Parameters
    ----------
    run_dir : path
    doc : dict
        The results, with plain JSON values only (no NaN or infinity).

    Returns
    -------
    Path
        The written file.
    """
    file = Path(run_dir) / RESULTS_FILE
    write_then_commit(file, lambda tmp: tmp.write_text(json.dumps(doc, indent=1, allow_nan=False), encoding="utf-8"))
    return file


# ---- the builders of a fit's record (docs/results-format.md: each object's fields, written here only) ----------

RECORDED_VERSIONS = ("numpy", "scikit-learn", "scipy", "keras", "tensorflow", "h5py", "joblib")
"""Packages whose versions results.json records (``versions``)."""


def cache_record(meta: dict[str, Any], path: str | os.PathLike, feature_shape: Sequence[int], feature: str,
                 data: str, feature_bytes: int) -> dict[str, Any]:
    """The ``caches[]`` object of one cache, from its attributes (the file is not read again).

    Parameters
    ----------
    meta : dict
        The cache's attributes as its reader holds them.
    path : path
        The cache file.
    feature_shape : sequence of int
        Shape of one row of the features fitted on.
    feature : str
        The feature kind fitted on (``avg``, ``max``, ``maps``).
    data : {"memory", "streamed"}
        Where the fit held the features.
    feature_bytes : int
        Their size as float32.
    """
    m = meta
    return {
        "path": str(Path(path).resolve()), "sha256": str(m.get("content_sha256", "") or ""),
        "backbone": str(m.get("backbone") or ""),
        "backbone_label": cache_label(m), "input_size": int(m.get("input_size", 0)),
        "preprocess": str(m.get("preprocess")), "resize": str(m.get("resize")),
        "alpha": m.get("alpha"), "pixel_rule": str(m.get("pixel_rule", "")),
        "weights_source": str(m.get("weights_source")), "weights_path": str(m.get("weights_path", "")),
        "weights_sha256": str(m.get("weights_sha256")),
        "feature": feature, "feature_shape": [int(s) for s in feature_shape], "n_rows": int(m.get("n_rows", 0)),
        "extract_seconds": float(m.get("extract_seconds", 0.0) or 0.0), "versions": dict(m.get("versions", {})),
        "command": str(m.get("command", "")), "created": str(m.get("created", "")),
        "data": data, "feature_bytes": int(feature_bytes),
        "views": dict(m["views"]) if isinstance(m.get("views"), dict) else None,
    }


def split_counts(labels: np.ndarray, splits: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Images per split (``train``, ``val``, ``test`` present) and class: ``dataset.counts``."""
    out = {}
    for s in ("train", "val", "test"):
        m = splits == s
        if m.any():
            c = np.bincount(labels[m], minlength=len(class_names))
            out[s] = {name: int(c[i]) for i, name in enumerate(class_names)}
    return out


def dataset_record(name: str, root: str, class_names: list[str], labels: np.ndarray, splits: np.ndarray,
                   split_source: str, split_rule: str, failed: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The ``dataset`` object: classes, images per split and class, where the splits came from, the images that
    failed at extraction, and the imbalance ratio (largest class over smallest)."""
    all_counts = np.bincount(labels, minlength=len(class_names))
    return {
        "name": name, "root": root, "class_names": class_names,
        "counts": split_counts(labels, splits, class_names), "split_source": split_source,
        "split_rule": split_rule, "failed": [{"path": p, "reason": r} for p, r in failed],
        "imbalance_ratio": float(all_counts.max() / max(1, all_counts.min())),
    }


def result_record(key: str, cache_index: int, backbone_label: str, fitted: dict[str, Any], run_dir: Path,
                  model_file: str, predictions_file: str) -> dict[str, Any]:
    """One ``results[]`` object of a fitted head: its key and cache, what the fit recorded (``fitted``: head,
    params, selection, search, cost, metrics...), and its files, the model bound by its SHA-256."""
    return {"key": key, "cache_index": int(cache_index), "backbone_label": backbone_label, **fitted,
            "model_file": model_file, "model_sha256": file_sha256(run_dir / model_file),
            "predictions_file": predictions_file}


def skipped_record(key: str, cache_index: int, backbone_label: str, head: str, reason: str,
                   cost: dict[str, Any]) -> dict[str, Any]:
    """One ``skipped[]`` object: a head the memory budget could not hold, with the reason and its cost plan."""
    return {"key": key, "cache_index": int(cache_index), "backbone_label": backbone_label, "head": head,
            "reason": reason, "cost": cost}


def run_document(command: str, seed: int, dataset: dict[str, Any], protocol: dict[str, Any],
                 caches: list[dict[str, Any]], results: list[dict[str, Any]], skipped: list[dict[str, Any]],
                 memory_budget: dict[str, Any], best: dict[str, Any],
                 audit: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole results.json of a fit (:data:`SCHEMA_VERSION`): its parts as built above, ``best`` as the pick
    rule chose it (:func:`pipeline.fit.verdict.verdict`), how intervals were computed, and package versions."""
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "seed": int(seed),
        "versions": package_versions(RECORDED_VERSIONS),
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


def write_splits(run_dir: str | os.PathLike, paths: Sequence[str], splits: np.ndarray, labels: np.ndarray,
                 class_names: Sequence[str], digests: Sequence[str]) -> Path:
    """Write the run's ``splits.csv`` (:data:`SPLITS_FILE`: ``path,split,class,sha256`` for every image, the final
    splits as fitted and each file's content digest), read back by :func:`read_splits`."""
    file = Path(run_dir) / SPLITS_FILE
    write_csv(file, SPLITS_COLUMNS, ([p, sp, class_names[int(y)], d] for p, sp, y, d in zip(paths, splits, labels,
                                                                                          digests)))
    return file


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """One of a run's CSV files (splits, predictions, the audit's), written whole or not at all
    (:func:`pipeline.atomic.write_then_commit`); read back by this module's readers."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    path.parent.mkdir(parents=True, exist_ok=True)
    write_then_commit(path, write)


def jsonable(value: Any) -> Any:
    """``value`` with NumPy scalars turned into Python numbers and tuples into lists (dict keys as str)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): jsonable(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(x) for x in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def put_result(run: Run, entry: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Add one result to a run's results.json, or replace the result with the same key; written atomically.

    Used by ``finetune``, which adds a model to a run ``fit`` wrote. ``best`` is not changed. The new content is
    checked as :func:`load_run` checks a file before it is written, so a failure leaves the old file as it was.

    Parameters
    ----------
    run : Run
        The run as :func:`load_run` read it (the file is not read again).
    entry : dict
        The result, with plain JSON values and at least the fields every reader relies on.

    Returns
    -------
    (dict, bool)
        The results as written, and whether an entry with that key was replaced.
    """
    doc = dict(run.results)
    results = list(doc["results"])
    same = [i for i, r in enumerate(results) if r.get("key") == entry.get("key")]
    if same:
        results[same[0]] = entry
    else:
        results.append(entry)
    doc["results"] = results
    _check(doc, run.path / RESULTS_FILE)
    write_results(run.path, doc)
    return doc, bool(same)


def read_splits(run: Run) -> list[dict[str, str]] | None:
    """The run's ``splits.csv`` rows (``path``, ``split``, ``class``, ``sha256``), or None when the run has none
    (runs written before schema 3).

    Raises
    ------
    RunError
        The file exists but cannot be read or lacks its columns.
    """
    return _read_csv(run.path / SPLITS_FILE, SPLITS_COLUMNS)


PREDICTIONS_COLUMNS = ("path", "split", "true", "pred")
"""The first columns of a result's ``predictions/<key>.csv``; one ``p_<class>`` column per class follows."""


def write_result_predictions(path: Path, proba: np.ndarray, rows: np.ndarray, paths: Sequence[str],
                             splits: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> None:
    """A result's ``predictions/<key>.csv`` (read back by :func:`read_predictions`): one row per image of the final
    splits, its true and predicted class and the probability of each class.

    Parameters
    ----------
    path : Path
        The file (in the run's folder while it is being built, which is published whole).
    proba : np.ndarray
        ``(len(rows), n_classes)`` probabilities.
    rows : np.ndarray
        The images' row indices into ``paths``, ``splits`` and ``labels``.
    paths, splits, labels : sequences
        Of every image of the run.
    class_names : sequence of str
    """
    pred = np.argmax(proba, axis=1)
    write_csv(path, [*PREDICTIONS_COLUMNS, *(f"p_{c}" for c in class_names)],
              ([paths[i], splits[i], class_names[labels[i]], class_names[pred[j]], *(f"{v:.6g}" for v in proba[j])]
               for j, i in enumerate(rows)))


def read_predictions(run: Run, entry: dict[str, Any]) -> list[dict[str, str]]:
    """The per-image predictions of one result (``path``, ``split``, ``true``, ``pred``, ``p_<class>``...).

    Raises
    ------
    RunError
        The file is missing, unreadable or lacks its columns.
    """
    file = run.path / str(entry.get("predictions_file") or "")
    rows = _read_csv(file, PREDICTIONS_COLUMNS) if entry.get("predictions_file") else None
    if rows is None:
        raise RunError(f"{file} is missing: the predictions of {entry.get('key')} in {run.path} are gone; rerun "
                       f"`python cli.py fit`")
    return rows


def read_audit(run: Run) -> dict[str, list[dict[str, str]]] | None:
    """The rows of the run's audit files (``duplicates``, ``label_issues``, ``outliers``), ranked as written, or None
    when the run has no audit (``fit --no-audit``, or runs written before the audit existed).

    Raises
    ------
    RunError
        results.json names an audit file that is missing, unreadable or lacks its columns.
    """
    audit = run.results.get("audit")
    files = audit.get("files") if isinstance(audit, dict) else None
    if not isinstance(files, dict):
        return None
    out = {}
    for kind, columns in AUDIT_COLUMNS.items():
        rel = files.get(kind)
        if not isinstance(rel, str):
            continue
        rows = _read_csv(run.path / rel, columns)
        if rows is None:
            raise RunError(f"{run.path / rel} is missing: the audit of {run.path} is incomplete; rerun "
                           f"`python cli.py fit`")
        out[kind] = rows
    return out


def _read_csv(file: Path, columns: tuple[str, ...]) -> list[dict[str, str]] | None:
    import csv

    if not file.is_file():
        return None
    try:
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RunError(f"{file} cannot be read ({exc}): rerun `python cli.py fit`") from None
    missing = [c for c in columns if c not in fields]
    if missing:
        raise RunError(f"{file} lacks the column(s) {', '.join(missing)}: rerun `python cli.py fit`")
    return rows


# ---- the files a result names, and changing a run in place ----------------------------------------------------

LOCK_FILE = ".lock"
"""The run folder's lock file (``fcntl.flock``), taken by every command that changes a finished run."""


file_sha256 = sha256_file
"""Hex SHA-256 of a file's bytes (``results[].model_sha256`` binds each head file to its entry): the digest the
weights files are checked by, under the name the run record's readers know."""


def head_file(run_dir: str | os.PathLike, entry: dict[str, Any]) -> Path:
    """The saved model of one result, checked to be the very file results.json recorded.

    Parameters
    ----------
    run_dir : path
        The run folder.
    entry : dict
        One ``results`` entry (``model_file``, and ``model_sha256`` in runs written since it was recorded).

    Returns
    -------
    Path

    Raises
    ------
    RunError
        The file is missing, or its SHA-256 is not the recorded one (replaced by another run's file, or damaged).
    """
    key = entry.get("key")
    redo = "`python cli.py finetune` again" if entry.get("head") == "finetune" else "`python cli.py fit` again"
    rel = entry.get("model_file")
    if not rel:
        raise RunError(f"{key} records no saved head (results.json has no model_file for it); run {redo}")
    path = Path(run_dir) / str(rel)
    if not path.is_file():
        raise RunError(f"saved head {path} of {key} is missing from the run folder; run {redo}")
    recorded = entry.get("model_sha256")
    if recorded:
        try:
            digest = file_sha256(path)
        except OSError as exc:
            raise RunError(f"saved head {path} of {key} cannot be read ({exc.strerror or exc})") from None
        if digest != recorded:
            raise RunError(f"saved head {path} is not the file results.json records for {key} (SHA-256 "
                           f"{digest[:12]}... instead of {str(recorded)[:12]}...): it was replaced or damaged; run "
                           f"{redo}")
    return path


# ---- one result of a run and the extraction its features came from (predict, export, finetune) ---------------

EXTRACTION_KEYS = ("backbone", "alpha", "input_size", "resize", "weights_source", "weights_path", "weights_sha256")
"""The settings of a cache record (``caches[]``) that rebuild the backbone its features came from."""


@dataclass
class RunHead:
    """One fitted head of a run folder and the extraction settings its features came from."""

    run_dir: Path
    result: dict[str, Any]
    cache_entry: dict[str, Any]
    extraction: dict[str, Any]  # EXTRACTION_KEYS
    class_names: list[str]

    @property
    def key(self) -> str:
        return str(self.result["key"])

    @property
    def model_path(self) -> Path:
        return self.run_dir / self.result["model_file"]

    @property
    def feature(self) -> str:
        return str(self.cache_entry.get("feature", "avg"))

    @property
    def finetuned(self) -> bool:
        """Whether the result is a fine-tuned model (its ``.keras`` file takes pixels, not features)."""
        return self.result.get("head") == FINETUNE_HEAD

    @property
    def tta_views(self):
        """The :class:`~pipeline.views.ViewSpec` whose views' probabilities ``predict`` averages with the
        centre view's (the head chose test-time views: ``views.chosen`` is ``tta`` or ``both``), else None."""
        views = self.result.get("views")
        if not isinstance(views, dict) or views.get("chosen") not in ("tta", "both"):
            return None
        spec = views.get("spec") or {}
        if spec.get("rule") not in (None, VIEW_RULE):
            raise RunError(f"{self.key} averages over views made by rule {spec.get('rule')!r}, but this headbench "
                           f"renders {VIEW_RULE!r}; fit the run again on a cache extracted by this version")
        return ViewSpec.from_json(spec)


def find_results(results: dict[str, Any], head: str) -> list[dict[str, Any]]:
    """The results ``head`` names: the one whose key it is, else every result of that head name (one per
    backbone)."""
    entries = results["results"]
    return [r for r in entries if r["key"] == head] or [r for r in entries if r["head"] == head]


def run_head(run: Run, result: dict[str, Any]) -> RunHead:
    """The :class:`RunHead` of one result of a loaded run.

    Older results.json files that lack some extraction settings take them from the result's cache while it exists.

    Raises
    ------
    RunError
        A setting needed to rebuild the backbone is recorded nowhere.
    """
    entry = run.results["caches"][result["cache_index"]]
    extraction = {k: entry.get(k) for k in EXTRACTION_KEYS}
    if any(extraction[k] is None for k in ("backbone", "alpha", "weights_path")) and Path(entry["path"]).exists():
        meta = cache.read_meta(entry["path"])
        extraction = {k: (extraction[k] if extraction[k] is not None else meta.get(k)) for k in extraction}
    missing = [k for k in ("backbone", "input_size", "resize", "weights_source") if extraction.get(k) is None]
    if missing:
        raise RunError(f"{run.path}/results.json does not record {', '.join(missing)} for {result['key']} and its "
                       f"cache {entry['path']} is gone; rerun `python cli.py fit` to record them")
    return RunHead(run.path, result, entry, extraction, list(run.results["dataset"]["class_names"]))


def select_head(run: Run | str | os.PathLike, head: str | None = None) -> RunHead:
    """Pick a result of a run: by key (``mobilenet_v2-a1.0-224__logreg``), by head name, or the run's best.

    Parameters
    ----------
    run : Run or path
        A loaded run, or its folder (read with :func:`load_run`).
    head : str, optional
        A result key or head name; default ``best.key``.

    Raises
    ------
    RunError
        Unknown or ambiguous head (the message lists the run's keys).
    """
    loaded = run if isinstance(run, Run) else load_run(run)
    res = loaded.results
    if head is None:
        best = res["best"].get("key")  # load_run checked that it names a result
        chosen = [r for r in res["results"] if r["key"] == best] or res["results"][:1]  # schema 1: no best.key
    else:
        chosen = find_results(res, head)
        if not chosen:
            raise RunError(f"no head {head!r} in {loaded.path}; available: "
                           f"{', '.join(r['key'] for r in res['results'])}")
        if len(chosen) > 1:
            raise RunError(f"head {head!r} is ambiguous in {loaded.path} (several backbones); use one of: "
                           f"{', '.join(r['key'] for r in chosen)}")
    return run_head(loaded, chosen[0])


def resolve_run_weights(rh: RunHead, override: str | None = None) -> str | WeightsInfo:
    """The weights to rebuild a result's backbone with: the recorded file (or ``override``), checked against its
    SHA-256 and returned resolved (so it is not hashed again); ``"imagenet"`` or ``"none"`` when the features came
    from those (resolved by :func:`pipeline.backbones.resolve_model`).

    Raises
    ------
    WeightsError
        The file is not there, or is not the one the features came from.
    """
    ex = rh.extraction
    if ex["weights_source"] == "none":
        return "none"
    if ex["weights_source"] == "imagenet" and override is None:
        return "imagenet"
    path = override or ex.get("weights_path") or ""
    recorded = str(ex.get("weights_sha256") or "")
    if not path or not Path(path).exists():
        raise WeightsError(f"the weights file of {rh.key} ({path or 'unrecorded'}) is not there; pass "
                           f"--weights PATH to the same file (SHA-256 {recorded[:16]}...)")
    file = check_weights_file(path)
    digest = sha256_file(file)
    if recorded and digest != recorded:
        raise WeightsError(f"weights file {path} has SHA-256 {digest[:16]}..., but {rh.key} was fitted on features "
                           f"from {recorded[:16]}...; pass the same weights file")
    return WeightsInfo("file", str(file.resolve()), digest)


def run_model_config(rh: RunHead, weights: str | None = None, kinds: tuple[str, ...] | None = None,
                     announce: Callable[[str], None] = print,
                     resolved: str | WeightsInfo | None = None) -> ModelConfig:
    """The :class:`~pipeline.backbones.ModelConfig` that made a run head's features, its weights checked
    (:func:`resolve_run_weights`; ``weights`` overrides the recorded file).

    Parameters
    ----------
    kinds : tuple of str, optional
        The model's outputs (default: ``avg`` and the head's own feature).
    resolved : str or WeightsInfo, optional
        What :func:`resolve_run_weights` already gave for this head (a command that checks the weights first and
        builds the model later; the file is then not hashed again).
    """
    ex = rh.extraction
    if kinds is None:
        kinds = ("avg",) + ((rh.feature,) if rh.feature != "avg" else ())
    if resolved is None:
        resolved = resolve_run_weights(rh, weights)
    return resolve_model(ex["backbone"], resolved, int(ex["input_size"]), ex["alpha"], kinds, announce=announce)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, say: Callable[[str], None] = lambda _m: None) -> Iterator[None]:
    """Hold the run folder's exclusive lock (:data:`LOCK_FILE`) for the duration of a block.

    One writer at a time: a second command that changes the same run waits here (``say`` is told once) and then
    reads results.json afresh, so neither loses the other's entry. The lock is the kernel's (``fcntl.flock``):
    a killed holder releases it.

    Raises
    ------
    RunError
        The lock file cannot be opened (a read-only run folder).
    """
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunError(f"cannot lock the run folder {Path(run_dir)} ({exc.strerror or exc}): changing a run needs a "
                       f"writable run folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another command that is writing {Path(run_dir)}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # the lock file stays: unlinking it could let a third writer lock a different inode


def staged_name(folder: Path, key: str, suffix: str) -> Path:
    """Where a command writes a result's file before :func:`commit_result` moves it into place: hidden, named by
    the writing process, so a leftover of a killed writer is recognised (and removed) by the next commit."""
    return folder / f".{key}.{os.getpid()}.partial{suffix}"


def _stale_temporary(path: Path) -> bool:
    """Whether ``path`` is a :func:`staged_name` file of a process that is no longer alive."""
    parts = path.name.split(".")
    pid = parts[-3] if len(parts) >= 4 and parts[-2] == "partial" else ""
    if not path.name.startswith(".") or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not pid_alive(int(pid))


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one of another user counts as alive)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


OWNER_FILE = ".owner"
"""In a :func:`partial_dir`: the process building it (``{"pid", "host"}``), removed just before it is published."""


def claim_partial(work: Path) -> None:
    """Record this process as the builder of the unfinished run folder ``work``."""
    (work / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def partial_builder(work: Path) -> int | None:
    """The pid of a live process building ``work`` (on this machine, or any process on another machine sharing
    the folder, which cannot be checked), or ``None`` when its builder is gone or unknown."""
    try:
        owner = json.loads((work / OWNER_FILE).read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return pid
    return pid if pid != os.getpid() and pid_alive(pid) else None


def abandoned_partials(folder: Path) -> list[Path]:
    """Unfinished run folders in ``folder`` whose builder recorded itself and is gone (killed fits)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if p.is_dir() and p.name.startswith(".") and p.name.endswith(".partial")
                  and (p / OWNER_FILE).is_file() and partial_builder(p) is None)


def commit_result(run_dir: str | os.PathLike, entry: dict[str, Any], staged: dict[str, Path],
                  say: Callable[[str], None] = lambda _m: None) -> tuple[dict[str, Any], bool]:
    """Add one result to a finished run (or replace the result of the same key), files and entry together.

    Under :func:`run_lock`: results.json is read afresh (another command may have changed it since this one
    started), each staged file is moved to the name its ``entry`` field gives (new names, never the old entry's),
    results.json is replaced atomically, and only then are the replaced entry's files and the temporaries of killed
    writers removed. A crash at any point leaves a run whose every entry names its own, intact files: before the
    rename of results.json the old entry and its old files, after it the new ones (an orphaned new file is removed
    by the next commit).

    Parameters
    ----------
    run_dir : path
        A finished run folder.
    entry : dict
        The result, with plain JSON values; ``model_file`` / ``predictions_file`` name where its files go.
    staged : dict of str to Path
        Entry field (``model_file``, ``predictions_file``) -> the written temporary to move there.
    say : callable
        Told when the command waits for another writer.

    Returns
    -------
    (dict, bool)
        The results as written, and whether an entry with that key was replaced.

    Raises
    ------
    RunError
        The run folder is not a finished run, or cannot be written.
    """
    with run_lock(run_dir, say):
        run = load_run(run_dir)
        old = next((r for r in run.results["results"] if r.get("key") == entry.get("key")), None)
        try:
            for field, tmp in staged.items():
                os.replace(tmp, run.path / str(entry[field]))
            doc, replaced = put_result(run, entry)
        except OSError as exc:
            raise RunError(f"cannot write the result {entry.get('key')} into {run.path} ({exc.strerror or exc}); "
                           f"the run is as it was") from None
        named = {str(r.get(f)) for r in doc["results"] for f in ("model_file", "predictions_file") if r.get(f)}
        for field in ("model_file", "predictions_file"):
            if old is not None and old.get(field) and str(old[field]) not in named:
                (run.path / str(old[field])).unlink(missing_ok=True)
        _sweep(run.path, str(entry.get("key")), named)
    return doc, replaced


def _sweep(run_dir: Path, key: str, named: set[str]) -> None:
    """Remove the temporaries of killed writers and the files of ``key`` that no entry names (written by a commit
    that was killed before its results.json)."""
    for folder in ("heads", "predictions"):
        base = run_dir / folder
        if not base.is_dir():
            continue
        for p in base.iterdir():
            rel = f"{folder}/{p.name}"
            orphan = p.name.startswith(f"{key}.") and rel not in named
            if p.is_file() and (orphan or _stale_temporary(p)):
                p.unlink(missing_ok=True)


def pick_file_problem(run: Run) -> str | None:
    """Why the run's pick cannot be used as recorded (its saved head missing, replaced or damaged), or None.

    ``report`` shows it in the pick box and exits 1, so a page never recommends a head ``predict`` would refuse.
    """
    best = run.results["best"].get("key")
    entry = next((r for r in run.results["results"] if r["key"] == best), None)
    if entry is None:
        return None
    try:
        head_file(run.path, entry)
    except RunError as exc:
        return str(exc)
    return None
