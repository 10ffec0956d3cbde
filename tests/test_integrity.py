"""No silent wrong results from the cache: identity by dataset folder, checksums, retries, faults in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, reused_runtime, run_extract, write_image
from pipeline import cache
from pipeline.cache import write as cache_write
from pipeline.errors import CacheError

FAST = dict(backbone="mobilenet_v2", weights="none", input_size=64, alpha=0.35, batch_size=4)


def _run(root, cache_dir, **kw):
    msgs: list[str] = []
    res = run_extract(root, cache_dir, log=msgs.append, **(FAST | kw))
    return res, msgs


def _features(path) -> dict[str, np.ndarray]:
    fs = cache.read_features(path)
    return dict(zip(fs.paths, fs.features))


def _flip_byte_in(path: Path, dataset: str) -> None:
    """Flip one byte in the middle of the first stored chunk of ``dataset`` (as a bad disk sector would)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    offset = info.byte_offset + info.size // 2
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def _tiny_set(root: Path, seed: int, n: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    for c in ("cats", "dogs"):
        for i in range(n):
            write_image(root / c / f"{i}.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    return root


# ---- identity --------------------------------------------------------------------------------------------------


def test_two_folders_with_the_same_name_never_share_a_cache(tmp_path):
    a = _tiny_set(tmp_path / "project_a" / "data", seed=1)
    b = _tiny_set(tmp_path / "project_b" / "data", seed=2)
    ra, _ = _run(a, tmp_path / "cache")
    before = _features(ra.path)
    rb, msgs = _run(b, tmp_path / "cache")
    assert ra.path != rb.path and ra.path.exists() and rb.path.exists()
    assert rb.n_reused == 0 and rb.n_extracted == 8, "rows of another folder must never be reused"
    assert not any("dropping" in m for m in msgs)
    after = _features(ra.path)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the first project's cache is untouched
    assert cache.read_meta(rb.path)["dataset_root"] == str(b.resolve())
    assert not np.array_equal(after["cats/0.png"], _features(rb.path)["cats/0.png"])


# ---- integrity ---------------------------------------------------------------------------------------------------


def test_flipped_bits_in_features_are_caught_and_the_cache_rebuilt(tiny_dataset, tmp_path):
    res, _ = _run(tiny_dataset, tmp_path / "c")
    good = _features(res.path)
    _flip_byte_in(res.path, "features/avg")
    with pytest.raises(CacheError, match=r"is damaged \(checksum mismatch in features/avg.*delete it and run "
                                         r"`python cli.py extract"):
        cache.read_features(res.path)
    again, msgs = _run(tiny_dataset, tmp_path / "c")  # a rerun must not say "up to date" over damaged numbers
    assert not again.up_to_date and again.n_extracted == 12
    assert any(m.startswith(f"discarded {res.path.name}") and "checksum" in m for m in msgs), msgs
    rebuilt = _features(again.path)
    assert all(np.array_equal(good[k], rebuilt[k]) for k in good)


def test_flipped_bits_in_labels_and_edited_paths_are_caught(tiny_dataset, tmp_path):
    res, _ = _run(tiny_dataset, tmp_path / "c")
    copy = tmp_path / "copy.h5"
    shutil.copy(res.path, copy)
    _flip_byte_in(res.path, "rows/label")
    with pytest.raises(CacheError, match="is damaged .*row metadata unreadable"):
        cache.read_features(res.path)
    with h5py.File(copy, "r+") as f:  # a valid HDF5 edit that no checksum of HDF5 covers: a row's path
        f["rows/path"][0] = "blue/someone_elses.jpg"
    with pytest.raises(CacheError, match="does not match its checksum"):
        cache.read_features(copy)
    again, msgs = _run(tiny_dataset, tmp_path / "c")
    assert again.n_extracted == 12 and any("discarded" in m for m in msgs)
    cache.read_features(again.path)


def test_the_damaged_cache_line_gives_the_command_that_rebuilds_that_very_cache(tmp_path, monkeypatch):
    """Following the line literally must make the same cache file, not a default MobileNetV2 one elsewhere."""
    import functools
    import shlex

    import cli
    import pipeline.extract
    from pipeline.extract.plan import cache_file
    from pipeline.views import make_view_spec

    data = _tiny_set(tmp_path / "my photos", seed=3, n=2)  # a space in the folder: the command is shell-quoted
    res, _ = _run(data, tmp_path / "other cache", resize="squash", max_pool=True, views=make_view_spec(1, "flip"),
                  runtime="keras")  # Keras builds this model faster than an ONNX export of it
    _flip_byte_in(res.path, "features/avg")
    with pytest.raises(CacheError) as err:
        cache.read_features(res.path)
    line = str(err.value)
    assert "\n" not in line and line.count("`") == 2, line
    cmd = shlex.split(line.split("`")[1])
    assert cmd[:4] == ["python", "cli.py", "extract", str(data.resolve())]
    assert cmd[4:6] == ["-b", "mobilenet_v2"]
    assert {"--weights", "--input-size", "--alpha", "--resize", "--max-pool", "--views", "--view-kinds",
            "--cache-dir"} <= set(cmd)
    made = []

    def record(ds, cfg, log):  # the cache the command would make; then stop, as Ctrl-C would
        made.append(cache_file(ds, cfg))
        raise KeyboardInterrupt

    # What is checked is the command line's own parsing of the printed options into ExtractOptions, so the command
    # runs end to end; a typer command takes no seam, so extract_all is wrapped with its extract= seam filled in
    # (one model build fewer than letting the real extraction run).
    monkeypatch.setattr(pipeline.extract, "extract_all", functools.partial(pipeline.extract.extract_all,
                                                                           extract=record))
    with pytest.raises(SystemExit):  # the command as printed, through the command line's own parsing
        cli.main(cmd[2:], quiet_native=False)
    assert made == [res.path]


def test_the_rebuild_command_leaves_out_defaults_and_names_a_weights_file(tmp_path):
    meta = {"dataset_root": "/data/birds", "backbone": "inception_v3", "input_size": 299, "alpha": None,
            "resize": "crop", "weights_source": "file", "weights_path": "/w/my weights.h5",
            "feature_kinds": ["avg", "maps"], "maps_dtype": "float32", "views": {"n": 0}}
    assert cache.rebuild_command(Path("cache") / "birds.h5", meta) == (
        "python cli.py extract /data/birds -b inception_v3 --weights '/w/my weights.h5' --maps --maps-dtype float32")
    meta |= {"weights_source": "imagenet", "weights_path": "/k/x.h5", "feature_kinds": ["avg"]}
    assert cache.rebuild_command(tmp_path / "birds.h5", meta) == (
        f"python cli.py extract /data/birds -b inception_v3 --cache-dir {tmp_path}")


def test_row_digest_is_the_same_whatever_its_block_size():
    """The row checksum is hashed a block of rows at a time; the stored checksum of a schema-2 file (one join of
    every value) must still match with blocks of 1, 2 or 3 rows (the last block short), and an edited path must
    still fail it."""
    v2 = REPO / "tests" / "data" / "cache_v2_tiny.h5"
    meta = cache.read_meta(v2)
    rows = cache.read_rows(v2)
    assert len(rows) > 4 and rows.digest() == meta["rows_sha256"]
    for block in (1, 2, 3, len(rows), len(rows) + 1):
        assert rows.digest(block=block) == meta["rows_sha256"], block
    rows.path[3] = rows.path[3] + "x"
    assert rows.digest() != meta["rows_sha256"] and rows.digest(block=2) != meta["rows_sha256"]


def test_non_finite_features_are_failed_rows_never_usable_ones(tiny_dataset, tmp_path, monkeypatch):
    class NaNOnFirstImage:
        def __init__(self, rt):
            self.rt = rt

        def __getattr__(self, name):
            return getattr(self.rt, name)

        def __call__(self, px):
            out = self.rt(px)
            out["avg"][0, 3] = np.nan
            return out

    res, _ = _run(tiny_dataset, tmp_path / "c",
                  runtime_factory=lambda *a, **k: NaNOnFirstImage(reused_runtime(*a, **k)))
    assert res.n_failed == 3  # the first image of each of the 3 batches
    assert all("non-finite" in why for _, why in res.failures)
    fs = cache.read_features(res.path)
    assert len(fs.paths) == 9 and np.isfinite(fs.features).all()


def test_nan_in_a_usable_row_of_a_cache_is_a_clear_error(tiny_dataset, tmp_path):
    res, _ = _run(tiny_dataset, tmp_path / "c")
    with h5py.File(res.path, "r+") as f:  # written through HDF5, so its checksum is right: only the values say it
        row = f["features/avg"][2]
        row[7] = np.inf
        f["features/avg"][2] = row
    with pytest.raises(CacheError, match=r"1 usable row\(s\) of features/avg hold NaN or inf"):
        cache.read_features(res.path)


# ---- retries -----------------------------------------------------------------------------------------------------


def _break_keeping_size_and_mtime(path: Path) -> bytes:
    original = path.read_bytes()
    st = path.stat()
    path.write_bytes(b"\x00" * len(original))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return original


def _restore(path: Path, data: bytes) -> None:
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_failed_rows_are_retried_on_rerun_unless_asked_not_to(tiny_dataset, tmp_path):
    target = tiny_dataset / "red" / "img_02.jpg"
    original = _break_keeping_size_and_mtime(target)
    first, _ = _run(tiny_dataset, tmp_path / "c")
    assert [p for p, _ in first.failures] == ["red/img_02.jpg"]
    stamp = first.path.stat().st_mtime_ns

    same, msgs = _run(tiny_dataset, tmp_path / "c")  # still broken: retried, but the cache is not rewritten
    assert any("retrying 1 that failed before" in m for m in msgs)
    assert any("still failing the same way" in m for m in msgs) and first.path.stat().st_mtime_ns == stamp
    assert same.n_failed == 1 and not cache.parts_dir(first.path).exists()

    _restore(target, original)  # fixed without changing size or modification time (like a chmod)
    skipped, msgs = _run(tiny_dataset, tmp_path / "c", retry_failed=False)
    assert skipped.up_to_date and skipped.n_failed == 1
    fixed, msgs = _run(tiny_dataset, tmp_path / "c")
    assert fixed.n_extracted == 1 and fixed.n_failed == 0 and any("retrying 1" in m for m in msgs)
    clean, _ = _run(tiny_dataset, tmp_path / "clean")
    a, b = _features(fixed.path), _features(clean.path)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _as_unprivileged() -> list[str]:
    """Command prefix that runs without the power to read files the process has no permission for."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable to the process")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


def test_unreadable_file_is_a_failed_row_then_retried_once_readable(tiny_dataset, tmp_path):
    secret = tiny_dataset / "blue" / "img_01.jpg"
    secret.chmod(0)
    args = [sys.executable, str(REPO / "cli.py"), "extract", str(tiny_dataset), "--weights", "none",
            "--input-size", "64", "--alpha", "0.35", "--cache-dir", str(tmp_path / "c"), "--quiet",
            "--runtime", "keras"]  # no ONNX export in each of the two processes: the retry is what is tested
    try:
        proc = subprocess.run(_as_unprivileged() + args, capture_output=True, text=True, timeout=300)
    finally:
        secret.chmod(0o644)
    assert proc.returncode == 3, proc.stderr  # done, but an image failed
    assert "blue/img_01.jpg: cannot read file: Permission denied" in proc.stderr
    assert "cuInit" not in proc.stderr and "cudart_stub" not in proc.stderr  # TensorFlow's CUDA probing is quiet
    lines: list[str] = []  # the rerun in this process (the same options): no second TensorFlow start-up
    again = run_extract(tiny_dataset, tmp_path / "c", log=lines.append, weights="none", input_size=64, alpha=0.35,
                        runtime="keras")
    assert again.n_failed == 0 and again.n_extracted == 1, lines
    assert any("retrying 1 that failed before" in ln for ln in lines) and any("0 failed" in ln for ln in lines)


# ---- faults: disk full, read-only, free space ----------------------------------------------------------------------


def test_disk_full_is_one_line_keeps_parts_and_resumes(tiny_dataset, small_tmpfs):
    opts = dict(maps=True, maps_dtype="float32", checkpoint_rows=4)  # ~25 kB a row: 12 rows do not fit
    with pytest.raises(CacheError) as err:
        _run(tiny_dataset, small_tmpfs, **opts)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"disk full writing in {small_tmpfs}") and "rerun" in msg
    leftovers = [p for p in small_tmpfs.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, "a failed write must not leave its temporary file filling the disk"
    parts = sorted(small_tmpfs.rglob("part-*.h5"))
    assert parts, "finished parts must be kept"
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    res, msgs = _run(tiny_dataset, small_tmpfs, **opts)
    assert res.n_reused == 4 * len(parts) and any("from an interrupted run" in m for m in msgs)
    assert len(cache.read_features(res.path, "maps").paths) == 12


def test_read_only_cache_folder_is_one_line(tiny_dataset, small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(CacheError, match=r"cannot write in cache folder .* \(read-only file system\): pass "
                                         r"--cache-dir"):
        _run(tiny_dataset, small_tmpfs / "cache")


def test_free_space_is_checked_before_assembly(tiny_dataset, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(cache_write.shutil, "disk_usage",  # parts fit; the cache folder lacks room for the whole file
                        lambda p: real(p) if str(p).endswith(".parts") else real(p)._replace(free=10_000))
    with pytest.raises(CacheError, match=r"not enough free space in .* to assemble .*needs about .* free.*finished "
                                         r"rows are kept"):
        _run(tiny_dataset, tmp_path / "c")
    monkeypatch.setattr(cache_write.shutil, "disk_usage", real)
    res, msgs = _run(tiny_dataset, tmp_path / "c")
    assert res.n_reused == 12 and res.n_extracted == 0


# ---- bookkeeping ---------------------------------------------------------------------------------------------------


def test_parts_left_by_a_kill_after_the_rename_are_not_counted_twice(tiny_dataset, tmp_path):
    from pipeline.atomic import commit_file

    def commit_then_die(tmp, path):  # killed between the assembled cache's rename and the removal of its parts
        commit_file(tmp, path)
        if not path.parent.name.endswith(".parts"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_dataset, tmp_path / "c", commit=commit_then_die)
    [first] = (tmp_path / "c").glob("*.h5")
    seconds = cache.read_meta(first)["extract_seconds"]
    assert seconds > 0 and list(cache.parts_dir(first).glob("part-*.h5"))
    write_image(tiny_dataset / "red" / "late.png", np.zeros((30, 30, 3), np.uint8))
    new_parts = []

    def note_new_parts(tmp, path):
        commit_file(tmp, path)
        if path.parent.name.endswith(".parts"):
            with h5py.File(path, "r") as f:  # the part's own record, read apart from the scan under test
                new_parts.append(float(f.attrs["seconds"]))

    res, msgs = _run(tiny_dataset, tmp_path / "c", commit=note_new_parts)
    assert res.n_extracted == 1 and res.n_reused == 12
    assert not any("from an interrupted run" in m for m in msgs)
    assert any("discarded" in m and "earlier assembly" in m for m in msgs)
    meta = cache.read_meta(res.path)
    [new_part] = new_parts
    assert 0 < new_part  # the first run's rows are counted once: its own seconds plus the new part's
    assert meta["extract_seconds"] == pytest.approx(seconds + new_part, rel=1e-9)
    assert [r["rows"] for r in meta["runs"]] == [12, 1]


def test_demo_cache_is_apart_from_the_users_caches(tmp_path):
    from pipeline.demo import DEMO_DIR

    assert DEMO_DIR.parent == Path("cache") and DEMO_DIR != Path("cache")
    user = _tiny_set(tmp_path / "data", seed=3)
    res, _ = _run(user, tmp_path / "cache")
    sample = _tiny_set(tmp_path / "sample" / "lfw_faces", seed=4)
    _run(sample, tmp_path / DEMO_DIR)
    assert [c.path for c in cache.scan_folder(tmp_path / "cache").caches] == [res.path]  # what fit on cache/ sees
