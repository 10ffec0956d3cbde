"""Kills `fit`, then `finetune`, with SIGKILL at seeded random write events, then runs each again (for
tests/test_run_faults.py).

Usage: ``python tests/run_fault_driver.py CACHE WORKDIR SEED``. Prints one JSON object; the test asserts on it.

A write event is any file opened for writing, ``os.replace``, ``os.rename``, ``os.unlink``, ``os.rmdir``,
``os.mkdir``, ``shutil.rmtree``, a Keras model save or a ``joblib.dump`` made by the command. Every command runs in
a child forked from this process after the imports (and before any TensorFlow work, so the child starts clean); a
child armed with ``kill_at = k`` sends itself SIGKILL at its k-th event. After every child, this process records what
the run folder's reader sees (:func:`state`): whether results.json loads, each entry's recorded SHA-256 beside the
SHA-256 of the file it names, and every file in the folder, so the test checks them independently.

- ``fit``: a reference run counts the events; then ``fit --out WORKDIR/fit/run`` is killed at a random event, run
  again and killed at another random event, then run again to the end.
- ``finetune`` on that run: a reference fine-tune on a copy counts the events; then on the run: killed at a random
  event, then run to the end; then a second fine-tune (which replaces the first) is killed just before its
  results.json is replaced (after its new model file is in place: the moment that used to leave results.json
  describing the old model), then run to the end.
"""

import builtins
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import joblib  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.errors import HeadbenchError  # noqa: E402
from pipeline.finetune import FinetuneConfig, finetune_run  # noqa: E402
from pipeline.fit import FitConfig, run_fit  # noqa: E402
from pipeline.fit.heads import HEADS, DenseHead  # noqa: E402
from pipeline.results import load_run  # noqa: E402

FIT_HEADS = ["logreg", "dense"]
FINETUNE = dict(unfreeze=6, epochs=1, learning_rate=1e-3, batch_size=8, workers=1, progress=False, run_eagerly=True)
# a 3-epoch dense head: the kills are about the run folder, not about training (as tests/test_fit.py's quick_dense)
HEADS["dense"] = dataclasses.replace(HEADS["dense"], build=lambda ctx, p, s: DenseHead(
    hidden=16, epochs=3, batch_size=256, validation_fraction=0.0, random_state=ctx.seed, run_eagerly=True))


def _name(arg) -> str:
    try:
        return Path(os.fsdecode(arg)).name
    except TypeError:
        return type(arg).__name__


def _writing(file, mode="r", *a, **k) -> bool:
    return isinstance(file, (str, bytes, os.PathLike)) and any(c in str(mode) for c in "wax+")


def arm(kill_at: int, events: list) -> None:
    """Count (and at ``kill_at``, die on) every write event of this process from now on."""

    def event(kind, fn, writes=lambda *a, **k: True, name_arg=0):
        def wrapped(*a, **k):
            if writes(*a, **k):
                events.append([kind, _name(a[name_arg]) if len(a) > name_arg else ""])
                if len(events) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)

        return wrapped

    builtins.open = event("open", builtins.open, _writing)
    for name in ("replace", "rename", "unlink", "rmdir", "mkdir"):  # a rename is named by the name it gives
        setattr(os, name, event(name, getattr(os, name), name_arg=1 if name in ("replace", "rename") else 0))
    shutil.rmtree = event("rmtree", shutil.rmtree)
    keras.Model.save = event("keras_save", keras.Model.save, name_arg=1)
    joblib.dump = event("joblib_dump", joblib.dump, name_arg=1)


def child(command, kill_at: int) -> dict:
    """Run ``command`` in a forked child armed at ``kill_at`` (0: never); how it ended and its events."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        events: list = []
        arm(kill_at, events)
        error = None
        try:
            command()
        except HeadbenchError as e:
            error = str(e)
        except BaseException as e:  # noqa: BLE001 - reported to the test, which fails on it
            error = f"{type(e).__name__}: {e}"
        with os.fdopen(w, "w") as f:
            f.write(json.dumps({"events": events, "error": error}))
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    res = json.loads(out) if out else {"events": None, "error": None}
    res["killed"] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    res["kill_at"] = kill_at
    return res


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def state(run_dir: Path) -> dict:
    """What a reader of the run folder finds: results.json's verdict, each entry's files, every file there."""
    out: dict = {"exists": run_dir.exists(), "error": None, "entries": [],
                 "files": sorted(str(p.relative_to(run_dir.parent)) for p in run_dir.parent.rglob("*")
                                 if p.is_file())}
    if not out["exists"]:
        return out
    try:
        run = load_run(run_dir)
    except HeadbenchError as e:
        out["error"] = str(e)
        return out
    for r in run.results["results"]:
        out["entries"].append({"key": r["key"], "model_file": r.get("model_file"),
                               "predictions_file": r.get("predictions_file"), "recorded": r.get("model_sha256"),
                               "actual": _sha(run_dir / str(r.get("model_file")))})
    return out


def points(rng, n: int) -> int:
    return int(rng.integers(1, n + 1))


def fit_campaign(cache: str, work: Path, rng) -> dict:
    def command(out):
        return lambda: run_fit(FitConfig(caches=[cache], heads=FIT_HEADS, out=out, command="fault driver"),
                               log=lambda m: None)

    ref = child(command(work / "reference"), 0)
    run_dir = work / "run"
    steps = []
    n = len(ref["events"])
    for _ in range(2):
        k = points(rng, n)
        steps.append(dict(child(command(run_dir), k), state=state(run_dir)))
    steps.append(dict(child(command(run_dir), 0), state=state(run_dir)))
    return {"reference": ref, "steps": steps}


def finetune_campaign(run: str, work: Path, rng) -> dict:
    def command(run_dir):
        return lambda: finetune_run(run_dir, config=FinetuneConfig(**FINETUNE), command="fault driver",
                                    log=lambda m: None)

    copy = work / "reference" / "run"
    shutil.copytree(run, copy)
    ref = child(command(copy), 0)
    n = len(ref["events"])
    # the same events lead a replacing fine-tune up to its results.json (it deletes the replaced files after)
    targeted = max(i for i, (kind, name) in enumerate(ref["events"], 1)
                   if kind == "replace" and name == "results.json")
    run_dir = work / "run" / "run"
    shutil.copytree(run, run_dir)
    steps = [dict(child(command(run_dir), points(rng, n)), state=state(run_dir)),
             dict(child(command(run_dir), 0), state=state(run_dir))]
    steps.append(dict(child(command(run_dir), targeted), state=state(run_dir), replacing=True))
    steps.append(dict(child(command(run_dir), 0), state=state(run_dir), replacing=True))
    return {"reference": ref, "targeted": targeted, "steps": steps}


def main() -> None:
    cache, work, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)
    fit = fit_campaign(cache, work / "fit", rng)
    finetune = finetune_campaign(str(work / "fit" / "run"), work / "finetune", rng)
    print(json.dumps({"fit": fit, "finetune": finetune}))


if __name__ == "__main__":
    main()
