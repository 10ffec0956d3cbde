"""How the ``cache_v<N>_tiny.h5`` files were made (kept as test data so later readers prove they still read every
older schema). Running it writes a cache of the *current* schema to the path given: use it to add the next
version's file (e.g. ``python tests/data/make_cache_tiny.py tests/data/cache_v3_tiny.h5``), never to overwrite an
older one. ``cache_v1_tiny.h5`` was made by headbench 0.1 with the same images and options."""

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipeline.extract import extract_dataset, resolve_config  # noqa: E402

out = Path(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp) / "tiny"
    rng = np.random.default_rng(0)
    for c in ("blue", "red"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    cfg = resolve_config(backbone="mobilenet_v2", weights="none", input_size=32, alpha=0.35, cache_dir=tmp,
                         command="make_cache_tiny.py")
    res = extract_dataset(root, cfg)
    res.path.replace(out)
