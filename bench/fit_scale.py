"""Fit at scale: every head on 50,000 and 1,000,000 cached rows, with time, accuracy and peak memory per head.

Synthetic caches are made from **real** features with the project's own cache writer (``cache.PartWriter`` +
``cache.assemble``, the same path ``extract`` takes), so ``fit`` reads them exactly as it reads any cache.

Recipe (``make_rows``): the source is a MobileNetV2 extract of ``../shared/data/flowers5`` with the shared ImageNet
weights (4,317 photos, 5 classes, 1,280 features; made here unless ``--source`` names a cache of it). Its images
are split 70/30 into source-train and source-test images (seeded). Classes 5-9 are copies of classes 0-4 whose 1,280
features are permuted by one fixed seeded permutation, which gives 10 classes with the marginal statistics of real
pooled features. Each synthetic row of class c and split s is ``max(lam * a + (1 - lam) * b, 0) *
exp(0.2 * N(0, 1))`` per feature, with ``a, b`` two random source rows of class ``c mod 5`` from the same source
split (``lam`` uniform in [0, 1]), then permuted for classes 5-9: a within-class mix with multiplicative noise, so
no two rows are copies. Rows are written with split folders (70 % ``train``, 30 % ``test``, each drawing only from
its own source images), so no test row is a near-copy of a training row. The protocol is then 3-fold
cross-validation on ``train`` (on the search subsample) and one evaluation on ``test``.

What is run, each ``fit`` in a fresh process whose peak RSS is the kernel's high-water mark of that process
(``VmHWM`` of ``/proc/self/status``, read by the child as it ends; each log line of the child shows it so far).
Not ``ru_maxrss``: Linux keeps a process's ``ru_maxrss`` across ``execve``, so a child started by this script
would report this script's own peak (writing a million-row cache) whenever that is the larger:

* ``--rows 50000``: ``fit --head all`` (the default cost plan); then the batch forms the plan does not use at this
  size, forced (the mini-batch logistic regression, and the dense head streamed: ``--memory-budget 320MB`` streams
  the 256 MB of features); with ``--exact``, the **exact** forms of the heads the plan approximated, in one more
  run with the same search subsample. Each approximation's test accuracy is printed next to its exact form's, on
  the same test rows, with the paired standard error of the difference.
* ``--rows 1000000``: ``fit --head logreg --head linear_svm --head dense --memory-budget 1GB`` (the 5.1 GB of
  features are streamed).

Usage::

    python bench/fit_scale.py --rows 50000 [--exact]       # ~5-30 min on 2 cores (the exact forms are slow)
    python bench/fit_scale.py --rows 1000000               # needs ~11 GB free disk in --tmp while it runs

Each cache is written to a temporary folder under ``--tmp`` (default the system's) and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _start  # bench/_start.py: the repo on sys.path, TensorFlow's native chatter off

REPO = _start.start(__name__)
WEIGHTS = REPO.parent / "shared" / "weights" / "coralq_mobilenet_v2_1.0_224_no_top.weights.h5"
DATA = REPO.parent / "shared" / "data" / "flowers5"


# ---- the synthetic cache -------------------------------------------------------------------------------------------


def write_cache(path: Path, X: np.ndarray, labels: np.ndarray, splits: np.ndarray, class_names: list[str],
                meta: dict, kind: str = "avg", flush_rows: int = 8192, block: int = 65536) -> Path:
    """Write rows as a complete cache with the project's writer (parts, then one atomic assembly).

    ``X`` may be a callable ``X(start, stop) -> rows`` so that a million rows never sit in memory at once.
    """
    from pipeline import cache

    n = len(labels)
    meta = dict(meta, class_names=list(class_names), dataset_name=meta["dataset_name"])
    first = X(0, 1) if callable(X) else X[:1]
    shapes = {kind: tuple(first.shape[1:])}
    writer = cache.PartWriter(path, meta, shapes, flush_rows=flush_rows, flush_seconds=1e9,
                              run_info={"engine": "synthetic", "note": "bench/fit_scale.py"})
    order = []
    for start in range(0, n, block):
        rows = X(start, min(n, start + block)) if callable(X) else X[start:start + block]
        for j, x in enumerate(rows):
            i = start + j
            rel = f"{splits[i]}/{class_names[labels[i]]}/{i:07d}.jpg"
            writer.add({"path": rel, "label": int(labels[i]), "split": str(splits[i]), "size": 1, "mtime_ns": 0,
                        "sha256": f"{i:064x}", "ok": True, "error": ""}, {kind: x})
            order.append((rel, int(labels[i]), str(splits[i])))
            writer.maybe_flush()
    writer.flush()
    existing = cache.scan_existing(path, meta)
    cache.assemble(path, meta, order, existing, shapes)
    return path


def synthetic_meta(base: dict, name: str, root: str) -> dict:
    """A cache's attributes for a synthetic dataset: the source cache's, with another dataset identity."""
    from pipeline import cache

    keep = ("backbone", "backbone_label", "alpha", "input_size", "resize", "preprocess", "preprocess_mode",
            "weights_source", "weights_sha256", "weights_path", "pixel_rule", "feature_kinds", "maps_dtype", "views",
            "versions")
    meta = {k: base[k] for k in keep if k in base}
    meta.update(format=cache.FORMAT_NAME, schema_version=cache.SCHEMA_VERSION, dataset_name=name, dataset_root=root,
                dataset_id=cache.dataset_id(root), has_splits=True, command="bench/fit_scale.py (synthetic)",
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), extract_seconds=0.0)
    meta.setdefault("views", {"n": 0})
    return meta


class Recipe:
    """The tiling recipe of the module docstring, as a deterministic row generator."""

    def __init__(self, X0: np.ndarray, y0: np.ndarray, n: int, seed: int = 0, n_classes: int = 10,
                 test_fraction: float = 0.3) -> None:
        rng = np.random.default_rng(seed)
        self.X0, self.y0, self.n, self.seed = X0, y0, n, seed
        self.k0 = int(y0.max()) + 1
        self.perm = rng.permutation(X0.shape[1])
        src_test = rng.random(len(y0)) < test_fraction
        self.labels = rng.integers(0, n_classes, n)
        self.splits = np.where(rng.random(n) < test_fraction, "test", "train")
        self.pools = {(c, s): np.flatnonzero((y0 == c) & (src_test == (s == "test")))
                      for c in range(self.k0) for s in ("train", "test")}

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (the same rows for the same seed, whatever the blocks asked for)."""
        rng = np.random.default_rng([self.seed, start])
        y, s = self.labels[start:stop], self.splits[start:stop]
        out = np.empty((stop - start, self.X0.shape[1]), np.float32)
        for (c, split), pool in self.pools.items():
            for shifted in (False, True):
                idx = np.flatnonzero((y % self.k0 == c) & (s == split) & ((y >= self.k0) == shifted))
                if not len(idx):
                    continue
                a, b = self.X0[rng.choice(pool, len(idx))], self.X0[rng.choice(pool, len(idx))]
                lam = rng.random((len(idx), 1)).astype(np.float32)
                x = np.maximum(lam * a + (1 - lam) * b, 0)
                x *= np.exp(0.2 * rng.standard_normal(x.shape)).astype(np.float32)
                out[idx] = x[:, self.perm] if shifted else x
        return out


def source_features(source: Path | None, tmp: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """The real features the synthetic rows are made from (extracting flowers5 when no cache is given)."""
    from pipeline.cache import read_features

    if source is None:
        if not WEIGHTS.exists() or not DATA.exists():
            raise SystemExit("needs ../shared (MobileNetV2 weights and flowers5) beside the repository, or --source")
        from pipeline.extract import extract_dataset, resolve_config

        cfg = resolve_config(backbone="mobilenet_v2", weights=str(WEIGHTS), cache_dir=tmp / "src", log=print)
        source = extract_dataset(DATA, cfg, log=print).path
    fs = read_features(source)
    return fs.features, fs.labels, fs.meta


# ---- one fit in a child process ------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` (Linux), else ``ru_maxrss``.

    ``VmHWM`` belongs to the process's own address space, which ``execve`` replaces; ``ru_maxrss`` survives
    ``execve`` on Linux, so in a child it is at least the parent's peak at the time the child was started.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


def run_fit_child(cache_dir: Path, out: Path, heads: list[str], budget: str | None = None,
                  policy: dict | None = None, tag: str = "", seed: int = 0) -> dict:
    """``fit`` in a fresh process; returns its results, wall time and peak RSS (MB)."""
    args = {"cache_dir": str(cache_dir), "out": str(out), "heads": heads, "budget": budget, "policy": policy or {},
            "seed": seed}
    code = ("import json, sys; sys.path.insert(0, %r); import _start; _start.start(); a = json.loads(sys.argv[1]);"
            "import importlib.util as u; s = u.spec_from_file_location('fit_scale_bench', %r);"
            "b = u.module_from_spec(s); s.loader.exec_module(b); peak_rss_mib = b.peak_rss_mib;"
            "from pipeline.fit import FitConfig, run_fit; from pipeline.fit.plan import CostPolicy;"
            "p = CostPolicy(**a['policy']) if a['policy'] else None;"
            "run_fit(FitConfig(a['cache_dir'], heads=a['heads'], out=a['out'], memory_budget=a['budget'],"
            " seed=a['seed'], policy=p, command='bench/fit_scale.py'),"
            " log=lambda m: print(f'[peak {peak_rss_mib():5.0f} MiB] {m}', flush=True));"
            "print('PEAK_RSS_MIB', peak_rss_mib())") % (str(REPO / "bench"), str(Path(__file__).resolve()))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_mb = float("nan")
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_RSS_MIB"):
            peak_mb = float(line.split()[1])
        else:
            print(f"  {tag}| {line}")
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        raise SystemExit(f"fit failed ({tag})")
    doc = json.loads((out / "results.json").read_text())
    return {"doc": doc, "wall": wall, "peak_mb": peak_mb}


def _acc(r: dict) -> float:
    return r["metrics"]["test"]["accuracy"]


def table(doc: dict, wall: float, peak_mb: float, title: str) -> None:
    print(f"\n{title}: fit wall {wall:.1f} s, peak RSS of the fit process {peak_mb:.0f} MiB")
    print(f"{'head':<11} {'form':<14} {'data':<9} {'search':>13} {'search s':>9} {'fit s':>8} {'pred ms/1k':>10} "
          f"{'test acc':>9}")
    for r in doc["results"]:
        c = r.get("cost") or {}
        srch = f"{c.get('search_rows', 0):,}/{c.get('train_rows', 0):,}"
        print(f"{r['head']:<11} {c.get('form', ''):<14} {c.get('data', ''):<9} {srch:>13} "
              f"{r.get('search_seconds', 0):>9.1f} {r['fit_seconds']:>8.1f} {r['predict_ms_per_1000']:>10.1f} "
              f"{_acc(r):>9.4f}")
    for s in doc.get("skipped", []):
        print(f"{s['head']:<11} skipped: {s['reason']}")


def paired(a: dict, b: dict, run_a: Path, run_b: Path) -> str:
    """Accuracy difference of two heads on the same test rows, with its paired standard error."""
    import csv

    def correct(run: Path, res: dict) -> dict[str, bool]:
        with open(run / res["predictions_file"]) as f:
            return {r["path"]: r["true"] == r["pred"] for r in csv.DictReader(f)}

    ca, cb = correct(run_a, a), correct(run_b, b)
    d = np.array([float(ca[p]) - float(cb[p]) for p in ca])
    return f"{d.mean() * 100:+.2f} points (paired s.e. {d.std(ddof=1) / np.sqrt(len(d)) * 100:.2f}, n={len(d)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--source", type=Path, help="a MobileNetV2 cache of flowers5 (default: extract it)")
    ap.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--exact", action="store_true", help="also run the exact forms the plan replaces (50k: slow)")
    ap.add_argument("--budget", default=None, help="--memory-budget of the main fit (1M default: 1GB)")
    args = ap.parse_args()
    free = shutil.disk_usage(args.tmp).free
    need = args.rows * 1280 * 4 * 2.2
    if free < need:
        raise SystemExit(f"{args.tmp} has {free / 1e9:.1f} GB free; the cache and its parts need {need / 1e9:.1f} GB")
    load = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}")
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="fit_scale_") as tmp:
        tmp = Path(tmp)
        X0, y0, base = source_features(args.source, tmp)
        recipe = Recipe(X0, y0, args.rows)
        cache_dir = tmp / "cache"
        cache_dir.mkdir()
        t0 = time.perf_counter()
        name = f"synthetic{args.rows // 1000}k"
        meta = synthetic_meta(base, name, f"/synthetic/{name}")
        classes = [f"c{i}" for i in range(10)]
        path = write_cache(cache_dir / f"{name}.h5", recipe.rows, recipe.labels, recipe.splits, classes, meta)
        print(f"wrote {path.name}: {args.rows:,} rows x 1,280 ({path.stat().st_size / 1e9:.2f} GB) in "
              f"{time.perf_counter() - t0:.0f} s; train {int((recipe.splits == 'train').sum()):,}, "
              f"test {int((recipe.splits == 'test').sum()):,}; this script's peak RSS so far {peak_rss_mib():.0f} MiB "
              f"(not counted in the fits' figures)")
        if args.rows >= 200_000:
            budget = args.budget or "1GB"
            res = run_fit_child(cache_dir, tmp / "run_main", ["logreg", "linear_svm", "dense"], budget, tag="1M")
            table(res["doc"], res["wall"], res["peak_mb"], f"{args.rows:,} rows, --memory-budget {budget}")
            return
        main_run = run_fit_child(cache_dir, tmp / "run_all", ["all"], args.budget, tag="all")
        table(main_run["doc"], main_run["wall"], main_run["peak_mb"], f"{args.rows:,} rows, fit --head all")
        results = {r["head"]: r for r in main_run["doc"]["results"]}
        # Each approximation against its exact form on the same test rows. Exact forms the plan replaced need their
        # own (slow) runs; approximations the plan did not use at this size are forced.
        from pipeline.fit.heads import HEADS

        # 320 MB: less than 3 x the 256 MB of features (so they are streamed), enough for the same 10,000 search rows
        approx = run_fit_child(cache_dir, tmp / "run_forced", ["logreg", "dense"], "320MB",
                               policy={"exact_max_rows": {"logreg": 0}}, tag="forced")
        table(approx["doc"], approx["wall"], approx["peak_mb"], "batch forms forced at this size (logreg "
              "mini-batch; features streamed with --memory-budget 320MB)")
        print("\naccuracy of each approximation minus its exact form (same test rows):")
        for r in approx["doc"]["results"]:
            print(f"  {r['head']:<11} {r['cost']['form']:<14} vs exact: "
                  f"{paired(r, results[r['head']], tmp / 'run_forced', tmp / 'run_all')}")
        # The streamed dense head is the same network fed in another row order: compare with the exact head's own
        # spread over seeds (row order, initial weights, dropout and held-out rows all change with the seed).
        for seed in (1, 2):
            other = run_fit_child(cache_dir, tmp / f"run_dense_seed{seed}", ["dense"], None, tag=f"seed{seed}",
                                  seed=seed)
            r = other["doc"]["results"][0]
            print(f"  dense       exact, seed {seed}  vs exact, seed 0: "
                  f"{paired(r, results['dense'], tmp / f'run_dense_seed{seed}', tmp / 'run_all')}")
        if args.exact:
            replaced = [h for h, r in results.items() if r["cost"]["approximation"]]
            exact = run_fit_child(cache_dir, tmp / "run_exact", replaced, None,
                                  policy={"exact_max_rows": {h: None for h in HEADS}}, tag="exact")
            table(exact["doc"], exact["wall"], exact["peak_mb"], "exact forms of the approximated heads")
            for r in exact["doc"]["results"]:
                print(f"  {r['head']:<11} {results[r['head']]['cost']['form']:<14} vs exact: "
                      f"{paired(results[r['head']], r, tmp / 'run_all', tmp / 'run_exact')}")


if __name__ == "__main__":
    main()
