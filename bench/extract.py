"""Extraction speed: this pipeline vs the model's compute ceiling vs the idiomatic Keras pipeline.

For each backbone, on the same image files, three phases run in fresh subprocesses (so each has its own thread
set-up and peak RSS), interleaved over ``--repeats`` rounds so that machine noise hits all of them alike:

* ``ceiling``  -- the compiled feature model on pixels already decoded into memory (no I/O, no decoding);
* ``pipeline`` -- ``extract_dataset`` from the JPEG files into a fresh cache (decode threads + model + HDF5 writes);
* ``keras``    -- ``keras.utils.image_dataset_from_directory`` + ``preprocess_input`` + ``model.predict``.

Model construction is excluded from every timing. Prints medians, the ratios (of the medians, and per round, since
the phases of one round run back to back under the same machine load) and peak RSS. ``ceiling / keras`` bounds what
any input pipeline could reach against Keras with this model: where the model alone is not 1.2x faster than the
idiomatic pipeline, decoding cannot make up the difference.

Usage::

    python bench/extract.py [--data ../shared/data/hymenoptera] [--backbones mobilenet_v2 inception_v3]
                            [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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


def phase_ceiling(root: Path, backbone: str, batch: int) -> dict:
    import numpy as np

    from pipeline.backbones import build_feature_model
    from pipeline.data import discover, load_image
    from pipeline.extract.runtime import configure_threads, make_runner

    configure_threads()
    ds = discover(root)
    built = build_feature_model(backbone, weights="none", announce=lambda m: None)
    px = np.stack([load_image(ds.root / it.relpath, built.input_size) for it in ds.items])
    run = make_runner(built)
    run(px[:batch])  # warm-up: trace and allocate
    t = time.perf_counter()
    for i in range(0, len(px), batch):
        run(px[i:i + batch])
    return {"n": len(px), "seconds": time.perf_counter() - t}


def phase_pipeline(root: Path, backbone: str, batch: int, workers: int | None = None) -> dict:
    from pipeline import cache
    from pipeline.extract import extract_dataset, resolve_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_config(backbone=backbone, weights="none", cache_dir=tmp, batch_size=batch, workers=workers,
                             log=lambda m: None)
        res = extract_dataset(root, cfg, log=lambda m: None)
        meta = cache.read_meta(res.path)
        return {"n": res.n_total, "seconds": float(meta["extract_seconds"]), "wall_with_build": res.seconds}


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
    t = time.perf_counter()
    out = model.predict(ds, verbose=0)
    return {"n": len(out), "seconds": time.perf_counter() - t}


PHASES = {"ceiling": phase_ceiling, "pipeline": phase_pipeline, "keras": phase_keras}


def run_phase(name: str, root: Path, backbone: str, batch: int, workers: int | None = None) -> dict:
    """Run one phase in a fresh interpreter; returns its timing and peak RSS (MiB)."""
    cmd = [sys.executable, __file__, "--phase", name, "--data", str(root), "--backbones", backbone,
           "--batch-size", str(batch)] + (["--workers", str(workers)] if workers else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hymenoptera")
    ap.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "inception_v3"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="decoding threads of the pipeline (default: its own)")
    ap.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:
        extra = {"workers": args.workers} if args.phase == "pipeline" else {}
        res = PHASES[args.phase](args.data, args.backbones[0], args.batch_size, **extra)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return

    if not args.data.exists():
        raise SystemExit(f"{args.data} not found (the benchmark uses ../shared/data/hymenoptera by default)")
    with tempfile.TemporaryDirectory() as tmp:
        root = flat_copy(args.data, Path(tmp) / args.data.name)
        print(f"data: {args.data} ({sum(1 for _ in root.rglob('*'))} entries), batch {args.batch_size}, "
              f"{os.cpu_count()} CPUs, repeats {args.repeats}; random weights (speed does not depend on them)")
        for backbone in args.backbones:
            rates: dict[str, list[float]] = {p: [] for p in PHASES}
            rss: dict[str, float] = {}
            for _ in range(args.repeats):
                for p in PHASES:
                    r = run_phase(p, root, backbone, args.batch_size, args.workers)
                    rates[p].append(r["n"] / r["seconds"])
                    rss[p] = max(rss.get(p, 0.0), r["peak_rss_mib"])
            med = {p: statistics.median(v) for p, v in rates.items()}
            print(f"\n{backbone}: images/s, median of {args.repeats} (all runs)")
            for p in PHASES:
                print(f"  {p:<9} {med[p]:7.1f}   ({', '.join(f'{v:.1f}' for v in rates[p])})   "
                      f"peak RSS {rss[p]:.0f} MiB")
            for num, den, unit in (("pipeline", "ceiling", ""), ("pipeline", "keras", "x"), ("ceiling", "keras", "x")):
                per_round = [a / b for a, b in zip(rates[num], rates[den])]
                print(f"  {num + ' / ' + den:<19} = {med[num] / med[den]:.2f}{unit}   (per round: "
                      f"{', '.join(f'{r:.2f}' for r in per_round)}; median {statistics.median(per_round):.2f}{unit})")


if __name__ == "__main__":
    main()
