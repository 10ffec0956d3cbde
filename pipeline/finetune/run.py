"""``python cli.py finetune RUN``: fine-tune a run's head together with the top of its backbone, by the run's protocol,
and add the fine-tuned model to the run as one more result.

Steps (:func:`finetune_run`):

1. **The run, read once** (:func:`pipeline.results.load_run`), and the head to start from: ``--head KEY`` (a result
   key or head name), else the run's best among the heads fine-tuning can start from (:data:`STARTABLE`: the dense
   head or logistic regression on pooled ``avg`` features), by selection score, ties to the earlier result.
2. **The backbone of its cache record**: same backbone, width, input size and weights file (checked by SHA-256, or
   ``--weights`` when the file moved), as ``predict`` resolves them.
3. **The run's rows and splits**, as ``fit`` recorded them in the run's ``splits.csv`` (``excluded`` images of
   ``fit --exclude-leaks`` stay out). Runs written before that file have their caches opened again (row lists
   only, no features) and aligned as ``fit`` aligned them, and their splits planned by the same rule with the run's
   seed (:func:`pipeline.fit.protocol.plan_protocol`). Images that failed at extraction are not there. The counts
   per split and class must equal the run's ``dataset.counts`` (else the run folder or the caches changed).
4. **Selection images** (early stopping and the choice of the epoch kept): the ``val`` split when the run selected
   on ``val``; when it used cross-validation on ``train``, a held-out part of ``train`` (:func:`holdout_split`:
   :data:`HOLDOUT_FRACTION` of each class in expectation, by a seeded hash of the relative path, so the same
   images every time), which is then not trained on. At most :data:`SELECT_MAX_ROWS` selection images (the same
   hash picks them).
5. **Fine-tuning** (:func:`pipeline.finetune.train.finetune`) from the image files under the run's dataset root with the
   cache's decoding and resize rule, streamed in batches.
6. **Final numbers**: the kept model predicts every image of the run's final splits once, scored by the metric
   functions of every other head (:mod:`pipeline.fit.metrics`).
7. **Into the run**: ``heads/<key>.<digest>.keras`` (pixels in [0, 255] -> probabilities; plain
   ``keras.models.load_model``), ``predictions/<key>.<digest>.csv`` and a ``results`` entry with head ``finetune``,
   key ``<backbone slug>__finetune`` and the model's ``model_sha256``, committed together under the run's lock
   (:func:`pipeline.results.commit_result`: results.json read afresh, so two fine-tunes of one run both land). A
   rerun on the same backbone replaces that entry, and its old files go once the new results.json is in place. ``best``
   is left as ``fit`` chose it among the frozen heads: the fine-tuned model's selection score is one split's score
   of the epoch it chose on that split (or a hold-out's when ``fit`` used cross-validation), not the same kind of
   number as the frozen heads' scores.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.backbones import build_features
from pipeline.errors import DatasetError, RunError
from pipeline.finetune.train import FinetuneConfig, FinetuneData, FinetuneResult, finetune, image_batches
from pipeline.fit.inputs import open_inputs
from pipeline.fit.metrics import compute_metrics, mistakes
from pipeline.fit.protocol import hash_side, path_hash, plan_protocol
from pipeline.machine import decode_threads
from pipeline.results import (FINETUNE_HEAD, commit_result, file_sha256, find_results, finetune_key, first_best,
                              head_file, jsonable, load_run, read_splits, report_split, resolve_run_weights, run_head,
                              run_model_config, split_counts, staged_name, write_result_predictions)
from pipeline.saved_head import load_saved_head

__all__ = ["FINETUNE_HEAD", "STARTABLE", "HOLDOUT_FRACTION", "SELECT_MAX_ROWS", "FinetuneRun", "startable_results",
           "pick_start", "holdout_split", "finetune_run"]

STARTABLE = ("dense", "logreg")
"""Heads fine-tuning starts from (on ``avg`` features): a dense head is nested as it is, a logistic regression becomes
one softmax layer (see :mod:`pipeline.finetune.train`)."""

HOLDOUT_FRACTION = 0.2
"""Share of ``train`` held out for selection when the run used cross-validation. The held-out images choose one of
about ten epochs whose accuracies are close, so they must be more than the dense head's 10 % for early stopping on a
loss; 20 % keeps 80 % of the images for training (what one fold of 5-fold cross-validation trains on)."""

SELECT_MAX_ROWS = 10_000
"""Most selection images scored after every epoch: 10,000 give an accuracy near 0.9 to a standard error of 0.3 point
(the same bound as the hyperparameter search of ``fit``), while scoring more would cost a pass over them per epoch."""

HOLDOUT_SALT = "headbench-finetune-select"


@dataclass
class FinetuneRun:
    """What :func:`finetune_run` made.

    Attributes
    ----------
    run_dir : Path
    entry : dict
        The ``results`` entry written (see docs/results-format.md).
    results : dict
        The whole results.json as written.
    replaced : bool
        Whether an earlier fine-tuned entry of that key was replaced.
    """

    run_dir: Path
    entry: dict[str, Any]
    results: dict[str, Any]
    replaced: bool


# ---- the head to start from ------------------------------------------------------------------------------------


def startable_results(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The results of a run fine-tuning can start from: :data:`STARTABLE` heads fitted on ``avg`` features."""
    caches = results["caches"]
    return [r for r in results["results"]
            if r["head"] in STARTABLE and str(caches[r["cache_index"]].get("feature", "avg")) == "avg"
            and str(r.get("model_file", "")).endswith((".keras", ".joblib"))]


def pick_start(results: dict[str, Any], head: str | None = None) -> dict[str, Any]:
    """The result to fine-tune: ``head`` (a result key or head name), or the best startable one by selection score.

    Raises
    ------
    RunError
        ``head`` is not in the run, is ambiguous, or is not a head fine-tuning can start from; or the run has no
        such head. One line listing the keys that can be used.
    """
    ok = startable_results(results)
    names = ", ".join(r["key"] for r in ok) or "none"
    if head is None:
        if not ok:
            raise RunError("the run has no head fine-tuning can start from (dense or logreg on avg features): fit "
                           "one with `python cli.py fit --head logreg`")
        return ok[first_best([float(r["selection"]["score"]) for r in ok])]
    chosen = find_results(results, head)
    if not chosen:
        raise RunError(f"no head {head!r} in the run; fine-tuning can start from: {names}")
    if len(chosen) > 1:
        chosen = [r for r in chosen if r in ok] or chosen
        if len(chosen) > 1:
            raise RunError(f"head {head!r} is ambiguous (several backbones); use one of: "
                           f"{', '.join(r['key'] for r in chosen)}")
    if chosen[0] not in ok:
        raise RunError(f"fine-tuning cannot start from {chosen[0]['key']} (only a dense or logreg head on avg "
                       f"features); use one of: {names}")
    return chosen[0]


# ---- rows and splits -------------------------------------------------------------------------------------------


def holdout_split(paths: Sequence[str], labels: np.ndarray, fraction: float = HOLDOUT_FRACTION,
                  seed: int = 0) -> np.ndarray:
    """Which training images are held out for selection: ``sha1('headbench-finetune-select:<seed>:<path>')`` read
    as a number in [0, 1) below ``fraction``.

    Stratified per class in expectation and stable when images are added, like the run's hash split (another salt, so
    it does not depend on that split). A class with two or more images keeps at least one on each side.

    Parameters
    ----------
    paths : sequence of str
        Relative paths of the training images.
    labels : ndarray
    fraction : float
    seed : int

    Returns
    -------
    ndarray of bool
        True for held-out images.
    """
    labels = np.asarray(labels)
    held, _ = hash_side(paths, labels, fraction, seed, HOLDOUT_SALT)
    classes, counts = np.unique(labels, return_counts=True)
    held[np.isin(labels, classes[counts < 2])] = False  # a single image is trained on, never held out
    return held


def _cap(paths: Sequence[str], rows: np.ndarray, seed: int, limit: int = SELECT_MAX_ROWS) -> np.ndarray:
    """At most ``limit`` of ``rows``: the lowest by the hold-out hash (stratified in expectation)."""
    if len(rows) <= limit:
        return rows

    u = np.array([path_hash(paths[i], seed + 1, HOLDOUT_SALT) for i in rows])
    return np.sort(rows[np.argsort(u, kind="stable")[:limit]])


@dataclass
class _Rows:
    rel_paths: list[str]
    labels: np.ndarray
    splits: np.ndarray
    final_splits: list[str]
    train: np.ndarray
    select: np.ndarray
    select_name: str


def _run_rows(results: dict[str, Any], recorded: list[dict[str, str]] | None) -> _Rows:
    """The run's rows, their splits and the selection images (see the module docstring, steps 3 and 4).

    ``recorded`` is the run's ``splits.csv`` (:func:`pipeline.results.read_splits`): the final splits as ``fit``
    fitted them, ``excluded`` images included. Runs written before that file (None) have their splits made again
    from their caches by fit's own rule (:func:`_planned_rows`).
    """
    class_names = list(results["dataset"]["class_names"])
    run_protocol = results.get("protocol") or {}
    if recorded is None:
        rel_paths, labels, splits = _planned_rows(results, class_names, run_protocol)
    else:
        rel_paths, labels, splits = _recorded_rows(results, class_names, recorded)
    final_splits = [str(s) for s in run_protocol.get("final_splits") or []]
    selection = run_protocol.get("selection")
    if selection not in ("cv", "val") or not final_splits:
        raise RunError("the run's results.json records no usable protocol (selection and final splits); rerun "
                       "`python cli.py fit`")
    now = split_counts(labels, splits, class_names)  # dataset.counts as fit wrote it
    for s, per_class in (results["dataset"].get("counts") or {}).items():
        if {c: int(per_class.get(c, 0)) for c in class_names} != now.get(s, dict.fromkeys(class_names, 0)):
            source = "splits.csv lists" if recorded is not None else "caches now hold"
            raise RunError(f"the run's {source} other {s} images than when it was fitted "
                           f"({sum(now.get(s, {}).values())} vs {sum(int(v) for v in per_class.values())}); rerun "
                           f"`python cli.py fit` first")
    seed = int(results.get("seed", 0))
    train = np.flatnonzero(splits == "train")
    if selection == "val":
        select, name = np.flatnonzero(splits == "val"), "val"
    else:
        held = holdout_split([rel_paths[i] for i in train], labels[train], HOLDOUT_FRACTION, seed)
        select, train, name = train[held], train[~held], "train_holdout"
    select = _cap(rel_paths, select, seed)
    return _Rows(rel_paths, labels, splits, final_splits, train, select, name)


def _failed(results: dict[str, Any]) -> set[str]:
    return {f.get("path") for f in results["dataset"].get("failed") or [] if isinstance(f, dict)}


def _recorded_rows(results: dict[str, Any], class_names: list[str],
                   recorded: list[dict[str, str]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Rows, labels and splits as the run's ``splits.csv`` records them (images that failed at extraction left
    out)."""
    index = {c: i for i, c in enumerate(class_names)}
    failed = _failed(results)
    rows = [r for r in recorded if r["path"] not in failed]
    unknown = sorted({r["class"] for r in rows} - set(index))
    if unknown:
        raise RunError(f"the run's splits.csv names a class its results.json does not ({unknown[0]!r}); the run "
                       f"folder is damaged: rerun `python cli.py fit`")
    return ([r["path"] for r in rows], np.array([index[r["class"]] for r in rows], dtype=np.int64),
            np.array([r["split"] for r in rows], dtype=str))


def _planned_rows(results: dict[str, Any], class_names: list[str],
                  run_protocol: dict[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Rows, labels and splits of a run without ``splits.csv``, made again as ``fit`` made them: its caches opened
    (row lists only) and aligned, and the splits planned by the same rule with the run's seed."""
    caches = results["caches"]
    feature = str(caches[0].get("feature", "avg"))
    missing = [c["path"] for c in caches if not Path(c["path"]).is_file()]
    if missing:
        raise RunError(f"cache {missing[0]} of the run is gone; fine-tuning a run written before splits.csv needs "
                       f"the run's caches for its images and splits: extract the dataset again into the same cache "
                       f"folder")
    with contextlib.ExitStack() as stack:
        inputs = open_inputs(stack, None, [c["path"] for c in caches], None, None, feature, lambda m: None)
        rel_paths, labels, cached = list(inputs.rel_paths), np.asarray(inputs.labels), inputs.cached_splits
        if list(inputs.class_names) != class_names:
            raise RunError("the run's caches now hold other classes than when it was fitted; rerun "
                           "`python cli.py fit`")
    failed = _failed(results)
    if failed & set(rel_paths):
        keep = np.array([p not in failed for p in rel_paths])
        rel_paths = [p for p, k in zip(rel_paths, keep) if k]
        labels, cached = labels[keep], cached[keep]
    # the run's own selection ("cv" or "val") makes its protocol again, whatever --select-on asked for
    select_on = run_protocol.get("selection") if run_protocol.get("selection") in ("cv", "val") else "auto"
    splits, protocol = plan_protocol(cached, labels, class_names, rel_paths, int(results.get("seed", 0)), select_on)
    if protocol.selection != run_protocol.get("selection") or \
            list(protocol.final_splits) != list(run_protocol.get("final_splits") or []):
        raise RunError("the run's protocol cannot be made again from its caches; rerun `python cli.py fit` first")
    return rel_paths, labels, splits


# ---- the final numbers -----------------------------------------------------------------------------------------


@dataclass
class _Final:
    """The kept model's predictions on the final splits (what :func:`pipeline.results.write_result_predictions`
    writes)."""

    proba: np.ndarray
    final_rows: np.ndarray


def _predict_rows(model: Any, root: Path, rows: _Rows, idx: np.ndarray, size: int, resize: str, batch_size: int,
                  workers: int, n_classes: int) -> np.ndarray:
    """Probabilities of ``model`` for the images of rows ``idx``, streamed from their files."""
    items = [(rows.rel_paths[i], int(rows.labels[i])) for i in idx]
    batches = image_batches(root, items, size, resize, batch_size, workers=workers)
    out = [np.asarray(model(batches[b][0], training=False), np.float64) for b in range(len(batches))]
    return np.concatenate(out) if out else np.zeros((0, n_classes))


# ---- the command -----------------------------------------------------------------------------------------------


def finetune_run(run_dir: str | os.PathLike, head: str | None = None, weights: str | None = None,
                 config: FinetuneConfig | None = None, seed: int | None = None, command: str = "",
                 log: Callable[[str], None] = print) -> FinetuneRun:
    """Fine-tune a run's head with the top of its backbone and add the result to the run (module docstring).

    Parameters
    ----------
    run_dir : path
        A run folder written by ``fit``.
    head : str, optional
        Result key or head name to start from (a dense or logreg head on ``avg`` features); default the best one.
    weights : str, optional
        Backbone weights file when the recorded one has moved (must have the recorded SHA-256).
    config : FinetuneConfig, optional
        Fine-tuning settings (its ``seed`` is replaced by ``seed``).
    seed : int, optional
        Seed of the shuffling, the augmentation and the dropout; default the run's seed.
    command : str
        The command line, recorded with the result.
    log : callable
        Progress lines.

    Returns
    -------
    FinetuneRun

    Raises
    ------
    RunError
        Not a run folder; a head that cannot be fine-tuned; the caches or the dataset folder are gone or changed.
    WeightsError
        The weights file is missing or is not the one the features came from.
    FitError
        An unusable setting.
    DatasetError
        An image that no longer decodes.
    """
    t_start = time.perf_counter()
    cfg = config or FinetuneConfig()
    cfg.check()
    run = load_run(run_dir)
    results = run.results
    cfg = replace(cfg, seed=int(results.get("seed", 0)) if seed is None else int(seed))
    start = pick_start(results, head)
    rh = run_head(run, start)
    resolved = resolve_run_weights(rh, weights)  # one line when missing or not the same file, before any build
    root = Path(str(results["dataset"].get("root", "")))
    if not root.is_dir():
        raise DatasetError(f"the run's dataset folder {root} is not there; fine-tuning trains from its image files")
    class_names = list(results["dataset"]["class_names"])
    start_head = load_saved_head(head_file(run.path, start),  # the very file fit recorded, loadable, of this run
                                 results["caches"][start["cache_index"]].get("feature_shape"), len(class_names))
    rows = _run_rows(results, read_splits(run))
    ex = rh.extraction
    resize = str(ex["resize"])
    data = FinetuneData(root, class_names, [(rows.rel_paths[i], int(rows.labels[i])) for i in rows.train],
                        [(rows.rel_paths[i], int(rows.labels[i])) for i in rows.select], resize)
    score = f"{results['protocol'].get('selection')} score {float(start['selection']['score']):.4f}"
    if rows.select_name in start["metrics"]:
        score += f", refitted {rows.select_name} accuracy {start['metrics'][rows.select_name]['accuracy']:.4f}"
    log(f"{run.name}: starting from {start['key']} ({score} in the run); selection on {rows.select_name} "
        f"({len(data.select)} images), training on {len(data.train)} images of {root}")
    # ImageNet weights are found (or downloaded, announced) only now that the run's data is known to be there
    built = build_features(run_model_config(rh, kinds=("avg",), announce=log, resolved=resolved))
    ft = finetune(built, start_head, data, cfg, log=log)

    # final numbers: every image of the final splits, once, with the kept model
    final_rows = np.flatnonzero(np.isin(rows.splits, rows.final_splits))
    workers = cfg.workers or decode_threads()
    t0 = time.perf_counter()
    proba = _predict_rows(ft.model, root, rows, final_rows, built.input_size, resize, cfg.batch_size, workers,
                          len(class_names))
    predict_s = time.perf_counter() - t0
    metrics = {}
    for s in rows.final_splits:
        m = rows.splits[final_rows] == s
        metrics[s] = compute_metrics(rows.labels[final_rows][m], proba[m], class_names, seed=int(results.get("seed", 0)))
    rep = rows.splits[final_rows] == report_split(rows.final_splits)
    wrong = mistakes(rows.labels[final_rows][rep], proba[rep], [rows.rel_paths[i] for i in final_rows[rep]],
                     list(rows.splits[final_rows][rep]), class_names)

    key = finetune_key(start["key"])
    entry = _entry(key, start, ft, cfg, rows, metrics, wrong, len(final_rows), predict_s, command)
    entry["fit_seconds"] = round(time.perf_counter() - t_start, 3)
    entry["cost"]["build_and_final_seconds"] = round(entry["fit_seconds"] - ft.seconds, 3)
    staged = _stage_files(run.path, key, ft, _Final(proba, final_rows), rows, class_names, entry)
    try:
        doc, replaced = commit_result(run.path, entry, staged, say=log)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return FinetuneRun(run.path, entry, doc, replaced)


def _entry(key: str, start: dict[str, Any], ft: FinetuneResult, cfg: FinetuneConfig, rows: _Rows,
           metrics: dict[str, Any], wrong: list[dict[str, Any]], n_final: int, predict_s: float,
           command: str) -> dict[str, Any]:
    """The ``results`` entry of a fine-tuned model (docs/results-format.md, "Fine-tuned results")."""
    acc, loss = ft.history["select_accuracy"], ft.history["select_loss"]
    search = [{"params": {"epoch": e}, "mean": float(a), "std": 0.0, "scores": [float(a)]}
              for e, a in enumerate(acc)]
    return jsonable({
        "key": key, "cache_index": int(start["cache_index"]), "backbone_label": start.get("backbone_label", ""),
        "head": FINETUNE_HEAD,
        "params": {"start": start["key"], "unfreeze": ft.unfreeze, "learning_rate": cfg.learning_rate,
                   "epochs": cfg.epochs, "epochs_run": ft.epochs_run, "best_epoch": ft.best_epoch,
                   "patience": cfg.patience, "batch_size": cfg.batch_size, "seed": cfg.seed,
                   "augmentation": {"flip": cfg.flip, "rotation": cfg.rotation, "zoom": cfg.zoom},
                   "trainable_weights": ft.trainable_weights},
        "selection_split": rows.select_name,
        "selection": {"index": ft.best_epoch, "score": float(acc[ft.best_epoch]), "std": 0.0},
        "search": search,
        "cost": {"form": "finetune", "approximation": None, "data": "images", "train_rows": len(rows.train),
                 "search_rows": len(rows.select), "subsample": False, "refit_rows": len(rows.train),
                 "selection_rows": len(rows.select), "train_seconds": round(ft.seconds, 3),
                 "note": f"fine-tuned from the image files: top {ft.unfreeze} backbone layers + the {start['head']} "
                         f"head, batch norms frozen; epoch {ft.best_epoch} of {ft.epochs_run} kept by "
                         f"{rows.select_name} accuracy"},
        "search_seconds": 0.0,
        "fit_seconds": 0.0,
        "predict_ms_per_1000": 1e6 * predict_s / max(1, n_final),
        "metrics": metrics,
        "history": {"loss": _finite(ft.history["loss"][1:]), "accuracy": _finite(ft.history["accuracy"][1:]),
                    "val_loss": _finite(loss[1:]), "val_accuracy": _finite(acc[1:])},
        "mistakes": wrong,
        "model_file": None,  # named by the saved model's digest (_stage_files)
        "model_sha256": None,
        "predictions_file": None,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })


def _finite(values: Sequence[Any]) -> list[float | None]:
    """Numbers as JSON allows them: None for a missing or non-finite value."""
    return [float(v) if isinstance(v, (int, float)) and np.isfinite(v) else None for v in values]


def _stage_files(run_dir: Path, key: str, ft: FinetuneResult, final: _Final, rows: _Rows,
                 class_names: list[str], entry: dict[str, Any]) -> dict[str, Path]:
    """Write the model and its predictions aside (:func:`pipeline.results.staged_name`) and name them in ``entry``.

    The files are named by the model's SHA-256 (``heads/<key>.<digest>.keras``, ``predictions/<key>.<digest>.csv``),
    so a new model never takes the name of the one results.json still describes: the entry and its files change
    together when :func:`pipeline.results.commit_result` replaces results.json.

    Returns
    -------
    dict of str to Path
        Entry field -> staged file, for :func:`pipeline.results.commit_result`.
    """
    heads, preds = run_dir / "heads", run_dir / "predictions"
    staged: dict[str, Path] = {}
    try:
        heads.mkdir(exist_ok=True)
        preds.mkdir(exist_ok=True)
        staged["model_file"] = staged_name(heads, key, ".keras")
        ft.model.save(staged["model_file"])
        staged["predictions_file"] = staged_name(preds, key, ".csv")
        write_result_predictions(staged["predictions_file"], final.proba, final.final_rows, rows.rel_paths,
                                 rows.splits, rows.labels, class_names)
        digest = file_sha256(staged["model_file"])
    except BaseException as exc:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise RunError(f"cannot write the fine-tuned model into {run_dir} ({exc.strerror or exc}); the run is as "
                           f"it was: free space, then rerun the same command") from None
        raise
    entry.update(model_file=f"heads/{key}.{digest[:12]}.keras", model_sha256=digest,
                 predictions_file=f"predictions/{key}.{digest[:12]}.csv")
    return staged
