"""Feeding a GPU: how fast the reader decodes on a many-core node, and what that means with the model on a GPU.

On a GPU node the model is no longer the bottleneck; decoding is. This benchmark measures, on the node it runs on:

* ``decode``   -- the reader alone (read + SHA-256 + decode + resize to 224, crop) at 1, 2, 4, 8, 12, 16 workers
  (``--reader process``, the default, as extract decodes beside a GPU; ``--reader thread`` for the thread pool);
* ``ort-cpu``  -- the exported ONNX model in ONNX Runtime on the CPU (``make_session``, one run per batch of 32 on
  one thread per core and on half as many; the extractor's own runs, pieces of a batch on one thread each, are not
  measured here), on decoded pixels: the node's CPU ceiling;
* ``gpu``      -- the same ONNX graph on the GPU, on decoded pixels (uint8 in from the host, features back), at
  batch 32 / 128 / 512, float32 and TF32, with the largest relative difference from ONNX Runtime on the CPU;
* ``reader->gpu`` and ``reader->ort`` -- the reader feeding the model, at several decoding-thread counts (the
  extractor's loop without the cache writes).

The GPU runs the graph through PyTorch (``onnx2torch``) because ``onnxruntime-gpu`` is not always installable where
this runs; ``torch`` and ``onnx2torch`` are not dependencies of the project (install them to run this part; it is
skipped with one line otherwise). The model file is the extractor's own export: make it where TensorFlow is
installed with ``--export FILE`` (shared MobileNetV2 weights), then run the benchmark with ``--onnx FILE`` on the
node. Configurations are interleaved over ``--rounds``; each is warmed up on its batch shapes first. Prints medians
and every round; ``--json`` writes them too.

Usage::

    python bench/gpu_node.py --export /tmp/mnv2.onnx            # where TensorFlow is installed
    python bench/gpu_node.py --onnx /tmp/mnv2.onnx [--data ../shared/data/hymenoptera] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

import _start  # bench/_start.py: the repo on sys.path, TensorFlow's native chatter off

REPO = _start.start(__name__)

from pipeline.data import discover  # noqa: E402
from pipeline.reader import read_batches  # noqa: E402
from pipeline.machine import cpu_cores, decode_threads  # noqa: E402

SIZE = 224
V2_WEIGHTS = REPO.parent / "shared" / "weights" / "coralq_mobilenet_v2_1.0_224_no_top.weights.h5"


def export(path: Path) -> None:
    """Export the extractor's MobileNetV2 feature model (shared weights) to ``path``."""
    import shutil

    from pipeline.extract import resolve_config
    from pipeline.runtime.factory import make_runtime

    cfg = resolve_config(backbone="mobilenet_v2", weights=str(V2_WEIGHTS), log=print)
    rt = make_runtime(cfg.model, "onnx", log=print)
    shutil.copyfile(rt.path, path)
    print(f"wrote {path}")


def _rate(fn: Callable[[], int]) -> float:
    t = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, help="the exported model (see --export)")
    ap.add_argument("--export", type=Path, help="write the exported MobileNetV2 model here and stop")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hymenoptera")
    ap.add_argument("--copies", type=int, default=3, help="the file list repeated this many times per timed pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--reader", choices=("process", "thread"), default="process",
                    help="decoding workers' kind (extract's default beside a GPU: process; run both to compare)")
    args = ap.parse_args()
    if args.export:
        return export(args.export)
    if not args.onnx:
        ap.error("--onnx FILE is needed (make it with --export FILE where TensorFlow is installed)")

    res: dict[str, list[float]] = {}
    ds = discover(args.data)
    items = list(ds.items) * args.copies
    cores = cpu_cores()
    print(f"# bench/gpu_node.py {time.strftime('%Y-%m-%d %H:%M')}: {cores} cores, {len(ds.items)} photos x "
          f"{args.copies}, load average {os.getloadavg()[0]:.2f}, default decoding threads {decode_threads()}")

    def decode_pass(w: int) -> int:
        return sum(len(b) for b in read_batches(ds.root, items, SIZE, "crop", 32, w, kind=args.reader))

    threads = [w for w in (1, 2, 4, 8, 12, 16) if w <= cores]
    for w in threads:  # warm the file cache and the pools
        sum(len(b) for b in read_batches(ds.root, ds.items[:64], SIZE, "crop", 32, w, kind=args.reader))
    for _ in range(args.rounds):
        for w in threads:
            res.setdefault(f"decode w{w}", []).append(_rate(lambda: decode_pass(w)))

    pix = np.concatenate([np.stack([d.pixels for d in b]) for b in
                          read_batches(ds.root, ds.items[:256], SIZE, "crop", 64, cores, kind=args.reader)])

    from pipeline.runtime.onnx import CPU_PROVIDER, make_session

    t_cpu = cores
    sessions = {t: make_session(args.onnx, [CPU_PROVIDER], t, SIZE, 32) for t in sorted({t_cpu, max(1, cores // 2)})}
    name = sessions[t_cpu].get_inputs()[0].name
    ref = np.concatenate([sessions[t_cpu].run(None, {name: pix[i:i + 32]})[0] for i in range(0, len(pix), 32)])

    def ort_pass(t: int) -> int:
        for i in range(0, len(pix), 32):
            sessions[t].run(None, {name: pix[i:i + 32]})
        return len(pix)

    def reader_ort(w: int, t: int) -> int:
        n = 0
        for b in read_batches(ds.root, items, SIZE, "crop", 32, w, kind=args.reader):
            x = np.stack([d.pixels for d in b if d.pixels is not None])
            sessions[t].run(None, {name: x})
            n += len(x)
        return n

    for t in sessions:
        ort_pass(t)
        sessions[t].run(None, {name: pix[:len(items) % 32 or 32]})
    combos = [(w, t_cpu) for w in sorted({cores, decode_threads(), max(1, cores // 4)})]
    for _ in range(args.rounds):
        for t in sessions:
            res.setdefault(f"ort-cpu threads {t}", []).append(_rate(lambda: ort_pass(t)))
        for w, t in combos:
            res.setdefault(f"reader w{w} -> ort-cpu threads {t}", []).append(_rate(lambda: reader_ort(w, t)))

    try:
        import onnx
        import torch
        from onnx2torch import convert
    except ImportError as exc:
        print(f"# gpu part skipped: {exc} (pip install torch onnx2torch)")
        torch = None
    if torch is not None and not torch.cuda.is_available():
        print("# gpu part skipped: torch sees no CUDA device")
        torch = None
    if torch is not None:
        dev = torch.device("cuda")
        net = convert(onnx.load(str(args.onnx))).eval().to(dev)
        print(f"# GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, graph through onnx2torch")

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return net(torch.from_numpy(x).to(dev)).float().cpu().numpy()

        def set_tf32(on: bool) -> None:
            torch.backends.cudnn.allow_tf32 = on
            torch.backends.cuda.matmul.allow_tf32 = on

        def warm(bs: int, n: int) -> None:
            for m in {bs, n % bs or bs}:
                run(np.concatenate([pix] * (m // len(pix) + 1))[:m])
            torch.cuda.synchronize()

        def gpu_pass(bs: int, n: int = 2048) -> int:
            x = np.concatenate([pix] * (bs // len(pix) + 1))[:bs]
            done = 0
            while done < n:
                run(x)
                done += bs
            torch.cuda.synchronize()
            return done

        def reader_gpu(w: int, bs: int) -> int:
            n = 0
            for b in read_batches(ds.root, items, SIZE, "crop", bs, w, kind=args.reader):
                n += len(run(np.stack([d.pixels for d in b if d.pixels is not None])))
            torch.cuda.synchronize()
            return n

        for tf32 in (False, True):
            set_tf32(tf32)
            out = np.concatenate([run(pix[i:i + 64]) for i in range(0, len(pix), 64)])
            print(f"# GPU {'TF32' if tf32 else 'float32'}: max |gpu - ort-cpu| / max |ort-cpu| = "
                  f"{float(np.abs(out - ref).max() / np.abs(ref).max()):.1e}")
            for bs in (32, 128, 512):
                warm(bs, 2048)
        set_tf32(False)
        gpu_threads = sorted({cores, decode_threads(), max(1, cores // 2), max(1, cores // 4)}, reverse=True)
        warm(128, len(items))  # the reader's batch shapes (full and last)
        for _ in range(args.rounds):
            for tf32 in (False, True):
                set_tf32(tf32)
                for bs in (32, 128, 512):
                    res.setdefault(f"gpu {'tf32' if tf32 else 'fp32'} batch {bs}", []).append(
                        _rate(lambda: gpu_pass(bs)))
            set_tf32(False)
            for w in gpu_threads:
                res.setdefault(f"reader w{w} -> gpu fp32 batch 128", []).append(_rate(lambda: reader_gpu(w, 128)))

    width = max(len(k) for k in res)
    print(f"{'':{width}}  img/s median  (rounds)")
    for k, v in res.items():
        print(f"{k:{width}}  {statistics.median(v):12.1f}  ({', '.join(f'{x:.0f}' for x in v)})")
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "rates": res}, indent=1))


if __name__ == "__main__":
    main()
