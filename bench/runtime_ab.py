"""The model alone on both runtimes, A/B in one process: what ``--runtime auto``'s rule rests on.

For each backbone, one Keras feature model (random weights) is built once and run two ways on the same batches of
pixels already in memory: :class:`pipeline.runtime.keras.KerasRuntime` (TensorFlow's folded graph, as
``--runtime keras`` runs it) and ONNX Runtime (``--runtime onnx``: the same model exported, its parity check on the
first batch). The two alternate over ``--rounds`` rounds, each timed on the same batches, so a shared machine's load
falls on both alike -- far less noisy than two whole pipelines in separate processes minutes apart. Each runtime's
warm-up batch is excluded. Prints, per backbone and runtime, the median CPU milliseconds per image (all threads of the
process, user + system) and images/s, the ratio keras/onnx of the medians and of each round, and what ``auto``
takes on this machine and why (its own shorter timing, :mod:`pipeline.runtime.timing`, stored under
``$HEADBENCH_HOME``).

Usage::

    python bench/runtime_ab.py [--backbones mobilenet_v2 inception_v3] [--rounds 8] [--images 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import _start  # bench/_start.py: the repo on sys.path, TensorFlow's native chatter off

REPO = _start.start(__name__)

from pipeline.runtime.timing import process_cpu_seconds as _cpu  # noqa: E402  (after _start: the repo on sys.path)


def _timed(rt, px, batch: int) -> tuple[float, float]:
    """(CPU ms per image, images/s) of ``rt`` over ``px`` in batches."""
    t, c = time.perf_counter(), _cpu()
    for i in range(0, len(px), batch):
        rt(px[i:i + batch])
    wall, cpu = time.perf_counter() - t, _cpu() - c
    return 1000 * cpu / len(px), len(px) / wall


def measure(backbone: str, rounds: int, images: int, batch: int) -> dict[str, list[tuple[float, float]]]:
    import numpy as np

    from pipeline.extract import resolve_config
    from pipeline.runtime.factory import make_runtime
    from pipeline.backbones import build_features
    from pipeline.runtime.keras import KerasRuntime

    cfg = resolve_config(backbone=backbone, weights="none", batch_size=batch, log=lambda m: None)
    built = build_features(cfg.model)
    runtimes = {"keras": KerasRuntime(cfg.model, built),
                "onnx": make_runtime(cfg.model, "onnx", log=lambda m: None, built=built, batch_size=batch)}
    size = cfg.model.input_size
    px = np.random.default_rng(0).integers(0, 256, (images, size, size, 3), dtype=np.uint8)
    for rt in runtimes.values():
        rt(px[:batch])  # warm-up: graph tracing, the parity check, the session's allocations
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in runtimes}
    for r in range(rounds):
        order = list(runtimes) if r % 2 == 0 else list(runtimes)[::-1]  # neither always runs first
        for name in order:
            out[name].append(_timed(runtimes[name], px, batch))
    auto = make_runtime(cfg.model, "auto", log=lambda m: None, built=built, batch_size=batch)
    print(f"{backbone:14s} --runtime auto here: {auto.choice or auto.note}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "inception_v3"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import os

    from pipeline.machine import cpu_cores, cpu_flags

    flags = cpu_flags()
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    print(f"cores {cpu_cores()}, {simd}, load average {os.getloadavg()[0]:.2f}; batch {args.batch_size}, "
          f"{args.images} images x {args.rounds} alternating rounds")
    for backbone in args.backbones:
        res = measure(backbone, args.rounds, args.images, args.batch_size)
        med = {k: (statistics.median(c for c, _ in v), statistics.median(s for _, s in v)) for k, v in res.items()}
        for name, (cpu, rate) in med.items():
            print(f"{backbone:14s} {name:6s} {cpu:7.2f} ms CPU/img  {rate:7.1f} img/s (median)")
        per_round = [k[0] / o[0] for k, o in zip(res["keras"], res["onnx"])]
        print(f"{backbone:14s} keras/onnx CPU per image: {med['keras'][0] / med['onnx'][0]:.2f}x of the medians, "
              f"per round {min(per_round):.2f}-{max(per_round):.2f}x; img/s onnx/keras "
              f"{med['onnx'][1] / med['keras'][1]:.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
