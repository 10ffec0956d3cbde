"""Engine overhead: the local engine vs the Ray engine (`extract --engine ray`) on one machine.

Every variant extracts the same image folder into a fresh cache with the same model, batch size and part size, in
a fresh subprocess (so each pays its own TensorFlow import and model build), the variants rotating their order
every round so that machine noise hits all of them alike:

* ``local``       -- the local engine;
* ``ray``         -- the Ray engine as the command line runs it by default: a local Ray instance is started for
  the run (all cores, one model worker, decoding in Ray tasks beside it) and stopped after it;
* ``ray-joined``  -- the Ray engine joining a Ray head started once by this script (``ray start --head``, 2 CPUs),
  as a run on an existing cluster does: the per-run cost without the instance start.

Two figures per run:

* ``end-to-end`` -- images per second over the whole run, from process start to the last committed part:
  imports, model build, and for Ray the start or join, its worker processes and the object store traffic all
  included. This is the overhead figure: the same job, done by each engine on the same machine.
* ``steady`` -- images per second while rows are being committed: rows after the first part divided by the time
  from the first part's commit to the last one's (part files' modification times), the same rule for every
  variant. It flatters the Ray engine on a small set: its decoding tasks start at once and decode ahead while the
  model worker is still starting, so by its first part much of the decoding is done, while the local engine only
  starts decoding once its model is built.

Prints every round, the medians, and the ratios to ``local`` of the medians and per round. This measures overhead
on one machine, not scale: with one node the Ray engine can only match the local engine's work, not multiply it.

Usage::

    python bench/engines.py [--data ../shared/data/hymenoptera] [--rounds 3] [--batch 32] [--part-rows 64]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _start  # bench/_start.py: the repo on sys.path, TensorFlow's native chatter off

REPO = _start.start(__name__)
WEIGHTS = REPO.parent / "shared/weights/coralq_mobilenet_v2_1.0_224_no_top.weights.h5"
VARIANTS = ("local", "ray", "ray-joined")


def one_run(variant: str, address: str | None, data: Path, cache_dir: Path, batch: int, part_rows: int,
            started: float) -> dict:
    """Plan and run one engine (no assembly, so the part files stay for timing); return its figures."""
    from pipeline import cache
    from pipeline.data import discover
    from pipeline.extract import RayOptions, resolve_config
    from pipeline.extract.plan import cache_file, plan_extraction
    from pipeline.extract.run import run_engine
    from pipeline.views import NO_VIEWS

    cfg = resolve_config(log=lambda m: None, weights=str(WEIGHTS) if WEIGHTS.exists() else "none",
                         cache_dir=cache_dir, batch_size=batch, checkpoint_rows=part_rows, views=NO_VIEWS,
                         engine="local" if variant == "local" else "ray", ray=RayOptions(address=address))
    ds = discover(data)
    with cache.locked(cache_file(ds, cfg)):
        plan = plan_extraction(ds, cfg)
        report = run_engine(plan, log=lambda m: None)
        rows_per_part: dict[str, int] = {}
        for part, *_ in cache.scan_existing(plan.path, plan.meta).part_rows.values():
            rows_per_part[part.name] = rows_per_part.get(part.name, 0) + 1
        mtime = {name: (cache.parts_dir(plan.path) / name).stat().st_mtime for name in rows_per_part}
    n = sum(rows_per_part.values())
    first, last = min(mtime.values()), max(mtime.values())
    first_rows = rows_per_part[min(mtime, key=mtime.get)]
    return {"n": n, "parts": len(mtime), "workers": report.workers, "wall": last - started,
            "e2e": n / (last - started),
            "steady": (n - first_rows) / (last - first) if len(mtime) > 1 else float("nan")}


def replicated(src: Path, dst: Path, copies: int) -> Path:
    """A class-per-folder view of ``src`` with every image ``copies`` times, made of symlinks (split folders
    merged), for runs long enough that start-up costs fade: each copy is read and decoded like a new file."""
    from pipeline.data import discover

    ds = discover(src)
    for it in ds.items:
        folder = dst / ds.classes[it.label]
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            (folder / f"{k}__{it.relpath.replace('/', '__')}").symlink_to(ds.root / it.relpath)
    return dst


def start_head(log: Path) -> tuple[subprocess.Popen, str]:
    """A one-node Ray head on this machine (2 CPUs, reachable from here only), for the ``ray-joined`` variant."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats",
                             f"--object-store-memory={512 * 1024**2}"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the Ray head did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/hymenoptera")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--copies", type=int, default=1, help="Extract every image this many times (symlinks), to "
                                                          "see the rates once start-up is a small share.")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--part-rows", type=int, default=64, help="Rows per part file (every variant): a part every "
                                                                "~1.5 s at 45 img/s gives the steady rate its points.")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.address, args.data, args.cache_dir, args.batch, args.part_rows,
                                 args.started)))
        return

    print(f"engines on {args.data}{f' x{args.copies}' if args.copies > 1 else ''} "
          f"({'MobileNetV2, shared ImageNet weights' if WEIGHTS.exists() else 'random'}), "
          f"batch {args.batch}, parts of {args.part_rows} rows, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as work:
        data = replicated(args.data, Path(work) / args.data.name, args.copies) if args.copies > 1 else args.data
        head, address = start_head(Path(work) / "head.log")
        try:
            for r in range(args.rounds):
                order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
                for variant in order:
                    with tempfile.TemporaryDirectory() as tmp:
                        started = time.time()
                        cmd = [sys.executable, __file__, "--one", variant, "--data", str(data), "--cache-dir",
                               tmp, "--batch", str(args.batch), "--part-rows", str(args.part_rows), "--started",
                               str(started)] + (["--address", address] if variant == "ray-joined" else [])
                        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
                        if proc.returncode:
                            sys.exit(f"{variant} run failed:\n{proc.stderr[-3000:]}")
                        res = json.loads(proc.stdout.strip().splitlines()[-1])
                    results[variant].append(res)
                    print(f"round {r + 1} {variant:<10}: {res['n']} images, {res['parts']} parts, {res['workers']} "
                          f"worker(s): end-to-end {res['e2e']:5.1f} img/s ({res['wall']:5.1f} s), steady "
                          f"{res['steady']:5.1f} img/s", flush=True)
                lo = results["local"][-1]
                print(f"round {r + 1} ratio to local: " + ", ".join(
                    f"{v} end-to-end {results[v][-1]['e2e'] / lo['e2e']:.2f} steady "
                    f"{results[v][-1]['steady'] / lo['steady']:.2f}" for v in VARIANTS[1:]), flush=True)
        finally:
            head.terminate()  # `ray start --block` stops what it started
            head.wait(60)
    med = {v: {k: statistics.median(x[k] for x in res) for k in ("e2e", "steady", "wall")}
           for v, res in results.items()}
    for v in VARIANTS:
        print(f"median {v:<10}: end-to-end {med[v]['e2e']:.1f} img/s ({med[v]['wall']:.1f} s), steady "
              f"{med[v]['steady']:.1f} img/s")
    for v in VARIANTS[1:]:
        for key, name in (("e2e", "end-to-end"), ("steady", "steady")):
            per_round = [x[key] / lo[key] for lo, x in zip(results["local"], results[v])]
            print(f"{v}/local {name}: {med[v][key] / med['local'][key]:.2f} (medians), per round "
                  f"{', '.join(f'{x:.2f}' for x in per_round)}{' (target >= 0.8)' if key == 'e2e' else ''}")


if __name__ == "__main__":
    main()
