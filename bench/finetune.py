"""Fine-tuned MobileNetV2 vs the best frozen head, on hymenoptera with the shared ImageNet weights.

1. **Frozen heads** -- ``extract`` (MobileNetV2 224, crop) then ``fit`` with every registered head, by the
   project's protocol: hymenoptera has ``train/`` and ``val/`` folders, so hyperparameters are chosen on ``val`` and
   the best head is the one with the highest ``val`` accuracy.
2. **Fine-tuned** -- :func:`pipeline.finetune.finetune` from the run's better head of the two it can start from
   (dense or logistic regression, by ``val`` accuracy; or ``--start``),
   default settings (top layers per :data:`pipeline.finetune.UNFREEZE_FROM`, batch norms frozen, Adam 1e-5,
   flip/rotation/zoom, at most 10 epochs, patience 3), training on ``train/``, the epoch kept chosen on ``val``,
   once per seed (the seed moves shuffling, augmentation and dropout).

Both numbers are ``val`` accuracies of models chosen on ``val`` (hymenoptera has no test split), so both carry the
same small optimism of a choice made on the split that scores it. Wall times: extraction (model build included)
and the fit of every head for the frozen side; training and per-epoch scoring (model build excluded) for each
fine-tuning run.

Usage::

    python bench/finetune.py [--seeds 0 1 2] [--start best|logreg|dense]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "coralq_mobilenet_v2_1.0_224_no_top.weights.h5"
DATA = SHARED / "data" / "hymenoptera"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--start", choices=("best", "logreg", "dense"), default="best",
                    help="head fine-tuning starts from (best: the better of dense and logreg on val)")
    ap.add_argument("--epochs", type=int, default=None, help="most epochs (default: FinetuneConfig's)")
    args = ap.parse_args()
    if not WEIGHTS.exists() or not DATA.exists():
        raise SystemExit("needs ../shared (weights and hymenoptera) beside the repository")

    from pipeline.backbones import build_feature_model
    from pipeline.data import discover
    from pipeline.extract import extract_dataset, resolve_config
    from pipeline.finetune import FinetuneConfig, FinetuneData, finetune, load_head
    from pipeline.fit import run_fit

    quiet = lambda m: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = extract_dataset(DATA, resolve_config(log=quiet, backbone="mobilenet_v2", weights=str(WEIGHTS),
                                                   cache_dir=Path(tmp) / "cache"), log=quiet)
        extract_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run = run_fit(caches=[res.path], heads=["all"], seed=0, out=Path(tmp) / "run", report=False, log=quiet)
        fit_s = time.perf_counter() - t0
        results = run.results["results"]
        sel = {r["key"]: r["metrics"]["val"]["accuracy"] for r in results}
        best = max(results, key=lambda r: r["metrics"]["val"]["accuracy"])
        print(f"# bench/finetune.py, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores")
        print(f"frozen heads (MobileNetV2 224, crop): extract {extract_s:.1f} s, fit of {len(results)} heads "
              f"{fit_s:.1f} s")
        for key, acc in sorted(sel.items(), key=lambda kv: -kv[1]):
            r = next(x for x in results if x["key"] == key)
            print(f"  {r['head']:<11} val acc {acc:.4f}  (fit {r['fit_seconds']:.2f} s)")
        best_acc = float(best["metrics"]["val"]["accuracy"])
        print(f"best frozen head: {best['head']} val acc {best_acc:.4f}; extract + fit {extract_s + fit_s:.1f} s")

        startable = [r for r in results if r["head"] in (("dense", "logreg") if args.start == "best" else
                                                         (args.start,))]
        start = max(startable, key=lambda r: r["metrics"]["val"]["accuracy"])  # dense first on a tie
        ds = discover(DATA)
        failed = {f["path"] for f in run.results["dataset"]["failed"]}  # images that did not decode
        items = [(it.relpath, it.label) for it in ds.items if it.relpath not in failed]
        split_of = {it.relpath: it.split for it in ds.items}
        data = FinetuneData(ds.root, list(ds.classes), [x for x in items if split_of[x[0]] == "train"],
                            [x for x in items if split_of[x[0]] == "val"], "crop")
        rows = []
        for seed in args.seeds:
            built = build_feature_model("mobilenet_v2", str(WEIGHTS), 224, 1.0, announce=quiet)
            head = load_head(Path(tmp) / "run" / start["model_file"])
            cfg = FinetuneConfig(seed=seed, progress=False,
                                 **({"epochs": args.epochs} if args.epochs else {}))
            ft = finetune(built, head, data, cfg, log=lambda m: print("   ", m, flush=True))
            rows.append(ft)
            print(f"fine-tuned seed {seed}: val acc {ft.select_accuracy:.4f} (start {ft.select_accuracy_start:.4f}), "
                  f"best epoch {ft.best_epoch} of {ft.epochs_run}, {ft.seconds:.1f} s "
                  f"({ft.seconds / max(1, ft.epochs_run):.1f} s per epoch incl. scoring)", flush=True)

    accs = [r.select_accuracy for r in rows]
    secs = [r.seconds for r in rows]
    print()
    print("| model | val accuracy | wall time |")
    print("|---|---|---|")
    print(f"| best frozen head ({best['head']}) | {best_acc:.4f} | {extract_s + fit_s:.0f} s (extract + fit of "
          f"{len(results)} heads) |")
    spread = f" (min {min(accs):.4f}, max {max(accs):.4f}, {len(accs)} seeds)" if len(accs) > 1 else ""
    print(f"| fine-tuned MobileNetV2 from {start['head']}, top {rows[0].unfreeze} layers | median "
          f"{statistics.median(accs):.4f}{spread} | median {statistics.median(secs):.0f} s per run, after the "
          f"frozen head |")
    print(f"fine-tuned minus best frozen head: {statistics.median(accs) - best_acc:+.4f} (median over seeds)")


if __name__ == "__main__":
    main()
