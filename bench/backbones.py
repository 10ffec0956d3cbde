"""Cost of every registered backbone on this machine: ONNX export, img/s per runtime, CPU ms/image, peak RSS.

For each backbone (at its own input size, random weights: speed does not depend on them) two fresh subprocesses
run, one per runtime, so that each has its own thread set-up and peak RSS:

* ``onnx``  -- the model is built, exported to ONNX into a temporary store (the export time is printed), and the
  ONNX Runtime session (``make_runtime(..., "onnx")``, its parity check against Keras on the first batch included)
  runs over ``--images`` random pixel images already in memory;
* ``keras`` -- the Keras runtime (batch norms folded, compiled ``tf.function``) over the same pixels.

The first batch (tracing, the parity check, allocations) is not timed. Printed per backbone: export seconds,
img/s with each runtime, CPU ms per image (all threads; less sensitive to a shared machine's other load than img/s),
peak RSS of each process, the pooled dimension, the ONNX parity (``max|onnx - keras| / max|keras|``) and the ratio
of the CPU time per image to MobileNetV2's, measured in the same run (``mobilenet_v2`` always runs first). That ratio
is the ``cost`` column of ``python cli.py backbones`` (recorded in docs/benchmarks.md).

Usage::

    python bench/backbones.py [--images 32] [--batch-size 8] [--only convnext_tiny xception] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _start  # bench/_start.py: the repo on sys.path, TensorFlow's native chatter off

REPO = _start.start(__name__)

from extract import _cpu, load, peak_rss_mib  # noqa: E402  (bench/extract.py's helpers)

REFERENCE = "mobilenet_v2"


def phase(backbone: str, runtime: str, images: int, batch: int) -> dict:
    """One backbone on one runtime, in this (fresh) process."""
    import numpy as np

    from pipeline.extract import resolve_config
    from pipeline.runtime.factory import make_runtime
    from pipeline.backbones import build_features
    from pipeline.runtime.onnx_export import ensure_exported

    cfg = resolve_config(backbone=backbone, weights="none", batch_size=batch, log=lambda m: None)
    t = time.perf_counter()
    built = build_features(cfg.model)
    res: dict = {"build_s": time.perf_counter() - t, "input_size": cfg.model.input_size,
                 "feature_dim": built.feature_dim}
    if runtime == "onnx":
        t = time.perf_counter()
        ensure_exported(cfg.model, built, log=lambda m: None)
        res["export_s"] = time.perf_counter() - t
    notes: list[str] = []
    rt = make_runtime(cfg.model, runtime, log=notes.append, built=built, batch_size=batch)
    size = cfg.model.input_size
    px = np.random.default_rng(0).integers(0, 256, (images, size, size, 3), dtype=np.uint8)
    rt(px[:batch])  # tracing / the parity check / the session's allocations
    t, c = time.perf_counter(), _cpu()
    for i in range(0, images, batch):
        rt(px[i:i + batch])
    res.update(seconds=time.perf_counter() - t, cpu=_cpu() - c, n=images, runtime=rt.describe().get("runtime", ""),
               parity=rt.describe().get("parity", ""), notes=notes)
    return res


def run_phase(backbone: str, runtime: str, images: int, batch: int, home: Path) -> dict:
    """Run :func:`phase` in a fresh interpreter; returns its figures and peak RSS (MiB)."""
    cmd = [sys.executable, __file__, "--phase", runtime, "--only", backbone, "--images", str(images),
           "--batch-size", str(batch)]
    env = {**os.environ, "HEADBENCH_HOME": str(home)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=32, help="timed images per runtime (after one untimed batch)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--only", nargs="+", default=None, help="these backbones (mobilenet_v2 is always added first)")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    ap.add_argument("--phase", choices=["onnx", "keras"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:
        res = phase(args.only[0], args.phase, args.images, args.batch_size)
        res["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(res))
        return

    from pipeline.backbones import get_spec, list_backbones

    names = [get_spec(n).name for n in (args.only or list_backbones())]
    names = [REFERENCE] + [n for n in names if n != REFERENCE]
    print(f"{os.cpu_count()} CPUs, {args.images} images per runtime in batches of {args.batch_size} (one more batch "
          f"untimed), native input sizes, random weights; load average {load()} at {time.strftime('%Y-%m-%d %H:%M')}",
          flush=True)
    head = (f"{'backbone':<20} {'px':>4} {'dim':>5} {'export s':>8} {'onnx img/s':>10} {'keras img/s':>11} "
            f"{'onnx ms':>8} {'keras ms':>8} {'RSS onnx':>8} {'RSS keras':>9} {'parity':>8} {'x MNv2':>7}")
    print(head + "\n" + "-" * len(head), flush=True)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = {rt: run_phase(name, rt, args.images, args.batch_size, Path(tmp)) for rt in ("onnx", "keras")}
            rows[name] = row
            o, k = row["onnx"], row["keras"]
            ms = {rt: 1e3 * r["cpu"] / r["n"] for rt, r in row.items() if "cpu" in r}
            ref = rows[REFERENCE]
            ref_ms = 1e3 * ref["onnx"]["cpu"] / ref["onnx"]["n"] if "cpu" in ref["onnx"] else float("nan")
            ips = {rt: r["n"] / r["seconds"] for rt, r in row.items() if "seconds" in r}
            onnx_ms = ms.get("onnx", float("nan"))
            o_rt = o.get("runtime", "")
            line = (f"{name:<20} {o.get('input_size', k.get('input_size', 0)):>4} "
                    f"{o.get('feature_dim', k.get('feature_dim', 0)):>5} {o.get('export_s', float('nan')):>8.1f} "
                    f"{ips.get('onnx', float('nan')):>10.1f} {ips.get('keras', float('nan')):>11.1f} "
                    f"{onnx_ms:>8.1f} {ms.get('keras', float('nan')):>8.1f} "
                    f"{o.get('peak_rss_mib', float('nan')):>8.0f} {k.get('peak_rss_mib', float('nan')):>9.0f} "
                    f"{o.get('parity', '') or '-':>8} {onnx_ms / ref_ms:>7.1f}")
            if o_rt and o_rt != "onnxruntime":
                line += f"  (onnx phase ran {o_rt}: {'; '.join(o.get('notes', []))[:120]})"
            for rt, r in row.items():
                if "error" in r:
                    line += f"  [{rt} failed: {r['error']}]"
            print(line, flush=True)
    print(f"load average {load()} at {time.strftime('%Y-%m-%d %H:%M')}; x MNv2: ONNX Runtime CPU ms per image over "
          f"{REFERENCE}'s in this run")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
