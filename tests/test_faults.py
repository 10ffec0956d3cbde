"""Fault injection: SIGKILL at seeded random write events of an extraction (parts, assembly, rename), then a rerun.

Each killed run must leave nothing that looks complete but is not, and the rerun must give features identical to an
uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np

from conftest import REPO, run_extract
from pipeline import cache

DRIVER = REPO / "tests" / "fault_driver.py"
OPTIONS = dict(backbone="mobilenet_v2", weights="none", input_size=64, alpha=0.35, batch_size=4, checkpoint_rows=4,
               checkpoint_seconds=1e9, runtime="keras")  # as in fault_driver.py


def _drive(data, cache_dir, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), str(data), str(cache_dir), str(kill_at)],
                          capture_output=True, text=True, timeout=300)


def _by_path(path):
    fs = cache.read_features(path)
    return dict(zip(fs.paths, fs.features))


def test_sigkill_at_seeded_random_write_events_then_rerun_gives_identical_features(tiny_dataset, tmp_path):
    ref = _drive(tiny_dataset, tmp_path / "reference", 0)
    assert ref.returncode == 0, ref.stderr
    counts = json.loads(ref.stdout.strip().splitlines()[-1])
    total, assembly = counts["events"], counts["assembly_from"]
    assert 0 < assembly < total
    (ref_cache,) = (tmp_path / "reference").glob("*.h5")
    expected = _by_path(ref_cache)

    rng = np.random.default_rng(20261125)
    points = sorted({int(rng.integers(1, assembly)), int(rng.integers(1, assembly)),  # while writing parts
                     int(rng.integers(assembly, total + 1))})  # while assembling or renaming the cache
    for k in points:
        cdir = tmp_path / f"killed_at_{k}"
        proc = _drive(tiny_dataset, cdir, k)
        assert proc.returncode == -signal.SIGKILL, (k, proc.returncode, proc.stderr[-2000:])
        for h5 in cdir.glob("*.h5"):  # a file under the final name must be whole: complete and readable
            assert cache.read_meta(h5)["complete"] is True
            cache.verify(h5)
        res = run_extract(tiny_dataset, cdir, **OPTIONS)
        got = _by_path(res.path)
        assert got.keys() == expected.keys(), k
        assert all(np.array_equal(got[p], expected[p]) for p in expected), f"features differ after a kill at {k}"
        assert not cache.parts_dir(res.path).exists() and not list(cdir.glob(".*.tmp"))
