"""Regenerates nothing on its own: records how ``cache_v1_tiny.h5`` was made with schema v1 (kept as test data so
later versions of the reader prove they still read v1 files). Run from the repo root only when adding a new
schema's file, never to overwrite this one."""

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipeline.extract import extract_dataset  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "cache_v1_tiny.h5")
with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp) / "tiny"
    rng = np.random.default_rng(0)
    for c in ("blue", "red"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    res = extract_dataset(root, backbone="mobilenet_v2", weights="none", input_size=32, alpha=0.35,
                          cache_dir=tmp, command="make_cache_v1_tiny.py")
    res.path.replace(out)
