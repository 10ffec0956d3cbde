"""What the cache's integrity checks cost on read: Fletcher-32 per chunk and the rows' SHA-256.

Writes one pooled cache of ``--rows`` x ``--dim`` float32 features with the project's own writer (part files +
assembly, so the file is exactly what ``extract`` writes), and a copy of its feature matrix in a plain HDF5 dataset
without checksums (the schema-1 layout). Then, alternating over ``--repeats`` rounds (the file is in the page cache
after the first read, as it is when ``fit`` reads a cache it just wrote or reads often):

* ``plain``    -- h5py reads the unchecked copy of the features;
* ``checked``  -- h5py reads ``features/avg`` of the cache (HDF5 verifies every chunk's Fletcher-32);
* ``reader``   -- ``cache.read_features``: everything a fit does on open (attributes, rows and their SHA-256, the
  checked features, the finiteness check).

Prints medians, per-round ratios and GB/s.

Usage::

    python bench/cache_integrity.py [--rows 50000] [--dim 1280] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import _start  # bench/_start.py: the repo on sys.path, TensorFlow's native chatter off

REPO = _start.start(__name__)


def build(tmp: Path, rows: int, dim: int) -> tuple[Path, Path]:
    import h5py

    from pipeline import cache

    rng = np.random.default_rng(0)
    X = rng.random((rows, dim), dtype=np.float32)
    path = tmp / "bench-00000000__synthetic-1__crop__random.h5"
    meta = {"format": cache.FORMAT_NAME, "schema_version": cache.SCHEMA_VERSION, "dataset_name": "bench",
            "dataset_root": str(tmp), "class_names": ["a", "b"], "backbone": "mobilenet_v2",
            "preprocess": "keras.applications.mobilenet_v2.preprocess_input", "preprocess_mode": "tf",
            "feature_kinds": ["avg"], "maps_dtype": "", "views": {"n": 0}, "backbone_label": "synthetic-1",
            "alpha": None, "input_size": 1, "resize": "crop", "weights_source": "none", "weights_sha256": "",
            "pixel_rule": "synthetic"}
    writer = cache.PartWriter(path, meta, {"avg": (dim,)}, flush_rows=8192, flush_seconds=1e9)
    for i in range(rows):
        writer.add({"path": f"x/{i:07d}.jpg", "label": i % 2, "split": "", "size": 1, "mtime_ns": 1,
                    "sha256": "0" * 64, "ok": True, "error": ""}, {"avg": X[i]})
        writer.maybe_flush()
    writer.flush()
    existing = cache.scan_existing(path, meta)
    cache.assemble(path, meta, [(f"x/{i:07d}.jpg", i % 2, "") for i in range(rows)], existing, {"avg": (dim,)})
    plain = tmp / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_dataset("avg", data=X)
    return path, plain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import h5py

    from pipeline import cache

    with tempfile.TemporaryDirectory() as tmp:
        path, plain = build(Path(tmp), args.rows, args.dim)
        gb = args.rows * args.dim * 4 / 1e9
        phases = {
            "plain": lambda: h5py.File(plain, "r")["avg"][()],
            "checked": lambda: h5py.File(path, "r")["features/avg"][()],
            "reader": lambda: cache.read_features(path).features,
        }
        for fn in phases.values():  # warm the page cache
            fn()
        times: dict[str, list[float]] = {k: [] for k in phases}
        for _ in range(args.repeats):
            for name, fn in phases.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{args.rows} x {args.dim} float32 ({gb:.2f} GB), warm page cache, median of {args.repeats} rounds")
        for name in phases:
            print(f"  {name:<8} {med[name]:.3f} s  ({gb / med[name]:.2f} GB/s)   all: "
                  f"{', '.join(f'{t:.3f}' for t in times[name])}")
        for name in ("checked", "reader"):
            per = [a / b for a, b in zip(times[name], times["plain"])]
            print(f"  {name} / plain = {med[name] / med['plain']:.2f}x   (per round: "
                  f"{', '.join(f'{r:.2f}' for r in per)})")


if __name__ == "__main__":
    main()
