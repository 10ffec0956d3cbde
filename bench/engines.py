"""Engine overhead: the local engine vs the Ray engine (`extract --engine ray`) on one machine.

Both engines extract the same image folder into a fresh cache with the same model, batch size and part size, each
round in fresh subprocesses (so each pays its own TensorFlow import, model build and, for Ray, the start of a local
Ray instance), the two engines alternating and swapping order every round so that machine noise hits both alike.
The Ray engine runs as the command line runs it by default: a local Ray instance started for the run (all cores,
one model worker, decoding in Ray tasks beside it).

Two figures per run:

* ``end-to-end`` -- images per second over the whole run, from process start to the last committed part:
  imports, model build, and for Ray the start of a local instance, its worker processes and the object store
  traffic all included. This is the overhead figure: the same job, done by each engine on the same machine.
* ``steady`` -- images per second while rows are being committed: rows after the first part divided by the time
  from the first part's commit to the last one's (part files' modification times), the same rule for both
  engines. It flatters the Ray engine on a small set: its decoding tasks start at once and decode ahead while the
  model worker is still starting, so by its first part much of the decoding is done, while the local engine only
  starts decoding once its model is built.

Prints every round, the medians, and the Ray / local ratio of the medians and per round. This measures overhead on
one machine, not scale: with one node the Ray engine can only match the local engine's work, not multiply it.

Usage::

    python bench/engines.py [--data ../shared/data/hymenoptera] [--rounds 3] [--batch 32] [--part-rows 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
WEIGHTS = REPO.parent / "shared/weights/coralq_mobilenet_v2_1.0_224_no_top.weights.h5"


def one_run(engine: str, data: Path, cache_dir: Path, batch: int, part_rows: int, started: float) -> dict:
    """Plan and run one engine (no assembly, so the part files stay for timing); return its figures."""
    from pipeline import cache
    from pipeline.data import discover
    from pipeline.extract import resolve_config
    from pipeline.extract.plan import cache_file, plan_extraction
    from pipeline.extract.run import run_engine
    from pipeline.extract.views import NO_VIEWS

    cfg = resolve_config(log=lambda m: None, weights=str(WEIGHTS) if WEIGHTS.exists() else "none",
                         cache_dir=cache_dir, batch_size=batch, checkpoint_rows=part_rows, engine=engine,
                         views=NO_VIEWS)
    ds = discover(data)
    with cache.locked(cache_file(ds, cfg)):
        plan = plan_extraction(ds, cfg)
        report = run_engine(plan, log=lambda m: None)
        rows_per_part: dict[str, int] = {}
        for part, *_ in cache.scan_existing(plan.path, plan.meta).part_rows.values():
            rows_per_part[part.name] = rows_per_part.get(part.name, 0) + 1
        parts = sorted((cache.parts_dir(plan.path) / name).stat().st_mtime for name in rows_per_part)
        first = min(rows_per_part, key=lambda n: (cache.parts_dir(plan.path) / n).stat().st_mtime)
    n = sum(rows_per_part.values())
    return {"engine": engine, "n": n, "parts": len(parts), "workers": report.workers,
            "steady": (n - rows_per_part[first]) / (parts[-1] - parts[0]) if len(parts) > 1 else float("nan"),
            "wall": parts[-1] - started, "e2e": n / (parts[-1] - started)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/hymenoptera")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--part-rows", type=int, default=64, help="Rows per part file (both engines): a part every "
                                                                "~1.5 s at 45 img/s gives the steady rate its points.")
    ap.add_argument("--one", choices=("local", "ray"), help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.data, args.cache_dir, args.batch, args.part_rows, args.started)))
        return

    import platform

    print(f"engines on {args.data} ({'MobileNetV2, shared ImageNet weights' if WEIGHTS.exists() else 'random'}), "
          f"batch {args.batch}, parts of {args.part_rows} rows, {os.cpu_count()} CPUs, {platform.processor() or ''}"
          f" {time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f}")
    results: dict[str, list[dict]] = {"local": [], "ray": []}
    for r in range(args.rounds):
        order = ("local", "ray") if r % 2 == 0 else ("ray", "local")
        for engine in order:
            with tempfile.TemporaryDirectory() as tmp:
                started = time.time()
                proc = subprocess.run([sys.executable, __file__, "--one", engine, "--data", str(args.data),
                                       "--cache-dir", tmp, "--batch", str(args.batch), "--part-rows",
                                       str(args.part_rows), "--started", str(started)],
                                      capture_output=True, text=True, cwd=REPO)
                if proc.returncode:
                    sys.exit(f"{engine} run failed:\n{proc.stderr[-3000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[engine].append(res)
            print(f"round {r + 1} {engine:<5}: {res['n']} images, {res['parts']} parts, {res['workers']} worker(s): "
                  f"end-to-end {res['e2e']:5.1f} img/s ({res['wall']:5.1f} s), steady {res['steady']:5.1f} img/s",
                  flush=True)
        lo, ra = results["local"][-1], results["ray"][-1]
        print(f"round {r + 1} ray/local: end-to-end {ra['e2e'] / lo['e2e']:.2f}, steady "
              f"{ra['steady'] / lo['steady']:.2f}", flush=True)
    med = {e: {k: statistics.median(x[k] for x in v) for k in ("e2e", "steady", "wall")}
           for e, v in results.items()}
    for e in ("local", "ray"):
        print(f"median {e:<5}: end-to-end {med[e]['e2e']:.1f} img/s ({med[e]['wall']:.1f} s), steady "
              f"{med[e]['steady']:.1f} img/s")
    for key, name in (("e2e", "end-to-end"), ("steady", "steady")):
        per_round = [ra[key] / lo[key] for lo, ra in zip(results["local"], results["ray"])]
        print(f"ray/local {name}: {med['ray'][key] / med['local'][key]:.2f} (medians), per round "
              f"{', '.join(f'{x:.2f}' for x in per_round)}{' (target >= 0.8)' if key == 'e2e' else ''}")


if __name__ == "__main__":
    main()
