"""The reader's two kinds of worker: the rule that picks one, the same rows from both, and what a decoding process
that dies, or never starts, costs."""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image
from pipeline.data import discover
from pipeline.reader import (CHILD_ENV, CRASHED, PROCESS_MIN_IMAGES, Decoded, ReaderPlan, _Copies, decode_item,
                             plan_reader, read_batches)
from pipeline.views import make_view_spec

MIB = 2**20


def one_slow_process(root, item, size, resize, views=None):
    """A decoder that says which process decoded each image (as its digest). The first process to decode anything
    takes 30 ms on each image from ``img_040`` on (as one given a run of large photos would), the other none; the
    first images are quick in both, so both processes have started before the difference begins."""
    if not hasattr(one_slow_process, "slow"):
        try:
            os.close(os.open(Path(root) / ".slow", os.O_CREAT | os.O_EXCL))
            one_slow_process.slow = True
        except FileExistsError:
            one_slow_process.slow = False
    if one_slow_process.slow and int(Path(item.relpath).stem.split("_")[1]) >= 40:
        time.sleep(0.03)
    return Decoded(item, np.zeros((size, size, 3), np.uint8), str(os.getpid()), "")


def chatty(root, item, size, resize, views=None):
    """A decoder that writes to the process's stdout as native code would (straight to file descriptor 1), and
    through Python's print."""
    os.write(1, b"\xff" * 64 + b" libfoo: warning\n")
    print("a stray print")
    return decode_item(root, item, size, resize, views)


def crash_on_boom(root, item, size, resize, views=None):
    """A decoder that dies (as a native crash does: no exception, no cleanup) on files named ``boom*``."""
    if Path(item.relpath).name.startswith("boom"):
        os._exit(70)
    return decode_item(root, item, size, resize, views)


def malloc_settings(root, item, size, resize, views=None):
    """A decoder that reports, as its row's error, the heap settings its process runs with."""
    return Decoded(item, None, "", " ".join(f"{k}={os.environ.get(k)}" for k in sorted(CHILD_ENV)))


def _reader_children() -> list[int]:
    """Live decoding processes started by this process."""
    me, found = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z" and b"pipeline.reader" in cmd:
            found.append(int(pid))
    return found


def _in_shared_block(a: np.ndarray) -> bool:
    """Whether ``a``'s pixels lie in a decoding pool's shared block (this process's map of it)."""
    address = a.__array_interface__["data"][0]
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *_, name = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in span.split("-"))
        if "headbench-decode-" in name and start <= address < end:
            return True
    return False


def _folder(root: Path, n: int, crash: tuple[int, ...] = ()) -> Path:
    rng = np.random.default_rng(3)
    for i in range(n):
        name = f"boom_{i:03d}.png" if i in crash else f"img_{i:03d}.png"
        write_image(root / ("a" if i % 2 else "b") / name, rng.integers(0, 255, (20 + i % 7, 30, 3), np.uint8))
    return root


def _rows(root, items, kind, workers=2, batch=4, **kw):
    return [d for b in read_batches(root, items, 16, "crop", batch, workers, kind=kind, **kw) for d in b]


def test_plan_takes_processes_only_to_feed_a_gpu_a_job_that_pays_for_them_within_shared_memory():
    big = plan_reader(PROCESS_MIN_IMAGES, 2, 32, 224 * 224 * 3, shm_free=1024 * MIB, gpu=True)
    assert (big.kind, big.workers, big.chunk, big.reason) == ("process", 2, 8, "")
    assert big.describe() == "2 decoding processes" and big.lend == 2 * 4 + 1  # two batches of 4 chunks, and one
    tight = plan_reader(10_000, 2, 32, 299 * 299 * 3, shm_free=64 * MIB, gpu=True)  # a container's default /dev/shm
    assert tight.kind == "process" and tight.lend == 0  # room for the slots, not for lending more: rows are copied
    beside_cpu_model = plan_reader(100_000, 2, 32, 224 * 224 * 3, shm_free=1024 * MIB, gpu=False)
    assert beside_cpu_model.kind == "thread" and beside_cpu_model.describe() == "2 decoding threads"
    small = plan_reader(PROCESS_MIN_IMAGES - 1, 2, 32, 224 * 224 * 3, shm_free=1024 * MIB, gpu=True)
    assert small.kind == "thread" and small.describe() == f"2 decoding threads ({PROCESS_MIN_IMAGES - 1} images: " \
                                                          f"fewer than {PROCESS_MIN_IMAGES})"
    no_shm = plan_reader(10_000, 2, 32, 224 * 224 * 3, shm_free=None, gpu=True)
    assert no_shm.reason == "no /dev/shm for the decoded pixels"
    crowded = plan_reader(10_000, 2, 32, 16 * 224 * 224 * 3, shm_free=64 * MIB, gpu=True)  # 15 views, 64 MiB
    assert crowded.kind == "thread" and "/dev/shm has 64 MiB free" in crowded.reason
    # asked for, a kind is kept where it can run; processes without /dev/shm still get threads, saying why
    assert plan_reader(3, 1, 32, 100, kind="process", shm_free=MIB).kind == "process"
    assert plan_reader(10_000, 2, 32, 100, kind="thread", shm_free=1024 * MIB).kind == "thread"
    assert plan_reader(10, 1, 32, 100, kind="process", shm_free=None).kind == "thread"
    assert plan_reader(10, 1, 2, 100, kind="process", shm_free=MIB).chunk == 2  # a small batch, small tasks
    with pytest.raises(ValueError, match="known: auto, process, thread"):
        plan_reader(10, 1, 32, 100, kind="fork")


def test_processes_and_threads_give_the_same_rows_with_views_and_failures(tiny_dataset):
    (tiny_dataset / "red" / "img_03.jpg").write_bytes(b"not an image")
    (tiny_dataset / "blue" / "img_01.jpg").chmod(0)
    ds = discover(tiny_dataset)
    views = make_view_spec(2, "flip,crop,color", 5)
    before = set(os.listdir("/dev/shm"))
    got = {kind: _rows(ds.root, ds.items, kind, views=views) for kind in ("thread", "process")}
    for a, b in zip(*got.values(), strict=True):
        assert (a.item, a.sha256, a.error) == (b.item, b.sha256, b.error)
        assert (a.pixels is None) == (b.pixels is None) and (a.views is None) == (b.views is None)
        if a.pixels is not None:
            assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.views, b.views)
            assert b.views.shape == (2, 16, 16, 3)
    failed = [d.item.relpath for d in got["process"] if d.pixels is None]
    assert "red/img_03.jpg" in failed and (os.geteuid() == 0 or "blue/img_01.jpg" in failed)
    assert set(os.listdir("/dev/shm")) == before and _reader_children() == []


def test_rows_a_consumer_keeps_stay_intact_while_the_reader_goes_on(tmp_path):
    root = _folder(tmp_path / "many", 96)
    ds = discover(root)
    kept = []
    for i, batch in enumerate(read_batches(root, ds.items, 16, "crop", 4, 2, kind="process")):
        if i % 3 == 0:  # a consumer that keeps some rows (as a list of results would) and lets the others go
            kept.extend(batch)
    assert len(kept) == 32
    for d in kept:  # later chunks were never decoded or copied over a row still held
        assert np.array_equal(d.pixels, decode_item(root, d.item, 16, "crop").pixels), d.item.relpath
    lent = [_in_shared_block(d.pixels) for d in kept]
    assert any(lent) and not all(lent)  # the first kept rows were lent; once every lendable slot was held, copies


def test_rows_are_lent_out_of_the_shared_block_while_the_consumer_lets_them_go(tmp_path):
    """No copy between the processes and the consumer: each row is a view of the slot it was decoded into, and
    the slot serves again (with a later chunk) only once the consumer has let its rows go."""
    root = _folder(tmp_path / "many", 96)
    ds = discover(root)
    seen = set()
    for batch in read_batches(root, ds.items, 16, "crop", 4, 2, kind="process"):
        for d in batch:
            assert _in_shared_block(d.pixels), d.item.relpath
            assert np.array_equal(d.pixels, decode_item(root, d.item, 16, "crop").pixels), d.item.relpath
            seen.add(d.pixels.__array_interface__["data"][0])
    assert len(seen) < 96  # slots served again: far fewer places than rows


def test_a_copy_buffer_serves_again_once_its_last_row_is_gone_and_never_before():
    copies = _Copies((4, 1, 2, 2, 3), keep=2)
    first = copies.take(np.full((4, 1, 2, 2, 3), 1, np.uint8))
    row = first[1, 0][::-1, 1:]  # a view of a view still holds the buffer
    del first
    second = copies.take(np.full((3, 1, 2, 2, 3), 2, np.uint8))  # a short chunk
    assert second.shape[0] == 3 and int(row.max()) == 1
    memory = [np.frombuffer(b, np.uint8) for b, _ in copies.buffers]
    assert len(memory) == 2 and not np.shares_memory(second, memory[0]) and np.shares_memory(row, memory[0])
    third = copies.take(np.full((4, 1, 2, 2, 3), 3, np.uint8))  # both buffers held: a plain copy
    assert not any(np.shares_memory(third, m) for m in memory) and len(copies.buffers) == 2
    del row
    fourth = copies.take(np.full((4, 1, 2, 2, 3), 4, np.uint8))
    assert np.shares_memory(fourth, memory[0]) and int(second.max()) == 2 and int(third.max()) == 3


def test_chunks_go_to_the_process_that_has_decoded_its_share_not_in_turn(tmp_path):
    root = tmp_path / "set"
    for i in range(96):  # in name order, which is the job's order
        write_image(root / ("a" if i < 95 else "b") / f"img_{i:03d}.png", np.zeros((8, 8, 3), np.uint8))
    ds = discover(root)
    rows = _rows(ds.root, ds.items, "process", workers=2, batch=8, decode=one_slow_process)
    assert [d.item.relpath for d in rows] == [it.relpath for it in ds.items]
    late = [d for d in rows if int(Path(d.item.relpath).stem.split("_")[1]) >= 40]  # 56 images, 14 chunks of 4
    processes = {d.sha256 for d in rows}
    late_by = collections.Counter(d.sha256 for d in late)
    # In turn, each process would take exactly 7 of these chunks (28 images) and the quick one would wait on the
    # slow one; by what each has decoded, the slow one gets fewer (how many fewer depends on the machine's timing).
    assert len(processes) == 2 and min(late_by[p] for p in processes) < 28, late_by


def test_a_chunk_goes_to_the_process_with_fewest_unanswered_then_the_one_that_answered_most():
    from types import SimpleNamespace

    from pipeline.reader import least_busy

    def w(unanswered, answered):
        return SimpleNamespace(tasks=[None] * unanswered, answered=answered)

    a, b = w(1, 40), w(0, 3)
    assert least_busy([a, b]) is b  # fewer chunks waiting wins, however many were answered
    a, b = w(0, 3), w(0, 40)
    assert least_busy([a, b]) is b  # a tie goes to the quicker process so far, not to the first one
    a, b = w(2, 7), w(2, 7)
    assert least_busy([a, b]) is a  # equals take turns (the caller's order)


def test_what_a_decoder_writes_to_stdout_does_not_reach_the_answers(tmp_path):
    root = _folder(tmp_path / "set", 12)
    ds = discover(root)
    rows = _rows(ds.root, ds.items, "process", decode=chatty)
    assert [d.error for d in rows] == [""] * 12
    for d in rows:
        assert np.array_equal(d.pixels, decode_item(ds.root, d.item, 16, "crop").pixels)


def test_a_process_dying_on_an_image_costs_that_image_only(tmp_path):
    """Two files kill the process that decodes them: each is a failed row saying so, every other image is decoded
    (those of the dead process's later tasks too), in order, and no process is left behind."""
    root = _folder(tmp_path / "set", 40, crash=(5, 6, 23))
    ds = discover(root)
    rows = _rows(ds.root, ds.items, "process", decode=crash_on_boom)
    assert [d.item.relpath for d in rows] == [it.relpath for it in ds.items]
    for d in rows:
        if Path(d.item.relpath).name.startswith("boom"):
            assert d.pixels is None and d.error == CRASHED
        else:
            assert d.error == "" and np.array_equal(d.pixels, decode_item(ds.root, d.item, 16, "crop").pixels)
    assert sum(d.error == CRASHED for d in rows) == 3
    assert _reader_children() == []


def test_decoding_processes_keep_their_heap_and_one_blas_thread_unless_the_user_set_them(tiny_dataset, monkeypatch):
    """A decoding process's large arrays come from a kept heap (no page faults per image) and NumPy starts one BLAS
    thread in it (see CHILD_ENV); a user's own settings are passed on as they are."""
    ds = discover(tiny_dataset)
    for key in CHILD_ENV:
        monkeypatch.delenv(key, raising=False)
    want = " ".join(f"{k}={CHILD_ENV[k]}" for k in sorted(CHILD_ENV))
    assert {d.error for d in _rows(ds.root, ds.items, "process", decode=malloc_settings)} == {want}
    assert {d.error for d in _rows(ds.root, ds.items, "thread", decode=malloc_settings)} == {
        " ".join(f"{k}=None" for k in sorted(CHILD_ENV))}  # the command's own process is left as it is
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    (got,) = {d.error for d in _rows(ds.root, ds.items, "process", decode=malloc_settings)}
    assert "MALLOC_MMAP_THRESHOLD_=65536" in got and f"MALLOC_TRIM_THRESHOLD_={CHILD_ENV['MALLOC_TRIM_THRESHOLD_']}" in got


def test_processes_that_cannot_start_leave_the_work_to_threads_saying_so(tiny_dataset, tmp_path):
    ds = discover(tiny_dataset)
    plan = ReaderPlan("process", 2, 4, 12, shm_folder=str(tmp_path / "no-such-folder"))
    said: list[str] = []
    rows = [d for b in read_batches(ds.root, ds.items, 16, "crop", 4, 2, plan=plan, log=said.append) for d in b]
    assert len(said) == 1 and "decoding processes could not start" in said[0] and "2 decoding thread(s)" in said[0]
    assert [d.item for d in rows] == ds.items and all(d.pixels is not None for d in rows)


def test_a_consumer_that_stops_early_stops_the_processes(tmp_path):
    """An engine that stops mid-run (a fault, Ctrl-C) closes the reader: its processes exit, nothing stays in
    /dev/shm."""
    ds = discover(_folder(tmp_path / "set", 48))
    before = set(os.listdir("/dev/shm"))
    batches = read_batches(ds.root, ds.items, 16, "crop", 4, 2, kind="process")
    first = next(batches)
    assert len(first) == 4 and len(_reader_children()) == 2
    batches.close()
    assert _reader_children() == [] and set(os.listdir("/dev/shm")) == before
