"""Which pick rule to trust: regret, interval coverage and tie calls on user-sized resplits of real data.

For each dataset (default flowers5 and hymenoptera, MobileNetV2 features of the shared ImageNet weights, extracted
once with the project's own ``extract``), and each training size ``n`` (50, 100, 300, 1,000 as the folder allows):
draw ``--resplits`` seeded, stratified user-sized datasets (``n`` training images and ``3n/7`` test images, the
70/30 split ``fit`` makes); fit all six heads by the project's protocol (hyperparameters by 5-fold cross-validation
on the training images, refit on all of them: :func:`pipeline.fit.evaluate.evaluate_head`); score every refitted
head on the **truth**, the dataset's other images, which no choice touched. Then for every pick rule
(:data:`pipeline.fit.pick.PICK_RULES`):

- **regret**: truth accuracy of the best head in hindsight minus the truth accuracy of the rule's pick, in points;
- **coverage**: how often the pick's 95 % Wilson interval on the test images holds its truth accuracy;
- **tie calls** (the pick against every other head, on the test images, as ``results[].vs_pick``): how often a
  tie is called when the truth difference exceeds 2 points (a missed difference), and how often a difference is
  called when the truth difference is under 0.5 point (a false alarm);
- **headline optimism**: the pick's test accuracy minus its truth accuracy, against the old ``train`` + ``val``
  headline (the head with the highest accuracy on the split that also reports it: selection and headline on the
  same images) minus its truth accuracy.

``--headline`` also runs ``fit`` itself on the dataset's own folders (hymenoptera: ``train/`` + ``val/``) twice,
``--select-on val --pick best`` (the old protocol) and the defaults, and prints both headlines on ``val``.

Prints one table per dataset and writes ``pick.json`` in ``--out``. The numbers come from one run on a shared,
noisy machine (timings are not the point here; accuracies do not depend on the machine).

Usage::

    python bench/pick.py [--resplits 20] [--datasets flowers5 hymenoptera] [--out bench-out/pick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _start  # bench/_start.py: the repo on sys.path, TensorFlow's native chatter off

REPO = _start.start(__name__)
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "coralq_mobilenet_v2_1.0_224_no_top.weights.h5"
SIZES = (50, 100, 300, 1000)
HEADS = ("logreg", "svm", "dense", "linear_svm", "knn", "centroid")


def features(name: str, cache_dir: Path):
    """(X, labels, class names) of the dataset's MobileNetV2 cache, extracted once (incremental afterwards)."""
    import numpy as np

    from pipeline.cache import open_features
    from pipeline.extract import extract_dataset, resolve_config

    cfg = resolve_config(log=lambda m: None, cache_dir=cache_dir, backbone="mobilenet_v2", weights=str(WEIGHTS),
                         runtime="keras", quiet=True)
    res = extract_dataset(SHARED / "data" / name, cfg, log=lambda m: None)
    with open_features(res.path) as r:
        return r.read(), np.asarray(r.labels), list(r.class_names)


def draw(labels, n_train: int, seed: int):
    """A stratified user-sized dataset: split names for every row ("train", "test", "truth")."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_test = int(round(n_train * 3 / 7))
    splits = np.full(len(labels), "truth", dtype=object)
    share = np.bincount(labels) / len(labels)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        a = max(2, int(round(share[c] * n_train)))
        b = max(1, int(round(share[c] * n_test)))
        splits[rows[:a]] = "train"
        splits[rows[a:a + b]] = "test"
    return splits.astype(str)


def fit_resplit(X, labels, class_names, splits, seed: int):
    """Every head by the project's protocol; per head its results.json entry and truth / test correctness."""
    import numpy as np

    from pipeline.fit.evaluate import evaluate_head
    from pipeline.fit.heads import HEADS as REG
    from pipeline.fit.protocol import Protocol, selection_folds

    protocol = Protocol("cv", 5, ["truth", "test"], "bench", "bench resplit", "bench")
    folds = selection_folds(protocol, splits, labels, seed)
    paths = [str(i) for i in range(len(labels))]
    out = []
    for name in HEADS:
        res = evaluate_head(REG[name], X, labels, splits, class_names, paths, protocol, folds, seed=seed)
        rows = res.final_rows
        right = np.argmax(res.proba, axis=1) == labels[rows]
        entry = {"key": name, "head": name, **res.to_json()}
        out.append({"entry": entry, "truth": float(right[splits[rows] == "truth"].mean()),
                    "test_right": right[splits[rows] == "test"],
                    "test_interval": res.metrics["test"]["intervals"]["accuracy"]})
    return out


def score_rules(fitted, seed: int) -> dict:
    """Per rule: regret, coverage and the pick's tie calls for one resplit."""
    from pipeline.fit.pick import PICK_RULES, pick
    from pipeline.stats import paired_difference

    entries = [f["entry"] for f in fitted]
    best_truth = max(f["truth"] for f in fitted)
    tests = [float(f["test_right"].mean()) for f in fitted]
    old = int(max(range(len(fitted)), key=lambda j: tests[j]))
    out = {"old_headline": {"head": entries[old]["head"], "optimism": 100 * (tests[old] - fitted[old]["truth"])}}
    for rule in PICK_RULES:
        i = pick(entries, rule).index
        f = fitted[i]
        lo, hi = f["test_interval"]
        missed = alarms = big = small = 0
        for j, g in enumerate(fitted):
            if j == i:
                continue
            d = paired_difference(g["test_right"], f["test_right"], (seed, j))
            gap = abs(g["truth"] - f["truth"])
            if gap > 0.02:
                big += 1
                missed += d["tied"]
            elif gap < 0.005:
                small += 1
                alarms += not d["tied"]
        out[rule] = {"pick": entries[i]["head"], "regret": 100 * (best_truth - f["truth"]),
                     "optimism": 100 * (tests[i] - f["truth"]),
                     "covered": bool(lo <= f["truth"] <= hi), "big": big, "missed": missed, "small": small,
                     "alarms": alarms}
    return out


def summarise(rows: list[dict]) -> dict:
    import numpy as np

    from pipeline.fit.pick import PICK_RULES

    out = {}
    for rule in PICK_RULES:
        r = [row[rule] for row in rows]
        reg = np.array([x["regret"] for x in r])
        big, small = sum(x["big"] for x in r), sum(x["small"] for x in r)
        out[rule] = {"mean_regret": float(reg.mean()), "sd_regret": float(reg.std(ddof=1)) if len(reg) > 1 else 0.0,
                     "max_regret": float(reg.max()), "coverage": float(np.mean([x["covered"] for x in r])),
                     "mean_optimism": float(np.mean([x["optimism"] for x in r])),
                     "tie_when_gap_over_2pt": f"{sum(x['missed'] for x in r)}/{big}",
                     "difference_when_gap_under_0.5pt": f"{sum(x['alarms'] for x in r)}/{small}",
                     "picks": {h: sum(x["pick"] == h for x in r) for h in HEADS if any(x["pick"] == h for x in r)}}
    out["old_headline"] = {"mean_optimism": float(np.mean([row["old_headline"]["optimism"] for row in rows]))}
    return out


def headline(name: str, cache_dir: Path) -> dict:
    """``fit`` on the dataset's own folders with the old protocol (select on val, highest score) and the default."""
    import tempfile

    from pipeline.fit import FitConfig, run_fit

    features(name, cache_dir)  # the cache exists
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in (("old: --select-on val --pick best", {"select_on": "val", "pick": "best"}),
                          ("default", {})):
            doc = run_fit(FitConfig(cache_dir, dataset=name, out=Path(tmp) / label.split(":")[0], **kw)).results
            b = doc["best"]
            out[label] = {"pick": b["key"], "split": b["split"], "value": b["value"], "interval": b["interval"],
                          "selection": doc["protocol"]["selection"]}
            print(f"{name} {label}: pick {b['key']}, {b['split']} accuracy {b['value']:.4f} "
                  f"[{b['interval'][0]:.3f}, {b['interval'][1]:.3f}] (selection {doc['protocol']['selection']})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["flowers5", "hymenoptera"])
    ap.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    ap.add_argument("--resplits", type=int, default=20)
    ap.add_argument("--cache-dir", type=Path, default=REPO / "cache" / "bench")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "pick")
    ap.add_argument("--headline", action="store_true", help="also fit the dataset's own folders, old vs default")
    args = ap.parse_args()
    if not WEIGHTS.is_file():
        sys.exit(f"bench/pick.py needs the shared weights at {WEIGHTS}")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    for name in args.datasets:
        X, labels, class_names = features(name, args.cache_dir)
        report[name] = {}
        if args.headline:
            report[name]["headline"] = headline(name, args.cache_dir)
        for n in args.sizes:
            if n + round(3 * n / 7) > 0.75 * len(labels):  # keep at least a quarter of the folder as truth
                print(f"{name}: {n} training images leave too little truth in {len(labels)} images; skipped")
                continue
            t0 = time.perf_counter()
            rows = []
            for seed in range(args.resplits):
                splits = draw(labels, n, 1000 * n + seed)
                rows.append(score_rules(fit_resplit(X, labels, class_names, splits, seed), seed))
            summary = summarise(rows)
            report[name][str(n)] = {"resplits": args.resplits, "truth_images": int(len(labels) - n - round(3 * n / 7)),
                                    "rules": summary, "per_resplit": rows}
            print(f"\n{name}, {n} training images, {args.resplits} resplits ({time.perf_counter() - t0:.0f} s):")
            print(f"  {'rule':<14} {'regret mean':>11} {'sd':>6} {'max':>6} {'coverage':>9} "
                  f"{'tie | gap>2pt':>14} {'diff | gap<0.5pt':>17}  picks")
            for rule, s in summary.items():
                if rule == "old_headline":
                    continue
                picks = ", ".join(f"{h} {c}" for h, c in s["picks"].items())
                print(f"  {rule:<14} {s['mean_regret']:>11.2f} {s['sd_regret']:>6.2f} {s['max_regret']:>6.2f} "
                      f"{s['coverage']:>9.2f} {s['tie_when_gap_over_2pt']:>14} "
                      f"{s['difference_when_gap_under_0.5pt']:>17}  {picks}  (headline - truth "
                      f"{s['mean_optimism']:+.2f})")
            print(f"  old headline (best on the split that reports it) - truth: "
                  f"{summary['old_headline']['mean_optimism']:+.2f} points")
            (args.out / "pick.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out / 'pick.json'}")


if __name__ == "__main__":
    main()
