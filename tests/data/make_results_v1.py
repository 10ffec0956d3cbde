"""Write tests/data/results_v1/results.json with the schema-1 writer of results.json, on synthetic features.

Run against the source tree of headbench at commit 914b108 (the last to write schema 1), unpacked to SRC:

    git archive 914b108 | tar -x -C SRC && python tests/data/make_results_v1.py SRC OUT_RUN_DIR

and copy OUT_RUN_DIR/results.json here. Only results.json is kept (the fitted heads are not needed to read it).
"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import numpy as np
from sklearn.datasets import make_classification
import pipeline.cache as cache_mod
from pipeline.cache import FeatureSet
from pipeline.fit import FitConfig, run_fit

classes = ["ant", "bee", "wasp"]
X, y = make_classification(90, 8, n_informative=5, n_redundant=0, n_classes=3, class_sep=1.5, random_state=7)
paths = [f"{classes[c]}/img_{i:04d}.jpg" for i, c in enumerate(y)]
meta = {"backbone": "mobilenet_v2", "backbone_label": "mobilenet_v2-a1.0-224", "dataset_name": "toy",
        "dataset_root": "/data/toy", "input_size": 224, "preprocess": "scale_-1_1", "resize": "crop",
        "weights_source": "synthetic", "weights_sha256": "0" * 64, "n_rows": 90, "extract_seconds": 1.5,
        "versions": {"keras": "3"}, "command": "synthetic", "created": "2026-01-01T00:00:00", "alpha": 1.0,
        "weights_path": "", "pixel_rule": "1"}
fs = FeatureSet(path="/data/cache/toy.h5", features=X.astype(np.float32), labels=y.astype(np.int64),
                class_names=classes, paths=paths, splits=np.array([""] * 90), failed=[], meta=meta,
                file_sha256="ab" * 32)
cache_mod.read_meta = lambda p: meta
cache_mod.read_features = lambda p, kind="avg", expect=None: fs
out = Path(sys.argv[2])
run_fit(FitConfig(caches=["/data/cache/toy.h5"], heads=["logreg", "linear_svm", "knn", "centroid"], out=out,
                  command="python cli.py fit --head logreg --head linear_svm --head knn --head centroid"), log=print)
