"""What augmented views add: the best head with views vs without, per backbone, over split seeds.

One run: extract ``--data`` (default ``../shared/data/flowers5``, 4317 photos, 5 classes, no split folders) with
both shared ImageNet MobileNets (MobileNet 1.0 and MobileNetV2 1.0, 224, crop) and ``--views K --view-kinds ...``
(default 1 view, the mirror image) into a cache folder under a temporary directory, then, for each backbone and each
split seed (default 0, 1, 2: the hash split and the folds change with it), ``run_fit`` twice on the same split:
``views=False`` (centre views only) and ``views=True`` (each head chooses none / train / tta / both on its
cross-validation folds). Printed per backbone and seed: the best head of each run (highest selection score, as
``fit`` picks it), its test accuracy, and the wall time of each fit run; then the median and range over seeds of
the gain on test. Per head, the chosen view mode and its test accuracy without and with views.

``--plain-probe`` also repeats the measurement that set the target, outside the protocol: a logistic regression on
the centre views (no scaling, C in {0.01, 0.03, 0.1}) on ``fit``'s train/test split of each seed, tested without
and with its predicted probabilities averaged with the mirror image's (needs ``flip`` among the view kinds).

Usage::

    nice python bench/views.py [--data DIR] [--views 1] [--view-kinds flip] [--seeds 0 1 2]
                               [--heads logreg,knn,centroid] [--per-class N]
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
BACKBONES = {"mobilenet": SHARED / "weights" / "coralq_mobilenet_1_0_224_tf_no_top.weights.h5",
             "mobilenet_v2": SHARED / "weights" / "coralq_mobilenet_v2_1.0_224_no_top.weights.h5"}


def subset(root: Path, per_class: int, out: Path) -> Path:
    """A class-per-folder copy of ``root`` (symbolic links) with the first ``per_class`` files of each class."""
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        (out / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            (out / cls.name / f.name).symlink_to(f.resolve())
    return out


def best(doc: dict) -> dict:
    """The run's best result (``best.key``)."""
    return next(r for r in doc["results"] if r["key"] == doc["best"]["key"])


def plain_probe(path: Path, name: str, seeds: list[int]) -> None:
    """Logistic regression on centre views (no scaling), tested without and with the mirror image averaged in."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from pipeline import cache
    from pipeline.fit.protocol import hash_split

    fs = cache.read_features(path, views=True)
    spec = cache.read_meta(path).get("views") or {}
    kinds = spec.get("kinds", []) if isinstance(spec, dict) else []
    if "flip" not in kinds:
        print(f"{name}: plain probe skipped (no mirror view among {kinds})")
        return
    x, mirror, y = fs.features, fs.views[:, 0], np.asarray(fs.labels)  # view 1 is the mirror image with flip
    for seed in seeds:
        test = hash_split(fs.paths, y, seed=seed) == "test"
        out = []
        for c in (0.01, 0.03, 0.1):
            clf = LogisticRegression(C=c, max_iter=1000).fit(x[~test], y[~test])
            a0 = float((clf.predict(x[test]) == y[test]).mean())
            p = (clf.predict_proba(x[test]) + clf.predict_proba(mirror[test])) / 2
            a1 = float((p.argmax(1) == y[test]).mean())
            out.append(f"C {c}: {a0:.4f} -> {a1:.4f} ({100 * (a1 - a0):+.2f})")
        print(f"{name:<13} seed {seed} plain probe, mirror test-time average: " + "; ".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "flowers5")
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--view-kinds", default="flip")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--heads", default="logreg,knn,centroid")
    ap.add_argument("--per-class", type=int, default=None, help="use the first N images of each class (quick check)")
    ap.add_argument("--plain-probe", action="store_true", help="also the unscaled probe with mirror test-time views")
    args = ap.parse_args()
    if not args.data.exists() or not all(w.exists() for w in BACKBONES.values()):
        raise SystemExit("needs ../shared (weights and data) beside the repository")

    from pipeline.extract import extract_dataset, resolve_config
    from pipeline.views import make_view_spec
    from pipeline.fit import FitConfig, run_fit

    spec = make_view_spec(args.views, args.view_kinds.split(","), seed=0)
    heads = args.heads.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = subset(args.data, args.per_class, tmp / "data" / args.data.name) if args.per_class else args.data
        caches, extract_s = {}, {}
        for name, weights in BACKBONES.items():
            t = time.perf_counter()
            cfg = resolve_config(backbone=name, weights=str(weights), views=spec, cache_dir=tmp / "cache",
                                 log=lambda m: None)
            caches[name] = extract_dataset(data, cfg, log=lambda m: None).path
            extract_s[name] = time.perf_counter() - t
        n_images = sum(1 for p in data.rglob("*") if p.is_file())
        print(f"data: {args.data}{f' (first {args.per_class} per class)' if args.per_class else ''}, "
              f"{n_images} files; views: {spec.describe()}; heads: {', '.join(heads)}; {os.cpu_count()} CPUs")
        for name in BACKBONES:
            print(f"extract {name} with views: {extract_s[name]:.0f} s")

        gains: dict[str, list[float]] = {name: [] for name in BACKBONES}
        for name, path in caches.items():
            for seed in args.seeds:
                runs = {}
                for use in (False, True):
                    t = time.perf_counter()
                    fr = run_fit(FitConfig(caches=[path], heads=heads, seed=seed, out=tmp / f"run_{name}_{seed}_{use}",
                                           views=use), log=lambda m: None)
                    runs[use] = (fr.results, time.perf_counter() - t)
                (plain, t_plain), (viewed, t_views) = runs[False], runs[True]
                b0, b1 = best(plain), best(viewed)
                a0, a1 = b0["metrics"]["test"]["accuracy"], b1["metrics"]["test"]["accuracy"]
                gains[name].append(a1 - a0)
                print(f"{name:<13} seed {seed}: best without views {b0['head']:<10} test {a0:.4f} ({t_plain:.0f} s)"
                      f" | with views {b1['head']:<10} [{b1['views']['chosen']}] test {a1:.4f} ({t_views:.0f} s)"
                      f" | gain {100 * (a1 - a0):+.2f} points")
                for r in viewed["results"]:
                    v = r["views"]
                    sel = ", ".join(f"{m} {s['mean']:.4f}" for m, s in v["selection"].items())
                    fin = v["final"]["test"]
                    print(f"    {r['head']:<10} chose {v['chosen']:<5} (cv: {sel}); test {fin['without']['accuracy']:.4f}"
                          f" -> {fin['with']['accuracy']:.4f}; view scoring + refit {v['seconds']:.1f} s")
        if args.plain_probe:
            for name, path in caches.items():
                plain_probe(path, name, args.seeds)
        print("gain of the best head with views over the best without, test accuracy, points:")
        for name, g in gains.items():
            pts = [100 * x for x in g]
            print(f"  {name:<13} median {statistics.median(pts):+.2f} (range {min(pts):+.2f} .. {max(pts):+.2f}) "
                  f"over seeds {args.seeds}")


if __name__ == "__main__":
    main()
