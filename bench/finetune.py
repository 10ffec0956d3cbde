"""Fine-tuned MobileNetV2 vs the best frozen head, on hymenoptera with the shared ImageNet weights.

1. **Frozen heads** -- ``extract`` (MobileNetV2 224, crop) then ``fit`` with every registered head, by the
   project's protocol: hymenoptera has ``train/`` and ``val/`` folders, so hyperparameters are chosen on ``val`` and
   the best head is the one with the highest ``val`` accuracy.
2. **Fine-tuned** -- ``python cli.py finetune RUN`` (:func:`pipeline.finetune.finetune_run`) from the run's
   better head of the two it can start from (dense or logistic regression, by ``val`` accuracy; or ``--start``),
   default settings (top layers per :data:`pipeline.finetune.UNFREEZE_FROM`, batch norms frozen, Adam 1e-5,
   flip/rotation/zoom, at most 10 epochs, patience 3), training on ``train/``, the epoch kept chosen on ``val`` (the
   run's selection split), once per seed (the seed moves shuffling, augmentation and dropout; each seed's command replaces the
   previous seed's entry in the run, so its numbers are printed as it finishes).

Both numbers are ``val`` accuracies of models chosen on ``val`` (hymenoptera has no test split), so both carry the
same small optimism of a choice made on the split that scores it. Wall times: extraction (model build included)
and the fit of every head for the frozen side; for each fine-tuning run the whole command (its ``fit_seconds``:
model build, training with per-epoch scoring, final predictions) and the training part alone.

Usage::

    python bench/finetune.py [--seeds 0 1 2] [--start best|logreg|dense]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import _start  # bench/_start.py: the repo on sys.path, TensorFlow's native chatter off

REPO = _start.start(__name__)
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

    from pipeline.extract import extract_dataset, resolve_config
    from pipeline.finetune import FinetuneConfig
    from pipeline.finetune import finetune_run
    from pipeline.fit import FitConfig, run_fit

    quiet = lambda m: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = extract_dataset(DATA, resolve_config(log=quiet, backbone="mobilenet_v2", weights=str(WEIGHTS),
                                                   cache_dir=Path(tmp) / "cache"), log=quiet)
        extract_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run = run_fit(FitConfig(caches=[res.path], heads=["all"], seed=0, out=Path(tmp) / "run"), log=quiet)
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

        rows = []
        for seed in args.seeds:
            cfg = FinetuneConfig(progress=False, **({"epochs": args.epochs} if args.epochs else {}))
            done = finetune_run(run.run_dir, head=None if args.start == "best" else args.start, config=cfg,
                                seed=seed, command="bench/finetune.py",
                                log=lambda m: print("   ", m, flush=True))
            e = done.entry
            rows.append(e)
            start_acc = e["search"][0]["mean"]
            print(f"fine-tuned seed {seed} from {e['params']['start']}: val acc {e['metrics']['val']['accuracy']:.4f} "
                  f"(start {start_acc:.4f}), best epoch {e['params']['best_epoch']} of {e['params']['epochs_run']}, "
                  f"{e['fit_seconds']:.1f} s in all, training {e['cost']['train_seconds']:.1f} s "
                  f"({e['cost']['train_seconds'] / max(1, e['params']['epochs_run']):.1f} s per epoch incl. scoring)",
                  flush=True)

    accs = [float(e["metrics"]["val"]["accuracy"]) for e in rows]
    secs = [float(e["fit_seconds"]) for e in rows]
    print()
    print("| model | val accuracy | wall time |")
    print("|---|---|---|")
    print(f"| best frozen head ({best['head']}) | {best_acc:.4f} | {extract_s + fit_s:.0f} s (extract + fit of "
          f"{len(results)} heads) |")
    spread = f" (min {min(accs):.4f}, max {max(accs):.4f}, {len(accs)} seeds)" if len(accs) > 1 else ""
    print(f"| fine-tuned MobileNetV2 from {rows[0]['params']['start'].rsplit('__', 1)[-1]}, top "
          f"{rows[0]['params']['unfreeze']} layers | median {statistics.median(accs):.4f}{spread} | median "
          f"{statistics.median(secs):.0f} s per `finetune` (min {min(secs):.0f}, max {max(secs):.0f}), after the "
          f"frozen heads |")
    print(f"fine-tuned minus best frozen head: {statistics.median(accs) - best_acc:+.4f} (median over seeds)")


if __name__ == "__main__":
    main()
