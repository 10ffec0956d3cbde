"""Fault injection: SIGKILL at seeded random write events of `fit` and of `finetune`, then the same command again.

After every kill, what a reader finds must be whole: either no run folder under the asked name, or one whose
results.json loads and whose every entry's model file matches its recorded SHA-256. The same command then ends in a
complete, consistent run with no temporaries or orphan files left. The kills run in tests/run_fault_driver.py
(one process, each command in a forked child), which hashes the files after each step with hashlib; the final
files are hashed again here.

Tiny generated images and a small random-weight MobileNetV2 (alpha 0.35, 32 px): mechanics only.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path


from conftest import REPO, run_extract, write_blobs

DRIVER = REPO / "tests" / "run_fault_driver.py"
SEED = 20261202


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _whole(state: dict, run_dir: Path, heads: set[str]) -> None:
    """The reader's view after a step: results.json loads and every entry's file is the recorded one."""
    assert state["error"] is None, state["error"]
    assert {e["key"].split("__")[-1] for e in state["entries"]} >= heads
    for e in state["entries"]:
        assert e["recorded"] is not None and e["recorded"] == e["actual"], e


def _files(state: dict, folder: str) -> list[str]:
    return [f for f in state["files"] if f.startswith(folder + "/")]


def test_fit_and_finetune_killed_at_seeded_random_points_end_complete_and_consistent(tmp_path):
    root = tmp_path / "blobs"
    write_blobs(root)
    cache = run_extract(root, tmp_path / "cache", backbone="mobilenet_v2", weights="none", input_size=32, alpha=0.35,
                        runtime="keras").path
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(DRIVER), str(cache), str(work), str(SEED)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    # fit: killed twice at random events, then run to the end
    fit, run_dir = out["fit"], work / "fit" / "run"
    assert fit["reference"]["error"] is None and len(fit["reference"]["events"]) > 10
    *killed, last = fit["steps"]
    for step in killed:
        assert step["killed"], step["kill_at"]
        if step["state"]["exists"]:  # a folder under the asked name is only ever a finished run
            _whole(step["state"], run_dir, {"logreg", "dense"})
        else:
            assert not _files(step["state"], "run")
    assert not last["killed"] and last["error"] is None
    _whole(last["state"], run_dir, {"logreg", "dense"})
    assert not any(".partial" in f or f.endswith(".tmp") for f in last["state"]["files"]), last["state"]["files"]

    # finetune on that run: killed, completed; a replacing fine-tune killed just before its results.json, completed
    ft, run_dir = out["finetune"], work / "finetune" / "run" / "run"
    ref_events = out["finetune"]["reference"]["events"]
    assert ref_events[ft["targeted"] - 1][0] == "replace" and ref_events[ft["targeted"] - 1][1].startswith("results")
    assert any(kind == "replace" and name.endswith(".keras") for kind, name in ref_events[:ft["targeted"] - 1]), \
        "the targeted kill comes after the new model file is in place"
    finetuned = None
    for step in ft["steps"]:
        state = step["state"]
        assert step["killed"] == (step["kill_at"] != 0), step["kill_at"]
        assert step["error"] is None
        _whole(state, run_dir, {"logreg", "dense"} | ({"finetune"} if step.get("replacing") else set()))
        entry = next((e for e in state["entries"] if e["key"].endswith("__finetune")), None)
        if step["kill_at"] == ft["targeted"]:  # killed between the new model file and results.json:
            assert entry == finetuned, "results.json still describes the model it names, the previous one"
        if not step["killed"]:
            assert entry is not None
            finetuned = entry
    # the end: one fine-tuned entry, every file in heads/ and predictions/ named by an entry, no temporaries
    final = ft["steps"][-1]["state"]
    named = {e["model_file"] for e in final["entries"]} | {e["predictions_file"] for e in final["entries"]}
    kept = {f.split("/", 1)[1] for f in final["files"] if f.startswith("run/heads/") or f.startswith("run/predictions/")}
    assert kept == named, kept ^ named
    assert not any(".partial" in f or f.endswith(".tmp") for f in final["files"]), final["files"]
    assert sum(e["key"].endswith("__finetune") for e in final["entries"]) == 1
    for e in final["entries"]:  # recomputed here, on the files as they are now
        assert _sha(run_dir / e["model_file"]) == e["recorded"]
