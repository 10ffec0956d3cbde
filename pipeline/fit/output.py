"""What a fit writes into its run folder: the folder itself (built hidden, published whole), the fitted heads and
the pick (``best``). The objects of results.json, and the per-image predictions files, are :mod:`pipeline.results`'s
(their writers beside their readers)."""

from __future__ import annotations

import datetime as _dt
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import FitError
from pipeline.fit.evaluate import HeadResult
from pipeline.fit.verdict import verdict
from pipeline.results import OWNER_FILE, abandoned_partials, claim_partial, partial_builder, partial_dir, slug

__all__ = ["DEFAULT_RUNS_DIR", "default_out", "prepare_run_dir", "publish_run_dir", "discard_run_dir", "partial_dir",
           "save_head", "pick_best"]

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


def pick_best(results: list[dict[str, Any]], skipped: list[dict[str, Any]],
              correct: dict[str, dict[str, np.ndarray]], report_split: str, selection: str, rule: str,
              seed: int) -> dict[str, Any]:
    """The run's ``best``: the result the pick rule chose, with every other result compared with it on the same
    images (:func:`pipeline.fit.verdict.verdict`), and its accuracy without leaks when the audit measured one.

    Raises
    ------
    FitError
        Every head was skipped (the line names up to three, with their reasons).
    """
    if not results:
        why = "; ".join(f"{s['head']} on {s['backbone_label']}: {s['reason']}" for s in skipped[:3])
        raise FitError(f"every head was skipped ({why}); pass a larger --memory-budget")
    best = verdict(results, correct, report_split, selection, rule, seed)
    chosen = next((r for r in results if r["key"] == best["key"]), {})
    if isinstance(chosen.get("leak_free"), dict) and best["split"] in chosen["leak_free"]:
        best["leak_free"] = chosen["leak_free"][best["split"]]
    return best
