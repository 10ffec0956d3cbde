"""The dense head on small training sets: early stopping on a 10 % held-out part against cross-validated epochs.

For each dataset (default hymenoptera and flowers5, MobileNetV2 features of the shared ImageNet weights, extracted
once with the project's own ``extract``) and each training size ``n`` (60, 150, 400): draw ``--resplits`` seeded,
stratified user-sized training sets (the draw of ``bench/pick.py``); fit

* **holdout** -- the dense head as it stopped before: early stopping on 10 % of the training rows, whatever their
  number (6 rows of 60), best epoch's weights kept (``validation_min_rows=1``);
* **cv epochs** -- the dense head as it is now (``validation_min_rows=50``): below 50 held-out rows, the epochs are
  the median best epoch of early stopping on 3 stratified folds, then every training row is trained on;
* **logreg** -- logistic regression by the project's protocol (C by 5-fold CV), as the yardstick;

and score each on the **truth**, every image of the dataset outside the training set. Prints per size the mean truth
accuracy of each, the mean paired difference (cv epochs - holdout, same training sets and images) with its 95 %
t interval over the resplits, and the epochs each rule kept. The dense heads use the registry's settings (256
units, dropout 0.5, Adam 1e-3, batch 64, patience 5, at most 100 epochs). Numbers from one run; accuracies do not
depend on the machine.

Usage::

    python bench/dense_small.py [--resplits 10] [--sizes 60 150 400] [--datasets hymenoptera flowers5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _start  # bench/_start.py: the repo on sys.path, TensorFlow's native chatter off

REPO = _start.start(__name__)


def fit_all(X, labels, class_names, splits, seed: int) -> dict:
    """Truth accuracy and kept epochs of the three heads on one resplit."""
    import numpy as np

    from pipeline.fit.evaluate import evaluate_head
    from pipeline.fit.heads import HEADS, DenseHead
    from pipeline.fit.protocol import Protocol, selection_folds

    train, truth = splits == "train", splits == "truth"
    out = {}
    for name, floor in (("holdout", 1), ("cv epochs", 50)):
        head = DenseHead(random_state=seed, validation_min_rows=floor).fit(X[train], labels[train])
        out[name] = {"acc": float(np.mean(head.predict(X[truth]) == labels[truth])), "epochs": head.best_epoch_,
                     "rule": head.early_stopping_["rule"], "rows": head.early_stopping_["rows"]}
    protocol = Protocol("cv", 5, ["truth"], "bench", "bench resplit", "bench")
    folds = selection_folds(protocol, splits, labels, seed)
    res = evaluate_head(HEADS["logreg"], X, labels, splits, class_names, [str(i) for i in range(len(labels))],
                        protocol, folds, seed=seed)
    right = np.argmax(res.proba, axis=1) == labels[res.final_rows]
    out["logreg"] = {"acc": float(right.mean())}
    return out


def summarise(runs: list[dict]) -> dict:
    """Means, the paired difference with its 95 % t interval, and the epochs kept."""
    import numpy as np
    from scipy import stats

    acc = {k: np.array([r[k]["acc"] for r in runs]) for k in ("holdout", "cv epochs", "logreg")}
    d = acc["cv epochs"] - acc["holdout"]
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": {k: float(v.mean()) for k, v in acc.items()}, "delta": float(d.mean()),
            "delta_interval": [float(d.mean() - half), float(d.mean() + half)],
            "epochs": {k: float(np.median([r[k]["epochs"] for r in runs])) for k in ("holdout", "cv epochs")},
            "holdout_rows": float(np.median([r["holdout"]["rows"] for r in runs])),
            "rules": sorted({r["cv epochs"]["rule"] for r in runs})}


def main() -> None:
    from pick import draw, features

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resplits", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[60, 150, 400])
    ap.add_argument("--datasets", nargs="+", default=["hymenoptera", "flowers5"])
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="dense-small-"))
    for name in args.datasets:
        X, labels, class_names = features(name, cache_dir)
        print(f"\n{name}: {len(labels)} images, {len(class_names)} classes; truth = every image outside the "
              f"training set; {args.resplits} resplits per size")
        print(f"{'n train':>8} {'holdout':>8} {'cv epochs':>10} {'logreg':>7} {'cv - holdout [95 % CI]':>26} "
              f"{'epochs kept (holdout / cv)':>27} {'held-out rows':>13}")
        for n in args.sizes:
            if n >= len(labels) * 0.8:
                continue
            runs = [fit_all(X, labels, class_names, draw(labels, n, seed), seed) for seed in range(args.resplits)]
            s = summarise(runs)
            m, lo, hi = s["mean"], *s["delta_interval"]
            print(f"{n:>8} {m['holdout']:>8.3f} {m['cv epochs']:>10.3f} {m['logreg']:>7.3f} "
                  f"{s['delta']:>+10.3f} [{lo:+.3f}, {hi:+.3f}] {s['epochs']['holdout']:>13.0f} / "
                  f"{s['epochs']['cv epochs']:<11.0f} {s['holdout_rows']:>13.0f}  ({', '.join(s['rules'])})")


if __name__ == "__main__":
    main()
