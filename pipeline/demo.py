"""The built-in sample: a real labelled image set that needs no network and nothing outside the installed packages.

scikit-image ships ``lfw_subset``: 200 real 25x25 greyscale photos, 100 faces (Labeled Faces in the Wild) and 100
non-faces. :func:`write_sample` writes them as a class-per-folder dataset (``face/``, ``not_face/``, PNG files);
:func:`run_demo` then runs the whole product on it: extract (ImageNet MobileNetV2 when the weights can be had, else
random weights, said once and recorded everywhere), fit every head, write the HTML report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import HeadbenchError, WeightsError


def write_sample(dest: str | Path) -> Path:
    """Write scikit-image's ``lfw_subset`` as ``dest/lfw_faces/{face,not_face}/NNN.png``; returns the dataset folder."""
    try:
        from skimage.data import lfw_subset
    except ImportError:
        raise HeadbenchError("the demo sample comes from scikit-image: pip install 'headbench[demo]'") from None
    from PIL import Image

    root = Path(dest) / "lfw_faces"
    images = lfw_subset()  # (200, 25, 25) floats in [0, 1]: first 100 faces, then 100 non-faces
    for i, img in enumerate(images):
        cls = "face" if i < 100 else "not_face"
        path = root / cls / f"{i:03d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), "L").save(path)
    return root


DEMO_DIR = Path("cache") / "demo"
"""Where the demo keeps its sample and its cache: apart from the user's own caches in ``cache/``, so that a later
``python cli.py fit`` on the user's data never sees the demo's dataset."""


def run_demo(workdir: str | Path = DEMO_DIR / "sample", cache_dir: str | Path = DEMO_DIR,
             reports_dir: str | Path = "reports", log: Callable[[str], None] = print) -> dict:
    """Extract, fit and report on the built-in sample; returns the paths of the cache, run folder and report.

    The sample and its cache live under :data:`DEMO_DIR` by default, apart from the user's ``cache/``; the run
    folder goes to ``<reports_dir>/runs/`` and its HTML report to ``<reports_dir>/<run name>.html``.
    """
    from pipeline.extract import extract_dataset, resolve_config
    from pipeline.fit import FitConfig, run_fit
    from pipeline.report import default_report_path, write_report

    root = write_sample(workdir)
    log(f"sample: {root} (scikit-image lfw_subset: 100 faces, 100 non-faces, real 25x25 greyscale photos)")
    opts = dict(backbone="mobilenet_v2", cache_dir=Path(cache_dir), command="python cli.py demo")
    try:
        cfg = resolve_config(weights="imagenet", log=log, **opts)
        tag = "imagenet"
    except WeightsError as exc:
        log(f"ImageNet weights unavailable, continuing with RANDOM weights (outputs are labelled so): {exc}")
        cfg = resolve_config(weights="none", log=log, **opts)
        tag = "random-weights"
    res = extract_dataset(root, cfg, log=log)
    out = Path(reports_dir) / "runs" / f"demo_{tag}_{time.strftime('%Y%m%d-%H%M%S')}"
    run = run_fit(FitConfig(caches=[res.path], heads=["all"], out=out, command="python cli.py demo"), log=log)
    report = write_report([run.run_dir], default_report_path([run.run_dir], reports_dir))
    return {"cache": res.path, "run": run.run_dir, "report": report, "fit": run}
