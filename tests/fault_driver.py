"""Runs one extraction and kills itself with SIGKILL at its N-th write event (for tests/test_faults.py).

Usage: ``python tests/fault_driver.py DATA CACHE_DIR N``. A write event is any HDF5 dataset creation, dataset
write, attribute write, ``os.replace`` or ``os.fsync`` made by the extraction; ``N = 0`` runs to the end and prints
``{"events": total, "assembly_from": first event of the final assembly}`` as JSON.
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import h5py  # noqa: E402

from pipeline import cache  # noqa: E402
from pipeline.extract import extract_dataset, resolve_config  # noqa: E402

OPTIONS = dict(backbone="mobilenet_v2", weights="none", input_size=64, alpha=0.35, batch_size=4, checkpoint_rows=4,
               checkpoint_seconds=1e9, runtime="keras")  # the runtime does not matter here; Keras starts fastest

data, cache_dir, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
count = {"n": 0, "assembly_from": None}


def event(fn):
    def wrapped(*a, **k):
        count["n"] += 1
        if count["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)

    return wrapped


def armed() -> None:
    h5py.Group.create_dataset = event(h5py.Group.create_dataset)
    h5py.Dataset.__setitem__ = event(h5py.Dataset.__setitem__)
    h5py.AttributeManager.__setitem__ = event(h5py.AttributeManager.__setitem__)
    os.replace = event(os.replace)
    os.fsync = event(os.fsync)
    real_assemble = cache.assemble

    def assemble(*a, **k):
        count["assembly_from"] = count["n"] + 1
        return real_assemble(*a, **k)

    cache.assemble = assemble  # the name extract's run looks up on the package at each call


config = resolve_config(cache_dir=cache_dir, log=lambda m: None, **OPTIONS)
armed()
extract_dataset(data, config, log=lambda m: None)
print(json.dumps({"events": count["n"], "assembly_from": count["assembly_from"]}))
