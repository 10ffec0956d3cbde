"""Extraction speed: this pipeline on ONNX Runtime and on Keras vs the ONNX ceiling vs the idiomatic Keras pipeline.

For each backbone, on the same image files, these phases run in fresh subprocesses (so each has its own thread
set-up and peak RSS), interleaved over ``--repeats`` rounds so that machine noise hits all of them alike:

* ``keras``     -- the idiomatic Keras pipeline: ``keras.utils.image_dataset_from_directory`` +
  ``preprocess_input`` + ``model.predict``;
* ``pl-keras``  -- ``extract_dataset(..., runtime="keras")`` from the JPEG files into a fresh cache;
* ``pl-onnx``   -- ``extract_dataset(..., runtime="onnx")``, the same with ONNX Runtime (its parity check against
  Keras on the first batch included);
* ``ceiling``   -- the ONNX Runtime session alone on pixels already decoded into memory (no I/O, no decoding).

Model construction, the one-time ONNX export (done before the rounds, its time printed) and the engines' warm-up
batch are excluded; the pipelines' figures are their recorded ``extract_seconds`` (decoding + model + HDF5 writes)
and the CPU time of the same span. Then, from a ``breakdown`` phase of each step alone (:func:`phase_breakdown`),
where an image's CPU goes in each pipeline (its model step in that pipeline's runtime), and each pipeline against its
bound ``cores x 1000 / (model + decode)``. Prints medians, every
run, the ratios (of the medians and per round: the phases of a round run back to back under the same load), the
CPU time per image (all threads; a shared machine's other load changes it far less than images/s), peak RSS, and
decode-only throughput (the reader alone, threads and processes, 1 worker and the default count: one per core, at
most 8; beside it, how much faster the same count of independent processes decodes than one, the machine's own
ceiling for any pool), which
says how fast a GPU could be fed (``bench/gpu_node.py`` measures that on a GPU node). The machine's load average is
printed before and after, since these machines are shared.

Usage::

    python bench/extract.py [--data ../shared/data/hymenoptera] [--backbones mobilenet_v2 inception_v3]
                            [--repeats 3] [--reader auto|process|thread]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _start  # bench/_start.py: the repo on sys.path, TensorFlow's native chatter off

REPO = _start.start(__name__)

from pipeline.reader import READER_KINDS  # noqa: E402  (after _start: the repo on sys.path)

TARGETS = {  # (numerator, denominator): minimum ratio, per backbone (None: no target)
    "mobilenet_v2": {("pl-onnx", "keras"): 3.0, ("pl-onnx", "pl-keras"): 2.5, ("pl-onnx", "ceiling"): 0.8},
    "inception_v3": {("pl-onnx", "keras"): 1.35},
}


def flat_copy(src: Path, dst: Path) -> Path:
    """Class-per-folder view of ``src`` (split folders merged) made of symlinks, so every phase reads the same files."""
    from pipeline.data import discover

    ds = discover(src)
    for it in ds.items:
        cls = ds.classes[it.label]
        (dst / cls).mkdir(parents=True, exist_ok=True)
        link = dst / cls / it.relpath.replace("/", "__")
        if not link.exists():
            link.symlink_to(ds.root / it.relpath)
    return dst


def peak_rss_mib() -> float:
    """This process's own peak RSS in MiB (``VmHWM``; ``ru_maxrss`` would include the parent's peak, since Linux keeps
    it across ``execve``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: kB on most systems


def _cpu() -> float:
    """CPU seconds used so far by this process (all threads, user + system) and by its children that have exited
    (the reader's decoding processes, counted once the reader has stopped them)."""
    return sum(ru.ru_utime + ru.ru_stime for ru in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))


def _onnx_runtime(backbone: str, batch: int):
    from pipeline.extract import resolve_config
    from pipeline.runtime.factory import make_runtime

    cfg = resolve_config(backbone=backbone, weights="none", batch_size=batch, log=lambda m: None)
    return cfg, make_runtime(cfg.model, "onnx", log=print, batch_size=batch)


def phase_prepare(root: Path, backbone: str, batch: int) -> dict:
    """Export the ONNX model once (outside every timed phase) and report how long it took, and what
    ``--runtime auto`` takes here (on a CPU: both runtimes timed once, stored beside the export)."""
    from pipeline.runtime.factory import make_runtime

    t = time.perf_counter()
    cfg, rt = _onnx_runtime(backbone, batch)
    seconds = time.perf_counter() - t
    auto = make_runtime(cfg.model, "auto", log=lambda m: None, built=rt.built, batch_size=batch)
    return {"n": 0, "seconds": seconds, "summary": rt.summary(), "auto": auto.choice or auto.note}


def phase_ceiling(root: Path, backbone: str, batch: int) -> dict:
    import numpy as np

    from pipeline.data import discover, load_image

    ds = discover(root)
    cfg, rt = _onnx_runtime(backbone, batch)
    size = cfg.model.input_size
    px = np.stack([load_image(ds.root / it.relpath, size) for it in ds.items])
    rt(px[:batch])  # first real batch: the parity check, and the session's allocations
    t, c = time.perf_counter(), _cpu()
    for i in range(0, len(px), batch):
        rt(px[i:i + batch])
    return {"n": len(px), "seconds": time.perf_counter() - t, "cpu": _cpu() - c}


class _WarmUpApart:
    """A runtime whose first call (the engine's warm-up batch of zeros, before any image is read: tracing, kernel
    choice) has its CPU time kept apart, as ``extract_seconds`` keeps its time apart."""

    def __init__(self, rt) -> None:
        self.rt, self.warm_up_cpu, self._calls = rt, 0.0, 0

    def __getattr__(self, name):
        return getattr(self.rt, name)

    def __call__(self, pixels):
        self._calls += 1
        if self._calls > 1:
            return self.rt(pixels)
        c = _cpu()
        out = self.rt(pixels)
        self.warm_up_cpu = _cpu() - c
        return out


def _pipeline(root: Path, backbone: str, batch: int, runtime: str, workers: int | None, reader: str) -> dict:
    """``extract_dataset`` into a fresh cache. Its CPU is counted, through the engine's two seams, from when the
    runtime is built (its warm-up batch left out) to the last part's commit (the engine's end; the assembly after it
    is not ``extract_seconds`` either)."""
    from pipeline import cache
    from pipeline.atomic import commit_file
    from pipeline.extract import extract_dataset, resolve_config
    from pipeline.runtime.factory import make_runtime

    marks: dict[str, float] = {}
    runtimes: list[_WarmUpApart] = []

    def factory(model, runtime, log, batch_size):  # the real runtime, built before the count starts
        runtimes.append(_WarmUpApart(make_runtime(model, runtime, log=log, batch_size=batch_size)))
        marks["start"] = _cpu()
        return runtimes[-1]

    def commit(tmp: Path, path: Path) -> None:
        commit_file(tmp, path)
        if path.name.startswith("part-"):  # a part (pipeline.cache.write), not the assembled cache
            marks["end"] = _cpu()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_config(backbone=backbone, weights="none", cache_dir=tmp, batch_size=batch, workers=workers,
                             runtime=runtime, reader=reader, log=lambda m: None)
        msgs: list[str] = []
        res = extract_dataset(root, cfg, log=msgs.append, runtime_factory=factory, commit=commit)
        meta = cache.read_meta(res.path)
        notes = [m for m in msgs if m.startswith("runtime:") or m.startswith("device:")]
        return {"n": res.n_total, "seconds": float(meta["extract_seconds"]),
                "cpu": marks["end"] - marks["start"] - runtimes[0].warm_up_cpu,
                "wall_with_build": res.seconds, "notes": notes}


def phase_pl_onnx(root: Path, backbone: str, batch: int, workers: int | None = None, reader: str = "auto") -> dict:
    return _pipeline(root, backbone, batch, "onnx", workers, reader)


def phase_pl_keras(root: Path, backbone: str, batch: int, workers: int | None = None, reader: str = "auto") -> dict:
    return _pipeline(root, backbone, batch, "keras", workers, reader)


def phase_keras(root: Path, backbone: str, batch: int) -> dict:
    import keras

    from pipeline.backbones import _resolve, get_spec

    spec = get_spec(backbone)
    size = spec.default_input_size
    model = _resolve(spec.builder)(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg")
    preprocess = _resolve(spec.preprocess)
    ds = keras.utils.image_dataset_from_directory(root, image_size=(size, size), batch_size=batch, shuffle=False,
                                                  verbose=False)
    ds = ds.map(lambda x, y: preprocess(x))
    model.predict(ds.take(1), verbose=0)  # warm-up
    t, c = time.perf_counter(), _cpu()
    out = model.predict(ds, verbose=0)
    return {"n": len(out), "seconds": time.perf_counter() - t, "cpu": _cpu() - c}


def phase_decode(root: Path, backbone: str, batch: int, reader: str = "auto", rounds: int = 3) -> dict:
    """The reader alone (read + hash + decode + resize), each kind of worker with 1 and with the default count,
    start-up included (the pipeline pays it too), medians of ``rounds``; ``kind``: the one the pipeline's rule picks
    for this folder on this machine's CPU."""
    from pipeline.backbones import get_spec
    from pipeline.data import discover
    from pipeline.machine import cpu_cores, decode_threads
    from pipeline.reader import plan_reader, read_batches, shm_free_bytes

    ds = discover(root)
    size = get_spec(backbone).default_input_size
    kind = plan_reader(len(ds.items), decode_threads(), batch, size * size * 3, reader, shm_free_bytes()).kind
    out: dict = {"cores": cpu_cores(), "default_workers": decode_threads(), "kind": kind, "runs": []}
    for _ in read_batches(ds.root, ds.items, size, "crop", batch, 1, kind="thread"):  # warm the file cache
        pass
    timings: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(rounds):  # interleaved, so that a burst of other load hits every configuration alike
        for kind in ("thread", "process"):
            for workers in sorted({1, decode_threads()}):
                t, c = time.perf_counter(), _cpu()
                batches = read_batches(ds.root, ds.items, size, "crop", batch, workers, kind=kind)
                first = len(next(batches))
                t1 = time.perf_counter()  # the workers started and one batch out: the steady state from here
                n = first + sum(len(b) for b in batches)
                end = time.perf_counter()
                timings.setdefault((kind, workers), []).append((end - t, _cpu() - c, (n - first) / (end - t1)))
    for (kind, workers), runs in timings.items():
        out["runs"].append({"kind": kind, "workers": workers, "n": n, "rounds": len(runs),
                            "seconds": statistics.median(r[0] for r in runs),
                            "cpu": statistics.median(r[1] for r in runs),
                            "steady": statistics.median(r[2] for r in runs)})
    return out


def phase_decode_loop(root: Path, backbone: str, batch: int) -> dict:
    """Every image decoded once in a plain loop of this one process (for the machine's own scaling ceiling)."""
    from pipeline.backbones import get_spec
    from pipeline.data import discover
    from pipeline.reader import decode_item

    ds = discover(root)
    size = get_spec(backbone).default_input_size
    t = time.perf_counter()
    for it in ds.items:
        decode_item(ds.root, it, size, "crop")
    return {"n": len(ds.items), "seconds": time.perf_counter() - t}


def _workers(kind: str, n: int) -> str:
    return f"{n} {kind}" + ("" if n == 1 else "es" if kind == "process" else "s")


def machine_scaling(root: Path, backbone: str, batch: int, copies: int) -> float:
    """How much faster ``copies`` independent processes decode than one: each decodes the whole folder in a plain
    loop, one alone and then ``copies`` at once. Nothing is shared between them, so this is the most any pool of
    workers can gain on this machine (shared caches, memory bandwidth, a neighbour on the same physical core)."""
    def start() -> subprocess.Popen:
        cmd = [sys.executable, __file__, "--phase", "decode-loop", "--data", str(root), "--backbones", backbone,
               "--batch-size", str(batch)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    def seconds(proc: subprocess.Popen) -> float:
        out, _ = proc.communicate()
        return float(json.loads(out.strip().splitlines()[-1])["seconds"])

    alone = seconds(start())
    together = [start() for _ in range(copies)]
    return copies * alone / max(seconds(p) for p in together)


def _cpu_ms(fn, n: int) -> float:
    """CPU milliseconds per item of ``fn()`` (all threads of this process)."""
    c = _cpu()
    fn()
    return 1000 * (_cpu() - c) / max(1, n)


def phase_breakdown(root: Path, backbone: str, batch: int, runtime: str = "onnx") -> dict:
    """Where the CPU of an image goes, each step alone on this process, one image or batch at a time, through the
    pipeline's own functions: reading the file, its SHA-256, decoding, resizing, stacking a batch, the model on
    batches in ``runtime`` (first batch, with ONNX Runtime's parity check, apart), and the cache's part writes with
    their checksums."""
    import hashlib

    import numpy as np

    from pipeline import cache
    from pipeline.data import decode_rgb, discover, resize_region
    from pipeline.extract import resolve_config
    from pipeline.extract.plan import plan_extraction
    from pipeline.runtime.factory import make_runtime

    ds = discover(root)
    items = ds.items
    n = len(items)
    out: dict = {"n": n}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_config(backbone=backbone, weights="none", batch_size=batch, cache_dir=tmp, log=lambda m: None)
        size, rule = cfg.model.input_size, cfg.resize
        files = [ds.root / it.relpath for it in items]
        for f in files:  # the file cache warm, as in the pipeline phases (each reads the same files in turn)
            f.read_bytes()
        blobs: list[bytes] = []
        out["read"] = _cpu_ms(lambda: blobs.extend(f.read_bytes() for f in files), n)
        out["hash"] = _cpu_ms(lambda: [hashlib.sha256(b).hexdigest() for b in blobs], n)
        images: list = []

        def decode() -> None:
            for b in blobs:
                try:
                    images.append(decode_rgb(b, size))
                except Exception:  # noqa: BLE001 - an undecodable file costs its attempt, as in the pipeline
                    images.append(None)

        out["decode"] = _cpu_ms(decode, n)
        px: list = []
        out["resize"] = _cpu_ms(lambda: px.extend(np.asarray(resize_region(im, size, rule), dtype=np.uint8).copy()
                                                  for im in images if im is not None), n)
        starts = range(0, len(px), batch)

        def stack_each() -> None:
            for i in starts:
                np.stack(px[i:i + batch])  # let go at once

        # Each batch stacked and let go before the next, as in the pipeline: batches kept in turn would all be fresh
        # pages (37 faults per 224 px image), which the pipeline does not pay. The model's batches are not counted.
        out["batch"] = _cpu_ms(stack_each, n)
        batches = [np.stack(px[i:i + batch]) for i in starts]
        rt = make_runtime(cfg.model, runtime, log=lambda m: None, batch_size=batch)
        rt(np.zeros_like(batches[0]))  # the engines' warm-up batch
        first = _cpu_ms(lambda: rt(batches[0]), 1)  # first real batch: the model and the parity check
        feats: list = []
        out["model"] = _cpu_ms(lambda: feats.extend(rt(b) for b in batches[1:]), len(px) - len(batches[0]))
        out["parity"] = (first - out["model"] * len(batches[0])) / n  # spread over the run's images, as it is
        plan = plan_extraction(ds, cfg, keep_other_views=True)
        shapes = {k: tuple(v.shape[1:]) for k, v in feats[0].items()}
        writer = cache.PartWriter(plan.path, plan.meta, shapes, cfg.checkpoint_rows, 1e9)

        def write() -> None:
            for b in feats:
                for j in range(len(next(iter(b.values())))):
                    writer.add({"path": "x", "label": 0, "split": "", "size": 1, "mtime_ns": 1, "sha256": "0" * 64,
                                "ok": True, "error": ""}, {k: v[j] for k, v in b.items()})
                writer.maybe_flush(coming=batch)
            writer.flush()

        out["write"] = _cpu_ms(write, len(px) - len(batches[0]))
    out["summary"] = rt.summary()
    return out


PHASES = {"keras": phase_keras, "pl-keras": phase_pl_keras, "pl-onnx": phase_pl_onnx, "ceiling": phase_ceiling}
BREAKDOWNS = {"pl-onnx": "onnx", "pl-keras": "keras"}
"""Each pipeline phase whose CPU the breakdown accounts for, and the runtime its model step runs in."""

HELPERS = {"prepare": phase_prepare, "decode": phase_decode, "decode-loop": phase_decode_loop,
           **{f"breakdown-{rt}": functools.partial(phase_breakdown, runtime=rt) for rt in BREAKDOWNS.values()}}


def run_phase(name: str, root: Path, backbone: str, batch: int, workers: int | None = None,
              reader: str = "auto") -> dict:
    """Run one phase in a fresh interpreter; returns its timing and peak RSS (MiB)."""
    cmd = [sys.executable, __file__, "--phase", name, "--data", str(root), "--backbones", backbone,
           "--batch-size", str(batch), "--reader", reader] + (["--workers", str(workers)] if workers else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


STEPS = ("read", "hash", "decode", "resize", "batch", "model", "parity", "write")
"""The steps of :func:`phase_breakdown`, in the order an image meets them (read + hash + decode + resize is the
reader's work; the reader alone also spends its thread pool's hand-offs, which the bound counts as decoding)."""


def print_breakdown(parts: dict, decode_cpu_ms: float, pipeline_cpu_ms: float, pipeline_rate: float,
                    cores: int, runtime: str) -> None:
    """The CPU per image of each step, the rest of the pipeline's CPU, and the pipeline against the bound
    ``cores x 1000 / (model + decode)``: the model's CPU per image alone, and decoding's as the reader alone spends it
    with the pipeline's kind and count of workers (the decode-only line above), both measured in this run."""
    steps = {k: float(parts[k]) for k in STEPS}
    rest = pipeline_cpu_ms - sum(steps.values())
    bound = cores * 1000 / (steps["model"] + decode_cpu_ms)
    print(f"  where the CPU of an image goes (ms, each step alone; pipeline --runtime {runtime}: "
          f"{pipeline_cpu_ms:.2f} ms/img):")
    print("    " + "  ".join(f"{k} {v:.2f}" for k, v in steps.items()) + f"  rest {rest:.2f}")
    print(f"    bound = {cores} cores x 1000 / (model {steps['model']:.2f} + decode {decode_cpu_ms:.2f}) = {bound:.1f} "
          f"img/s; pipeline {pipeline_rate:.1f} img/s = {pipeline_rate / bound:.2f} of it (target >= 0.9)")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hymenoptera")
    ap.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "inception_v3"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="decoding workers of the pipelines (default: theirs)")
    ap.add_argument("--reader", choices=READER_KINDS, default="auto", help="decoding workers' kind of the pipelines")
    ap.add_argument("--decode-only", action="store_true",
                    help="only the decode-only lines (threads and processes, 1 vs the default count) and the ceiling")
    ap.add_argument("--phase", choices=[*PHASES, *HELPERS], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:
        fn = {**PHASES, **HELPERS}[args.phase]
        extra = {"workers": args.workers, "reader": args.reader} if args.phase.startswith("pl-") else {}
        extra = {"reader": args.reader} if args.phase == "decode" else extra
        res = fn(args.data, args.backbones[0], args.batch_size, **extra)
        res["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(res))
        return

    if not args.data.exists():
        raise SystemExit(f"{args.data} not found (the benchmark uses ../shared/data/hymenoptera by default)")
    with tempfile.TemporaryDirectory() as tmp:
        root = flat_copy(args.data, Path(tmp) / args.data.name)
        print(f"data: {args.data} ({sum(1 for _ in root.rglob('*.*'))} files), batch {args.batch_size}, "
              f"{os.cpu_count()} CPUs, repeats {args.repeats}; random weights (speed does not depend on them); "
              f"load average {load()} at {time.strftime('%Y-%m-%d %H:%M')}")
        for backbone in args.backbones:
            if args.decode_only:
                print(f"\n{backbone}: decoding at its input size")
            else:
                prep = run_phase("prepare", root, backbone, args.batch_size)
                print(f"\n{backbone}: {prep['summary']}; ONNX model ready in {prep['seconds']:.1f}s (export, or the "
                      f"stored file reused); --runtime auto here: {prep['auto']}")
            dec = run_phase("decode", root, backbone, args.batch_size, reader=args.reader)
            by = {(r["kind"], r["workers"]): r for r in dec["runs"]}
            for (kind, w), d in by.items():
                print(f"  decode only, {_workers(kind, w)}: {d['n'] / d['seconds']:6.1f} img/s = "
                      f"{d['n'] / d['seconds'] / w:6.1f} img/s per worker ({1000 * d['cpu'] / d['n']:.2f} ms CPU per "
                      f"image; start-up included; after the first batch {d['steady']:.1f} img/s; median of "
                      f"{d['rounds']})")
            wd = dec["default_workers"]
            if wd > 1:
                ceiling = machine_scaling(root, backbone, args.batch_size, wd)
                for kind in ("thread", "process"):
                    gain = by[(kind, 1)]["seconds"] / by[(kind, wd)]["seconds"]
                    steady = by[(kind, wd)]["steady"] / by[(kind, 1)]["steady"]
                    print(f"  decode {_workers(kind, wd)} vs 1: {gain:.2f}x, after the first batch {steady:.2f}x "
                          f"(target >= 1.8; "
                          f"{wd} independent processes on this machine: {ceiling:.2f}x)")
            if args.decode_only:
                continue
            parts = {p: run_phase(f"breakdown-{rt}", root, backbone, args.batch_size) for p, rt in BREAKDOWNS.items()}
            rates: dict[str, list[float]] = {p: [] for p in PHASES}
            cpu_ms: dict[str, list[float]] = {p: [] for p in PHASES}
            rss: dict[str, float] = {}
            notes: set[str] = set()
            for _ in range(args.repeats):
                for p in PHASES:
                    r = run_phase(p, root, backbone, args.batch_size, args.workers, args.reader)
                    rates[p].append(r["n"] / r["seconds"])
                    cpu_ms[p].append(1000 * r["cpu"] / r["n"])
                    rss[p] = max(rss.get(p, 0.0), r["peak_rss_mib"])
                    notes.update(r.get("notes", []))
            med = {p: statistics.median(v) for p, v in rates.items()}
            print(f"  images/s, median of {args.repeats} (all runs); CPU time per image (all threads, median; less "
                  f"sensitive to other load than images/s); peak RSS:")
            for p in PHASES:
                print(f"  {p:<9} {med[p]:7.1f}   ({', '.join(f'{v:.1f}' for v in rates[p])})   "
                      f"CPU {statistics.median(cpu_ms[p]):5.1f} ms/img   peak RSS {rss[p]:.0f} MiB")
            for note in sorted(notes):
                print(f"    [{note}]")
            default = by[(dec["kind"], wd)]
            for p, rt in BREAKDOWNS.items():
                print_breakdown(parts[p], 1000 * default["cpu"] / default["n"], statistics.median(cpu_ms[p]), med[p],
                                int(dec["cores"]), rt)
            pairs = [("pl-onnx", "keras"), ("pl-onnx", "pl-keras"), ("pl-onnx", "ceiling"), ("pl-keras", "keras"),
                     ("ceiling", "keras")]
            for num, den in pairs:
                per_round = [a / b for a, b in zip(rates[num], rates[den])]
                target = TARGETS.get(backbone, {}).get((num, den))
                verdict = ""
                if target is not None:
                    verdict = f"   target >= {target:g}: {'met' if med[num] / med[den] >= target else 'NOT met'}"
                by_cpu = statistics.median(cpu_ms[den]) / statistics.median(cpu_ms[num])
                print(f"  {num + ' / ' + den:<20} = {med[num] / med[den]:5.2f}   (per round: "
                      f"{', '.join(f'{r:.2f}' for r in per_round)}; median {statistics.median(per_round):.2f}; "
                      f"by CPU time per image {by_cpu:.2f}){verdict}")
        print(f"\nload average {load()} at {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
