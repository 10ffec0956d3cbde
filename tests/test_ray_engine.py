"""The Ray engine on a real Ray cluster: the same cache as the local engine, a killed actor, shared storage checks.

One head node is started for the whole module with ``ray start --head --block`` (2 CPUs, no dashboard) and every
extraction joins it by address, as ``--ray-address`` does on a real cluster; the head is stopped by its process id
at the end. Where this machine allows a private mount namespace (``unshare -m``), the head and so every Ray worker
runs inside one in which two folders look different from how the driver (this test process) sees them:

* ``hidden/`` is an empty tmpfs for the workers: a cache folder there is *not shared* with the driver, as when
  ``--cache-dir`` is on a disk of the driver's machine only;
* ``readonly/`` is the same folder, mounted read-only for the workers: they see the driver's files but cannot write.

So the two storage tests exercise a real worker that really cannot see, or really cannot write, the cache folder.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, V2_WEIGHTS, run_extract
from pipeline import cache
from pipeline.errors import CacheError
from pipeline.extract import RayOptions
from pipeline.views import ViewSpec

RAY_CLI = Path(sys.executable).with_name("ray")
BATCH = 4
N_PER_CLASS = 24  # 48 real photos: enough for a kill to land mid-run, small enough for seconds per run


@dataclass
class Cluster:
    address: str
    base: Path
    namespaced: bool  # the workers see hidden/ and readonly/ differently from the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _namespace_works() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Ray cluster (2 CPUs), joined by address by every test of the module."""
    pytest.importorskip("ray.data", reason="the Ray engine's tests need ray[data] (pip install -e '.[ray]')")
    base = tmp_path_factory.mktemp("raycluster")
    hidden, readonly = base / "hidden", base / "readonly"
    hidden.mkdir()
    readonly.mkdir()
    port = _free_port()
    # Reachable from this machine only, so the test cluster goes without Ray's token authentication (joining a
    # cluster that has it needs RAY_AUTH_MODE=token in the driver's environment before Ray is imported).
    head = [str(RAY_CLI), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
            "--include-dashboard=false", "--disable-usage-stats", f"--object-store-memory={256 * 1024**2}"]
    namespaced = _namespace_works()
    if namespaced:
        mounts = (f"mount -t tmpfs none {shlex.quote(str(hidden))} && "
                  f"mount --bind {shlex.quote(str(readonly))} {shlex.quote(str(readonly))} && "
                  f"mount -o remount,bind,ro {shlex.quote(str(readonly))} && exec {shlex.join(head)}")
        head = ["unshare", "-m", "--propagation", "private", "sh", "-c", mounts]
    log = (base / "head.log").open("w")
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop at once
    proc = subprocess.Popen(head, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in (base / "head.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the test Ray head did not start:\n{(base / 'head.log').read_text()[-2000:]}")
            time.sleep(0.2)
        ip = next(ln.split("--address=")[1].strip("'\" ") for ln in (base / "head.log").read_text().splitlines()
                  if "ray start --address=" in ln)
        yield Cluster(ip, base, namespaced)
    finally:
        proc.terminate()  # `ray start --block` stops the processes it started on SIGTERM
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def photos(shared_dir, tmp_path_factory) -> Path:
    """48 hymenoptera photos (2 classes) and three files that cannot be decoded, one of them a real one."""
    root = tmp_path_factory.mktemp("raydata") / "photos"
    for cls in ("ants", "bees"):
        (root / cls).mkdir(parents=True)
        for f in sorted((shared_dir / "data/hymenoptera/train" / cls).glob("*.jpg"))[:N_PER_CLASS]:
            shutil.copy2(f, root / cls / f.name)
    first = sorted((root / "ants").glob("*.jpg"))[0]
    (root / "ants" / "truncated.jpg").write_bytes(first.read_bytes()[:300])
    (root / "bees" / "empty.png").write_bytes(b"")
    shutil.copy2(shared_dir / "data/odd_images/multipage_rgb_skimage.tif", root / "bees" / "multipage.tif")
    return root


def _options(shared_dir, **kw):
    # One augmented view (the mirror image) per photo: the Ray workers render and extract views as the local
    # engine does.
    return dict(weights=str(shared_dir / V2_WEIGHTS), batch_size=BATCH, views=ViewSpec(1, ("flip",), 0), **kw)


@pytest.fixture(scope="module")
def local_cache(photos, shared_dir, tmp_path_factory) -> Path:
    """The reference: the same photos through the local engine."""
    return run_extract(photos, tmp_path_factory.mktemp("local"), **_options(shared_dir, checkpoint_rows=8)).path


def _assert_same_cache(got: Path, ref: Path) -> None:
    a, b = cache.read_rows(got), cache.read_rows(ref)
    for name in cache.ROW_FIELDS:
        assert getattr(a, name) == getattr(b, name), name  # same rows, order, labels, digests, failures, reasons
    fa, fb = cache.read_features(got, views=True), cache.read_features(ref, views=True)
    assert fa.paths == fb.paths and fa.failed == fb.failed
    np.testing.assert_allclose(fa.features, fb.features, rtol=0, atol=1e-5)
    assert fa.views is not None and fa.views.shape == (len(fa.paths), 1, fa.features.shape[1])
    np.testing.assert_allclose(fa.views, fb.views, rtol=0, atol=1e-5)
    ma, mb = cache.read_meta(got), cache.read_meta(ref)
    # times, the run's provenance (engine, run id) and the digest of the feature bytes may differ; nothing else
    volatile = {"created", "updated", "extract_seconds", "command", "dataset_root", "dataset_id", "runs",
                "content_sha256"}
    assert {k: v for k, v in ma.items() if k not in volatile} == {k: v for k, v in mb.items() if k not in volatile}
    assert not cache.parts_dir(got).exists()


@pytest.mark.slow
def test_ray_engine_writes_the_local_engines_cache(cluster, photos, local_cache, shared_dir, tmp_path):
    lines: list[str] = []
    res = run_extract(photos, tmp_path, log=lines.append, engine="ray", ray=RayOptions(address=cluster.address),
                      **_options(shared_dir, checkpoint_rows=8))
    assert res.path.name == local_cache.name
    assert res.n_extracted == 2 * N_PER_CLASS + 3 and res.n_failed == 3
    assert sorted(p for p, _ in res.failures) == ["ants/truncated.jpg", "bees/empty.png", "bees/multipage.tif"]
    _assert_same_cache(res.path, local_cache)
    (run,) = cache.read_meta(res.path)["runs"]  # provenance: one run, by the Ray engine, with its runtime
    (local_run,) = cache.read_meta(local_cache)["runs"]  # the same runtime as the local engine chose (auto)
    assert run["engine"] == "ray" and run["workers"] == 1 and run["rows"] == res.n_total
    assert run["runtime"] == local_run["runtime"] and run["runtime_version"] == local_run["runtime_version"]
    assert any(ln.startswith("ray: ") and "on 1 worker(s)" in ln for ln in lines), lines  # the summary line
    # the device line, as the local engine's, says why auto took its runtime
    assert any(ln.startswith("device: ") and "[auto: " in ln and "(first of 1 worker(s))" in ln for ln in lines), lines
    import ray

    assert not ray.is_initialized()  # the driver disconnected; the cluster it joined stays up (the next tests)


def _actor_pids(since: float) -> list[int]:
    """Live model actor processes started after ``since`` (Ray titles them ``ray::MapWorker(...ChunkExtractor)``)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline", "create_time", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and (p.info["create_time"] or 0) >= since and \
                any("ChunkExtractor" in part for part in (p.info["cmdline"] or [])):
            pids.append(p.info["pid"])
    return pids


@pytest.mark.slow
def test_killed_actor_is_restarted_and_committed_rows_are_kept(cluster, photos, local_cache, shared_dir,
                                                               tmp_path):
    """SIGKILL the model actor (a crash, as the OOM killer would do it) right after it committed its first part.

    Ray restarts it and retries the chunks it held; the run completes with the local engine's cache. Every part
    is hard-linked aside as it appears, to show afterwards that the restarted actor recomputed at most the one
    chunk that was in flight, never rows committed before.
    """
    import signal

    out: dict = {}

    def extract() -> None:
        try:
            out["res"] = run_extract(photos, tmp_path / "cache", engine="ray", ray=RayOptions(address=cluster.address),
                                     **_options(shared_dir, checkpoint_rows=BATCH))
        except Exception as exc:  # reported by the assertion below
            out["exc"] = exc

    since = time.time() - 1
    run = threading.Thread(target=extract, daemon=True)
    run.start()
    parts = None
    kept = tmp_path / "kept.parts"
    kept.mkdir()
    killed: list[int] = []
    pids: list[int] = []
    deadline = time.monotonic() + 240
    while run.is_alive() and time.monotonic() < deadline:
        if not pids:
            pids = _actor_pids(since)
        if parts is None:
            found = list((tmp_path / "cache").glob("*.h5.parts"))
            parts = found[0] if found else None
        names = [p for p in parts.glob("part-*.h5")] if parts is not None and parts.is_dir() else []
        for p in names:
            if not (kept / p.name).exists():
                try:
                    os.link(p, kept / p.name)
                except FileNotFoundError:
                    pass  # assembled and removed meanwhile
        if names and pids and not killed:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            pids = [] if not killed else pids
            n_at_kill = len(names)
        time.sleep(0.005)
    run.join(timeout=5)
    assert not run.is_alive(), "the Ray run did not finish"
    assert killed, "the actor was not found or finished before it could be killed"
    total_chunks = -(-(2 * N_PER_CLASS + 3) // BATCH)
    assert n_at_kill < total_chunks  # the kill landed mid-run
    assert "res" in out, out.get("exc")
    res = out["res"]
    _assert_same_cache(res.path, local_cache)

    # Parts by writer (part-<sequence>-<writer id>.h5): each actor incarnation has its own PartWriter.
    meta = cache.read_meta(res.path)
    by_writer: dict[str, set[str]] = {}
    for p in sorted(kept.glob("part-*.h5"), key=lambda q: q.stat().st_mtime):
        one = tmp_path / f"one-{p.stem}"  # cache.scan_existing reads the parts of <path> from <path>.parts/
        cache.parts_dir(one).mkdir()
        os.link(p, cache.parts_dir(one) / p.name)
        by_writer.setdefault(p.stem.split("-")[2], set()).update(cache.scan_existing(one, meta).part_rows)
    assert len(by_writer) >= 2, by_writer.keys()  # the restarted actor (a new writer) wrote the rest
    first, *others = by_writer.values()  # in order of their first part
    later = set().union(*others)
    assert first | later == set(cache.read_rows(res.path).path)
    assert len(first & later) <= BATCH  # at most the chunk in flight at the kill was computed twice


def test_worker_that_cannot_write_the_cache_folder_stops_with_one_line(cluster, photos, shared_dir, tmp_path):
    if cluster.namespaced:
        cache_dir = cluster.base / "readonly" / "cache"  # read-only for the workers, writable here
    elif os.geteuid() != 0:
        from pipeline.data import discover
        from pipeline.extract import resolve_config
        from pipeline.extract.plan import cache_file

        cache_dir = tmp_path / "cache"
        cfg = resolve_config(log=lambda _m: None, cache_dir=cache_dir, **_options(shared_dir))
        parts = cache.parts_dir(cache_file(discover(photos), cfg))
        parts.mkdir(parents=True, mode=0o555)  # the driver only writes its lock and probe token beside it
    else:
        pytest.skip("needs a private mount namespace (unshare -m) or a non-root user to deny a worker the folder")
    with pytest.raises(CacheError) as err:
        run_extract(photos, cache_dir, engine="ray", ray=RayOptions(address=cluster.address),
                    **_options(shared_dir))
    msg = str(err.value)
    assert "\n" not in msg
    assert "cannot write the cache folder" in msg and "shared filesystem" in msg, msg
    assert not list(cache_dir.glob("*.h5")) and not list(cache_dir.glob(".*.tmp"))  # nothing written, nothing left


def test_worker_that_does_not_share_the_cache_folder_stops_with_one_line(cluster, photos, shared_dir):
    if not cluster.namespaced:
        pytest.skip("needs a private mount namespace (unshare -m) to give the workers their own folder")
    cache_dir = cluster.base / "hidden" / "cache"  # an empty tmpfs for the workers: not the driver's folder
    with pytest.raises(CacheError) as err:
        run_extract(photos, cache_dir, engine="ray", ray=RayOptions(address=cluster.address),
                    **_options(shared_dir))
    msg = str(err.value)
    assert "\n" not in msg and "does not see the cache folder this machine writes" in msg, msg
    assert not list(cache_dir.glob("*.h5")) and not list(cache_dir.glob(".*.tmp"))


def test_engine_ray_without_ray_says_how_to_install(tiny_dataset, tmp_path, monkeypatch):
    """Ray is hidden from this process (an import of it fails, as when it is not installed)."""
    from typer.testing import CliRunner

    import cli
    from pipeline.errors import EngineError
    from pipeline.extract.ray_engine import RAY_HINT

    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "cache"
    res = CliRunner().invoke(cli.app, ["extract", str(tiny_dataset), "--engine", "ray", "--cache-dir", str(out)])
    assert isinstance(res.exception, EngineError) and str(res.exception) == RAY_HINT  # main() prints it as one line
    assert "pip install 'headbench[ray]'" in RAY_HINT and "\n" not in RAY_HINT
    assert not out.exists()  # stopped before any model or cache
    with pytest.raises(EngineError, match="pip install"):  # the library path says the same
        run_extract(tiny_dataset, out, engine="ray", weights="none")


def test_ray_options_are_checked_before_anything_runs(tiny_dataset, tmp_path):
    from typer.testing import CliRunner

    import cli
    from pipeline.errors import EngineError
    from pipeline.extract.ray_engine import check_ray_options

    for args, expect in ((["--num-workers", "2"], "need --engine ray"),
                         (["--engine", "ray", "--ray-address", "headnode"], "ray://HOST:PORT"),
                         (["--engine", "ray", "--gpus-per-worker", "-1"], "gpus-per-worker")):
        res = CliRunner().invoke(cli.app, ["extract", str(tiny_dataset), "--cache-dir", str(tmp_path), *args])
        assert res.exit_code == 2 and expect in res.output, (args, res.output)
    assert not list(tmp_path.glob("*.h5"))
    for bad in (RayOptions(address="headnode"), RayOptions(num_workers=0), RayOptions(gpus_per_worker=-1)):
        with pytest.raises(EngineError):
            check_ray_options(bad)
    for good in ("auto", "ray://head:10001", "10.0.0.1:6379"):
        check_ray_options(RayOptions(address=good))


def test_chunks_are_whole_batches_near_the_checkpoint_size():
    from pipeline.extract.config import resolve_config
    from pipeline.errors import EngineError
    from pipeline.extract.ray_engine import check_resources, chunk_rows

    cfg = resolve_config(log=lambda _m: None, weights="none", batch_size=32, checkpoint_rows=100)
    assert chunk_rows(cfg) == 96  # like the local engine: parts of whole batches, at most checkpoint_rows
    big = resolve_config(log=lambda _m: None, weights="none", batch_size=32, checkpoint_rows=10_000)
    assert chunk_rows(big) % 32 == 0 and chunk_rows(big) * 3 * 224**2 <= 96 * 1024**2  # never split by Ray Data
    with pytest.raises(EngineError, match="GPUs"):
        check_resources({"CPU": 8}, 2, 1.0)
    with pytest.raises(EngineError, match="CPUs"):
        check_resources({"CPU": 2}, 2, 0.0)
    check_resources({"CPU": 3, "GPU": 2}, 2, 1.0)
