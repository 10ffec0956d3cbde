"""Which resize rule gives the best features? Linear-probe accuracy per rule, on real photos of mixed aspect ratios.

For each backbone (the shared ImageNet MobileNet v1 and MobileNetV2 weights) and each resize rule (squash, crop,
pad), extracts ``--data`` (default ``../shared/data/hymenoptera``: photos of 193-2592 px with aspect ratios from
0.5 to 2) and fits a logistic-regression probe (C chosen by 5-fold CV on train) on train, scoring on val. Also
prints the bootstrap standard error of each accuracy, so differences can be read against noise.

The extraction runtime (``--runtime``, default ``auto``) and the pixel rule are printed with the table, so tables from
before and after a change of either can be compared (features of the two runtimes agree to ~1e-6).

Usage::

    python bench/resize.py [--data DIR] [--cache-dir DIR] [--runtime auto|onnx|keras]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _start  # bench/_start.py: the repo on sys.path, TensorFlow's native chatter off

REPO = _start.start(__name__)

WEIGHTS = {
    "mobilenet": "weights/coralq_mobilenet_1_0_224_tf_no_top.weights.h5",
    "mobilenet_v2": "weights/coralq_mobilenet_v2_1.0_224_no_top.weights.h5",
}


def probe_accuracy(path: Path) -> tuple[float, float]:
    """Val accuracy of a CV-tuned logistic-regression probe, and its bootstrap standard error."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.cache import read_features

    fs = read_features(path)
    tr, va = fs.splits == "train", fs.splits == "val"
    grid = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
                        {"logisticregression__C": [1e-3, 1e-2, 1e-1, 1.0]}, cv=5)
    grid.fit(fs.features[tr], fs.labels[tr])
    correct = grid.predict(fs.features[va]) == fs.labels[va]
    rng = np.random.default_rng(0)
    boots = [correct[rng.integers(0, len(correct), len(correct))].mean() for _ in range(1000)]
    return float(correct.mean()), float(np.std(boots))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hymenoptera")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--runtime", choices=["auto", "onnx", "keras"], default="auto")
    args = ap.parse_args()
    shared = REPO.parent / "shared"
    from pipeline.extract import PIXEL_RULE, extract_dataset, resolve_config

    with tempfile.TemporaryDirectory() as tmp:
        cdir = args.cache_dir or Path(tmp)
        print(f"data: {args.data}; probe: logistic regression, C by 5-fold CV on train, scored on val; runtime "
              f"{args.runtime}, pixel rule {PIXEL_RULE}")
        print(f"{'backbone':<14}{'squash':>16}{'crop':>16}{'pad':>16}")
        for backbone, w in WEIGHTS.items():
            cells = []
            for rule in ("squash", "crop", "pad"):
                cfg = resolve_config(backbone=backbone, weights=str(shared / w), resize=rule, cache_dir=cdir,
                                     runtime=args.runtime, log=lambda m: None)
                res = extract_dataset(args.data, cfg, log=lambda m: None)
                acc, se = probe_accuracy(res.path)
                cells.append(f"{acc:.3f} ± {se:.3f}")
            print(f"{backbone:<14}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
