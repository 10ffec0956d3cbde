"""Extraction stage on tiny generated datasets: cache contents, failures, incremental reruns, cache checks."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import reused_runtime, run_extract, write_image
from pipeline import cache
from pipeline.atomic import commit_file
from pipeline.cache import write as cache_write
from pipeline.errors import BackboneError, CacheError, DatasetError, WeightsError

FAST = dict(backbone="mobilenet_v2", weights="none", input_size=64, alpha=0.35, batch_size=4)


def _run(root, tmp_path, log=None, **kw):
    msgs: list[str] = []
    opts = FAST | kw
    res = run_extract(root, tmp_path / "cache", log=(log or msgs.append), **opts)
    return res, msgs


def _features_by_path(path: Path, kind: str = "avg") -> dict[str, np.ndarray]:
    fs = cache.read_features(path, kind)
    return dict(zip(fs.paths, fs.features))


def test_cache_holds_every_row_with_provenance(tiny_dataset, tmp_path):
    res, msgs = _run(tiny_dataset, tmp_path, command="python cli.py extract tiny")
    assert res.n_total == 12 and res.n_extracted == 12 and res.n_failed == 0
    assert any("RANDOM weights" in m for m in msgs)
    fs = cache.read_features(res.path)
    assert fs.features.shape == (12, 1280) and fs.features.dtype == np.float32
    assert np.isfinite(fs.features).all()
    assert fs.class_names == ["blue", "red"]
    assert fs.paths == sorted(fs.paths)
    assert [fs.class_names[y] for y in fs.labels] == [p.split("/")[0] for p in fs.paths]
    m = fs.meta
    assert m["schema_version"] == 2 and m["complete"] is True
    assert m["dataset_root"] == str(tiny_dataset.resolve()) and m["dataset_id"] == cache.dataset_id(tiny_dataset)
    assert res.path.name == f"tiny-{m['dataset_id'][:8]}__mobilenet_v2-a0.35-64__crop__random.h5"
    assert len(m["content_sha256"]) == 64 and fs.file_sha256 == m["content_sha256"]
    assert m["integrity"] == "fletcher32" and m["views"] == {"n": 0}
    (run,) = m["runs"]  # one extraction run made every row; it records its engine and runtime
    # auto: the runtime this machine's timing names (tests/test_runtime.py checks which and why)
    assert run["engine"] == "local" and run["runtime"] in ("onnxruntime", "keras") and run["rows"] == 12
    assert run["command"] == "python cli.py extract tiny" and run["runtime_version"]
    assert m["backbone"] == "mobilenet_v2" and m["input_size"] == 64 and m["alpha"] == 0.35
    assert m["preprocess"] == "keras.applications.mobilenet_v2.preprocess_input"
    assert m["weights_source"] == "none" and m["weights_sha256"] == ""
    assert m["resize"] == "crop" and m["command"] == "python cli.py extract tiny"
    assert {"tensorflow", "keras", "numpy"} <= set(m["versions"])
    assert not cache.parts_dir(res.path).exists()
    rows = cache.read_rows(res.path)
    assert all(len(h) == 64 for h in rows.sha256) and all(s > 0 for s in rows.size)


def test_random_weights_are_reproducible(tiny_dataset, tmp_path):
    a, _ = _run(tiny_dataset, tmp_path / "a")
    b, _ = _run(tiny_dataset, tmp_path / "b")
    fa, fb = _features_by_path(a.path), _features_by_path(b.path)
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_undecodable_files_are_recorded_not_dropped(tiny_dataset, tmp_path):
    (tiny_dataset / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (tiny_dataset / "red" / "img_00.jpg").read_bytes()
    (tiny_dataset / "blue" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tiny_dataset / "blue" / "empty.png").write_bytes(b"")
    res, msgs = _run(tiny_dataset, tmp_path)
    assert res.n_total == 15 and res.n_failed == 3
    failed = dict(res.failures)
    assert set(failed) == {"red/broken.jpg", "blue/truncated.jpg", "blue/empty.png"}
    assert all(reason for reason in failed.values())
    fs = cache.read_features(res.path)
    assert len(fs.paths) == 12 and dict(fs.failed) == failed
    with h5py.File(res.path) as f:  # failed rows are stored, with NaN features and the reason
        ok = f["rows/ok"][()]
        assert ok.sum() == 12 and np.isnan(f["features/avg"][()][~ok]).all()


def test_strict_stops_at_first_bad_image_and_keeps_finished_rows(tiny_dataset, tmp_path):
    (tiny_dataset / "red" / "zz_broken.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="zz_broken.jpg"):
        _run(tiny_dataset, tmp_path, strict=True)
    path = next((tmp_path / "cache").glob("*.h5.parts"))
    assert list(path.glob("part-*.h5")), "finished rows before the bad image must be kept"
    assert not list((tmp_path / "cache").glob("*.h5")), "nothing may look complete"
    res, msgs = _run(tiny_dataset, tmp_path)
    assert res.n_failed == 1 and res.n_reused > 0 and res.n_extracted == res.n_total - res.n_reused


def test_rerun_is_incremental(tiny_dataset, tmp_path):
    first, _ = _run(tiny_dataset, tmp_path)
    before = _features_by_path(first.path)
    again, msgs = _run(tiny_dataset, tmp_path)
    assert again.up_to_date and again.n_extracted == 0 and "up to date" in msgs[-1]

    rng = np.random.default_rng(1)
    for i in range(5):
        write_image(tiny_dataset / "red" / f"new_{i}.png", rng.integers(0, 255, (50, 50, 3), dtype=np.uint8))
    (tiny_dataset / "blue" / "img_03.jpg").unlink()
    changed = tiny_dataset / "blue" / "img_04.jpg"
    write_image(changed, np.zeros((30, 30, 3), np.uint8))
    res, msgs = _run(tiny_dataset, tmp_path)
    assert (res.n_extracted, res.n_dropped, res.n_reused) == (6, 1, 10)
    assert any("extracting 6" in m for m in msgs)
    after = _features_by_path(res.path)
    assert "blue/img_03.jpg" not in after and len(after) == 16
    for k in before:
        if k not in ("blue/img_03.jpg", "blue/img_04.jpg"):
            assert np.array_equal(before[k], after[k]), k
    assert not np.array_equal(before["blue/img_04.jpg"], after["blue/img_04.jpg"])


def test_new_class_relabels_without_reextracting(tiny_dataset, tmp_path):
    _run(tiny_dataset, tmp_path)
    for i in range(3):
        write_image(tiny_dataset / "green" / f"g{i}.jpg", np.full((40, 40, 3), (20, 200, 20), np.uint8))
    res, _ = _run(tiny_dataset, tmp_path)
    assert res.n_extracted == 3
    fs = cache.read_features(res.path)
    assert fs.class_names == ["blue", "green", "red"]
    assert [fs.class_names[y] for y in fs.labels] == [p.split("/")[0] for p in fs.paths]


def test_interrupted_run_resumes_from_parts(tiny_dataset, tmp_path, monkeypatch):
    calls = {"n": 0}

    class Flaky:
        """The real runtime, interrupted (as by Ctrl-C) on its fourth call."""

        def __init__(self, rt):
            self.rt = rt

        def __getattr__(self, name):
            return getattr(self.rt, name)

        def __call__(self, px):
            calls["n"] += 1
            if calls["n"] == 4:  # call 1 is the warm-up batch; interrupt after two real batches (8 rows)
                raise KeyboardInterrupt
            return self.rt(px)

    def flaky_runtime(*a, **k):
        return Flaky(reused_runtime(*a, **k))

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_dataset, tmp_path, checkpoint_rows=4, runtime_factory=flaky_runtime)
    assert not list((tmp_path / "cache").glob("*.h5")), "an interrupted run must not leave a complete-looking file"
    res, msgs = _run(tiny_dataset, tmp_path)
    assert res.n_reused == 8 and res.n_extracted == 4
    assert any("8 from an interrupted run" in m for m in msgs)
    clean, _ = _run(tiny_dataset, tmp_path / "clean")
    a, b = _features_by_path(res.path), _features_by_path(clean.path)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("batch, every, commits", [(8, 3, [3, 6, 9, 12]), (4, 6, [4, 8, 12])])
def test_a_crash_loses_at_most_checkpoint_rows_whatever_the_batch(tiny_dataset, tmp_path, monkeypatch, batch, every,
                                                                  commits):
    """A batch above --checkpoint-every is capped at it (one line); a part is committed before a batch that would
    take the uncommitted rows past it. Counted in images the model ran, not in time."""
    seen = {"images": 0, "calls": 0}
    at_commit: list[int] = []  # images the model had run when each part was committed

    class Counting:
        """The real runtime, counting the images of real batches (call 1 is the warm-up batch)."""

        def __init__(self, rt):
            self.rt = rt

        def __getattr__(self, name):
            return getattr(self.rt, name)

        def __call__(self, px):
            seen["calls"] += 1
            seen["images"] += len(px) if seen["calls"] > 1 else 0
            return self.rt(px)

    def commit(tmp, path):
        if path.parent.name.endswith(".parts"):
            at_commit.append(seen["images"])
        return commit_file(tmp, path)

    res, msgs = _run(tiny_dataset, tmp_path, batch_size=batch, checkpoint_rows=every, checkpoint_seconds=1e9,
                     runtime_factory=lambda *a, **k: Counting(reused_runtime(*a, **k)), commit=commit)
    capped = [m for m in msgs if m.startswith("--batch-size")]
    if batch > every:
        assert capped == [f"--batch-size {batch} is above --checkpoint-every {every}: running batches of {every} "
                          f"images, so that a crash loses at most {every} images of work"], msgs
    else:
        assert not capped
    assert at_commit == commits, at_commit
    assert all(b - a <= every for a, b in zip([0, *at_commit], at_commit))  # never more than `every` uncommitted
    assert res.n_extracted == 12


def test_maps_and_max_pool_are_stored(tiny_dataset, tmp_path):
    res, _ = _run(tiny_dataset, tmp_path, maps=True, max_pool=True)
    maps = cache.read_features(res.path, "maps")
    assert maps.features.shape == (12, 2, 2, 1280) and maps.features.dtype == np.float16
    mx = cache.read_features(res.path, "max").features
    avg = cache.read_features(res.path, "avg").features
    np.testing.assert_allclose(maps.features.astype(np.float32).mean(axis=(1, 2)), avg, atol=2e-2, rtol=1e-2)
    assert (mx >= avg - 1e-5).all()


def test_read_checks_what_the_caller_expects(tiny_dataset, tmp_path):
    res, _ = _run(tiny_dataset, tmp_path)
    with pytest.raises(CacheError, match=r"input_size=64 \(expected 224\).*python cli.py extract"):
        cache.read_features(res.path, expect={"input_size": 224})
    with pytest.raises(CacheError, match="not 'maps'.*--maps"):
        cache.read_features(res.path, "maps")
    with h5py.File(res.path, "r+") as f:  # a cache whose recorded preprocessing is not its backbone's
        f.attrs["preprocess"] = "keras.applications.resnet50.preprocess_input"
    with pytest.raises(CacheError, match="preprocess="):
        cache.read_features(res.path)


def test_wrong_or_broken_cache_files_are_clear_errors(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        cache.read_features(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(CacheError, match="not a readable HDF5"):
        cache.read_features(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["something"] = 1
    with pytest.raises(CacheError, match="not a headbench feature cache"):
        cache.read_features(other)
    newer = tmp_path / "newer.h5"
    with h5py.File(newer, "w") as f:
        f.attrs["format"] = cache.FORMAT_NAME
        f.attrs["schema_version"] = 99
    with pytest.raises(CacheError, match="schema version 99"):
        cache.read_features(newer)


def test_bad_options_are_clear_errors(tiny_dataset, tmp_path):
    with pytest.raises(BackboneError, match="registered: mobilenet, mobilenet_v2, inception_v3"):
        _run(tiny_dataset, tmp_path, backbone="vgg99")
    with pytest.raises(BackboneError, match="alpha"):
        _run(tiny_dataset, tmp_path, alpha=0.6)
    with pytest.raises(BackboneError, match="resize"):
        _run(tiny_dataset, tmp_path, resize="zoom")
    with pytest.raises(WeightsError, match="does not exist"):
        _run(tiny_dataset, tmp_path, weights=str(tmp_path / "missing.weights.h5"))
    txt = tmp_path / "w.txt"
    txt.write_text("x")
    with pytest.raises(WeightsError, match="not a .weights.h5"):
        _run(tiny_dataset, tmp_path, weights=str(txt))


@pytest.mark.parametrize("version", [1, 2])
def test_cache_files_of_every_schema_still_read(version):
    """Files of each schema, kept as test data (tests/data), must stay readable by every later version."""
    path = Path(__file__).parent / "data" / f"cache_v{version}_tiny.h5"
    fs = cache.read_features(path)
    assert fs.meta["schema_version"] == version
    assert fs.features.shape == (6, 1280) and len(fs.paths) == len(fs.labels) == 6
    assert fs.class_names == ["blue", "red"] and [p for p, _ in fs.failed] == ["red/broken.jpg"]
    assert np.isfinite(fs.features).all()
    assert fs.file_sha256 == ("" if version == 1 else fs.meta["content_sha256"])
    if version >= 2:
        cache.verify(path)


def test_copying_a_dataset_keeps_rows_keyed_by_relative_path(tiny_dataset, tmp_path):
    res, _ = _run(tiny_dataset, tmp_path)
    moved = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(tiny_dataset, moved)
    res2, _ = _run(moved, tmp_path / "c2")
    a, b = _features_by_path(res.path), _features_by_path(res2.path)
    assert a.keys() == b.keys()


def test_temporary_files_of_a_killed_write_are_cleaned_up(tiny_dataset, tmp_path):
    first, _ = _run(tiny_dataset, tmp_path)
    leftover = first.path.with_name(f".{first.path.name}.4242.tmp")  # an assembly killed before its rename
    leftover.write_bytes(b"half a file")
    write_image(tiny_dataset / "red" / "new.png", np.zeros((20, 20, 3), np.uint8))
    res, msgs = _run(tiny_dataset, tmp_path)
    assert res.n_extracted == 1 and not leftover.exists()
    assert any("discarded 1 leftover" in m for m in msgs)
    assert len(cache.read_features(res.path).paths) == 13


def test_extract_never_overwrites_a_cache_of_a_newer_schema(tiny_dataset, tmp_path):
    res, _ = _run(tiny_dataset, tmp_path)
    with h5py.File(res.path, "a") as f:  # as if a newer headbench sharing the folder had written it
        f.attrs["schema_version"] = 99
    before = res.path.read_bytes()
    with pytest.raises(CacheError, match="schema_version 99, newer than this headbench") as err:
        _run(tiny_dataset, tmp_path)
    assert "\n" not in str(err.value) and res.path.read_bytes() == before


def test_a_cache_without_its_features_dataset_is_called_damaged_and_rebuilt(tiny_dataset, tmp_path):
    res, _ = _run(tiny_dataset, tmp_path)
    want = _features_by_path(res.path)
    with h5py.File(res.path, "a") as f:
        del f["features/avg"]
    with pytest.raises(CacheError, match="features/avg dataset is missing") as err:
        cache.open_features(res.path)
    assert "\n" not in str(err.value)
    again, msgs = _run(tiny_dataset, tmp_path)  # extract rebuilds it, saying why
    assert any("features/avg dataset is missing" in m for m in msgs), msgs
    got = _features_by_path(again.path)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def _long_named_copy(tiny_dataset: Path, tmp_path: Path, length: int) -> Path:
    """The tiny dataset under a folder name of ``length`` characters."""
    root = tmp_path / ("d" * (length - 4) + "_set")
    shutil.copytree(tiny_dataset, root)
    return root


@pytest.mark.parametrize("length", [195, 205])
def test_a_long_dataset_name_that_fits_is_extracted_with_every_name_within_the_limit(tiny_dataset, tmp_path,
                                                                                     monkeypatch, length):
    """195: the cache name fits but its temporary names did not; 205: its .parts and .lock names did not either."""
    root = _long_named_copy(tiny_dataset, tmp_path, length)
    names: set[str] = set()
    real_open = cache_write.os.open

    def commit(tmp, path):  # every temporary and final name a write uses
        names.update({Path(tmp).name, Path(path).name, Path(path).parent.name})
        return commit_file(tmp, path)

    def open_(path, *a, **k):  # the lock, among others
        names.add(Path(path).name)
        return real_open(path, *a, **k)

    monkeypatch.setattr(cache_write.os, "open", open_)
    res, _ = _run(root, tmp_path, checkpoint_rows=4, commit=commit)  # three parts, then the assembly
    monkeypatch.setattr(cache_write.os, "open", real_open)
    assert res.n_extracted == 12 and len(cache.read_features(res.path).paths) == 12
    assert 240 <= len(res.path.name) <= 255 and res.path.name in names
    assert any(n.endswith(".parts") for n in names) and any(n.endswith(".lock") for n in names)
    assert max(len(n.encode()) for n in names) <= 255, sorted(names, key=len)[-3:]
    leftover = cache.temp_path(res.path, "4242.abcdef")  # a write killed before its rename: found and removed
    leftover.write_bytes(b"half a file")
    write_image(root / "red" / "new.png", np.zeros((20, 20, 3), np.uint8))
    again, msgs = _run(root, tmp_path)
    assert again.n_extracted == 1 and not leftover.exists() and any("discarded 1 leftover" in m for m in msgs)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [res.path.name]
    cache.parts_dir(res.path).mkdir()  # left by a kill after the assembly's rename: not an unfinished cache
    assert cache.scan_folder(tmp_path / "cache").unfinished == []
    res.path.unlink()  # an extraction that never finished: fit names it, by its parts folder
    assert [p.name + ".parts" for p in cache.scan_folder(tmp_path / "cache").unfinished] == \
        [cache.parts_dir(res.path).name]


def _no_extraction(*a, **k):
    pytest.fail("no extraction may start")


def test_a_cache_name_that_cannot_fit_is_refused_before_any_work(tiny_dataset, tmp_path, capsys):
    import cli

    root = _long_named_copy(tiny_dataset, tmp_path, 210)  # its cache name would be 259 bytes
    with pytest.raises(CacheError, match=r"would be 259 bytes, more than the 255 a file name may have in .*: "
                                         r"rename the dataset folder .* to at most 206 bytes \(or pass --cache-dir"):
        _run(root, tmp_path, runtime_factory=lambda *a, **k: pytest.fail("no model may be built"))
    assert not (tmp_path / "cache").exists()
    # The command line's path, end to end with the real extraction (extract_all refuses before it starts, as the
    # next test shows with its seam): what is checked here is the command's wording, one line and exit 1.
    with pytest.raises(SystemExit) as status:
        cli.main(["extract", str(root), "--weights", "none", "--cache-dir", str(tmp_path / "c")], quiet_native=False)
    err = capsys.readouterr().err
    assert status.value.code == 1 and err.count("\n") == 1 and "would be" in err and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()


def test_extract_all_checks_every_backbone_before_the_first_is_extracted(tiny_dataset, tmp_path):
    """The last backbone's cache name (one byte longer than the first's) or options stop the command before the
    first backbone's extraction starts."""
    from pipeline.extract import ExtractOptions, extract_all

    root = _long_named_copy(tiny_dataset, tmp_path, 207)  # mobilenet_v2-a1.0-64's name is 255 bytes: it fits
    opts = ExtractOptions(weights="none", input_size=64, cache_dir=tmp_path / "c")
    with pytest.raises(CacheError, match=r"would be 256 bytes"):  # mobilenet_v3_small-64, one byte more
        extract_all(root, opts, ["mobilenet_v2", "mobilenet_v3_small"], log=lambda m: None, extract=_no_extraction)
    extract_all(root, opts, ["mobilenet_v2"], log=lambda m: None, extract=lambda ds, cfg, log: None)  # it fits
    with pytest.raises(BackboneError, match="mobilenet_v3_small"):  # MobileNetV3 has no width multiplier option
        extract_all(tiny_dataset, replace(opts, alpha=0.35), ["mobilenet_v2", "mobilenet_v3_small"],
                    log=lambda m: None, extract=_no_extraction)
    assert not (tmp_path / "c").exists()


def test_extract_all_says_the_dataset_line_then_extracts_each_backbone_in_order(tiny_dataset, tmp_path):
    """One line about the folder (unreadable entries named) before the first extraction; each result is handed to
    ``done`` as it comes and returned in the backbones' order; the batch cap is said once, not per backbone."""
    from pipeline.extract import ExtractOptions, ExtractResult, extract_all

    (tiny_dataset / "red" / "ghost.jpg").symlink_to(tmp_path / "moved_away.jpg")  # a dangling link
    msgs: list[str] = []
    calls: list[tuple[str, int, list[str]]] = []
    done: list[ExtractResult] = []

    def extract(ds, cfg, log):  # no model is built: what the orchestration hands each extraction
        calls.append((cfg.model.backbone, cfg.batch_size, list(msgs)))
        return ExtractResult(Path(cfg.label), len(ds.items), 0, 0, 0, 0)

    opts = ExtractOptions(weights="none", input_size=64, batch_size=64, checkpoint_rows=8, cache_dir=tmp_path / "c")
    results = extract_all(tiny_dataset, opts, ["mobilenet_v3_small", "mobilenet_v2"], log=msgs.append,
                          done=done.append, extract=extract)
    line = f"{tiny_dataset}: 12 images in 2 classes; ignored 1 unreadable (red/ghost.jpg: dangling symbolic link)"
    assert [c[:2] for c in calls] == [("mobilenet_v3_small", 8), ("mobilenet_v2", 8)]
    assert line in calls[0][2], calls[0][2]
    assert sum("--batch-size 64 is above --checkpoint-every 8" in m for m in msgs) == 1, msgs
    assert [r.path.name for r in results] == ["mobilenet_v3_small-64", "mobilenet_v2-a1.0-64"] and done == results


@pytest.mark.parametrize("kind", ["thread", "process"])
@pytest.mark.parametrize("batch, workers", [(5, 1), (5, 3), (32, 2), (1, 2)])
def test_reader_yields_every_image_in_order_in_whole_batches_whatever_its_chunks(tiny_dataset, batch, workers,
                                                                                 kind):
    """Decoding tasks take several images each (CHUNK_IMAGES); batches still come in the folder's order, full but
    the last, with an undecodable file in its place, and the same pixels as decoding each image alone."""
    from pipeline.data import discover
    from pipeline.reader import decode_item, read_batches

    (tiny_dataset / "red" / "img_03.jpg").write_bytes(b"not an image")
    ds = discover(tiny_dataset)
    batches = list(read_batches(ds.root, ds.items, 24, "crop", batch, workers, kind=kind))
    assert [len(b) for b in batches[:-1]] == [batch] * (len(batches) - 1) and 0 < len(batches[-1]) <= batch
    got = [d for b in batches for d in b]
    assert [d.item.relpath for d in got] == [it.relpath for it in ds.items]
    for d in got:
        alone = decode_item(ds.root, d.item, 24, "crop")
        assert d.error == alone.error and d.sha256 == alone.sha256
        assert (d.pixels is None and "img_03" in d.item.relpath) or np.array_equal(d.pixels, alone.pixels)
    assert sum(d.pixels is None for d in got) == 1
