"""The reader: a bounded pool that reads, hashes and decodes images ahead of the model, for ``extract`` and ``predict``.

Two kinds of worker do the same work (:func:`decode_item`, so a row's pixels never depend on which ran it):

* **processes** (the default when the model runs on a GPU, for a job of :data:`PROCESS_MIN_IMAGES` images or
  more): each decodes a chunk of images into a slot of one shared-memory block (an unlinked file in ``/dev/shm``,
  handed to each process as an open file descriptor, so nothing is left behind whatever happens) and sends back only
  digests and errors over a pipe; the rows handed to the consumer are views of that slot, which serves again once
  no row of it is held (a consumer that keeps rows gets copies instead: :class:`_ProcessPool`). Each process has
  its own interpreter, so the per-image Python steps (opening the file, Pillow's header parsing, EXIF, array
  wrapping: about 0.1 ms of a 128-px image's 0.5 ms) run in parallel instead of taking turns on one GIL. Decoding
  then scales with cores on small images as it does on large ones, which a GPU fed by 8-16 cores needs
  (docs/benchmarks.md).
* **threads**: when the model runs on the same CPU cores (decoding is then a small share of the work and threads
  keep up with the model, with no start-up: see :func:`plan_reader`); below :data:`PROCESS_MIN_IMAGES` images, where
  starting the processes (0.1-0.2 s: a fresh interpreter imports NumPy and Pillow) would cost as much as the
  decoding; where ``/dev/shm`` is missing (macOS, Windows) or lacks room for the slots (a container's default is
  64 MiB, and a full shared-memory file system fails with SIGBUS, not an error); and when the processes cannot start
  (said in one line, then threads decode). Pillow and libjpeg-turbo release the GIL while they decode and resize,
  so threads still overlap most of the work.

Each process is a fresh interpreter (``python -c``, never a fork of a process that already runs TensorFlow's or
ONNX Runtime's threads, and never a re-import of the command's own script, which ``multiprocessing`` would do),
in a session of its own so that Ctrl-C reaches only the command (which stops them), and it exits when the command's
end of its pipe closes, even after a ``kill -9``. A process that dies on an image (a crash inside a native
decoder, or the out-of-memory killer) costs that image only: it is started again, the chunk it was decoding is
decoded one image at a time, and the image on which it dies again is a failed row with that reason
(:data:`CRASHED`); its other chunks are sent again, in order.

At most a few batches are in flight, so memory stays flat whatever the dataset size. With augmented views
(:mod:`pipeline.views`) each image is decoded once (:func:`pipeline.views.read_views`) and its views are rendered
from the decoded pixels by the same worker.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
import traceback
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

import numpy as np

from pipeline.data import ImageItem
from pipeline.errors import DatasetError, ImageDecodeError
from pipeline.views import ViewSpec, read_views

READER_KINDS = ("auto", "process", "thread")
"""``auto``: processes or threads by :func:`plan_reader`'s rule; the others ask for one kind."""

PROCESS_MIN_IMAGES = 256
"""Fewest images for which ``auto`` starts decoding processes. They take 0.1-0.2 s to start (each a fresh
interpreter importing NumPy and Pillow: 0.11 s of waiting for the first batch on a 2-core machine, 0.2 s before
:data:`CHILD_ENV` gave each one BLAS thread), in which one thread decodes 200-400 small or 50-100 large images; below this the
GIL's share of the work is not worth that."""

SHM_FOLDER = "/dev/shm"
"""Where the slots live: a RAM file system on Linux (processes are not used where it is missing)."""

CRASHED = "the decoding process died on this file (a crash inside the image decoder, or out of memory)"


@dataclass
class Decoded:
    """One image read by the reader.

    Attributes
    ----------
    item : ImageItem
    pixels : np.ndarray or None
        Centre view ``(s, s, 3)`` uint8; None when the image could not be decoded.
    sha256 : str
        Hex digest of the file's bytes ("" when unreadable).
    error : str
        Why it failed ("" when it did not).
    views : np.ndarray or None
        Augmented views ``(K, s, s, 3)`` uint8 when the spec asks for some (None otherwise, and for failed images).
    """

    item: ImageItem
    pixels: np.ndarray | None
    sha256: str
    error: str
    views: np.ndarray | None = None


def decode_item(root: Path, item: ImageItem, size: int, resize: str, views: ViewSpec | None = None) -> Decoded:
    """Read and decode one image (and render its views); a failure is returned with its reason, never raised.

    A file that cannot be read or decoded fails the whole row: no centre view, no views.
    """
    try:
        centre, extra, digest = read_views(root / item.relpath, size, resize, views)
    except ImageDecodeError as exc:  # unreadable: no digest; undecodable: the digest of the bytes read
        return Decoded(item, None, getattr(exc, "sha256", ""), str(exc))
    return Decoded(item, centre, digest, "", extra)


Decode = Callable[[Path, ImageItem, int, str, "ViewSpec | None"], Decoded]
"""One image -> :class:`Decoded` (:func:`decode_item`; a seam for tests). For processes it must be importable by
name (a module-level function)."""

CHUNK_IMAGES = 8
"""Images one decoding task reads in turn. A task per image cost 0.15 ms of CPU per image in the thread pool's hand-offs
(future, queue, wake-up: measured 0.60 against 0.45 ms per image for the same work in a plain loop, on 128 px
flowers), a quarter of a small image's whole decoding, and all of it under the GIL, where threads cannot share it.
Eight images per task make that overhead an eighth, while a 32-image batch still spreads over four tasks, so that two
to eight threads all work on it."""


@dataclass(frozen=True)
class ReaderPlan:
    """How a job is decoded: the kind of worker, how many, images per task and images in flight.

    Attributes
    ----------
    kind : {"process", "thread"}
    workers : int
    chunk : int
        Images per task.
    ahead : int
        Most images decoded ahead of the consumer (each with its views).
    lend : int
        Slots whose rows processes may hand to the consumer as they are, without a copy (:class:`_ProcessPool`):
        enough for the batch the consumer holds and the one being collected, where ``/dev/shm`` has room for them
        too; 0 copies every chunk.
    reason : str
        Why this kind, for the log ("" when it was asked for).
    shm_folder : str
        Where the processes' shared block is made (:data:`SHM_FOLDER`).
    """

    kind: str
    workers: int
    chunk: int
    ahead: int
    lend: int = 0
    reason: str = ""
    shm_folder: str = SHM_FOLDER

    def describe(self) -> str:
        """e.g. ``2 decoding processes`` or ``2 decoding threads (48 images: fewer than 256)``."""
        noun = "process" if self.kind == "process" else "thread"
        plural = "es" if noun == "process" else "s"
        text = f"{self.workers} decoding {noun}{plural if self.workers != 1 else ''}"
        return f"{text} ({self.reason})" if self.reason else text


def shm_free_bytes(folder: str = SHM_FOLDER) -> int | None:
    """Free bytes of the shared-memory file system (None where there is no such folder, as on macOS)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def plan_reader(n_images: int, workers: int, batch_size: int, image_bytes: int, kind: str = "auto",
                shm_free: int | None = None, gpu: bool = False) -> ReaderPlan:
    """Choose the reader's workers for a job (pure: the machine's facts are arguments).

    Parameters
    ----------
    n_images : int
        Images to decode.
    workers : int
        Decoding workers (at least 1).
    batch_size : int
        Images the consumer takes at a time.
    image_bytes : int
        Bytes of one decoded image with its views (``(1 + K) * s * s * 3``).
    kind : {"auto", "process", "thread"}
        ``auto`` applies the rule of the module docstring; the others are kept as asked (a ``process`` request
        where there is no ``/dev/shm`` still gets threads, with that reason).
    shm_free : int, optional
        Free bytes of :data:`SHM_FOLDER` (None: there is none).
    gpu : bool
        Whether the consumer runs the model on a GPU. ``auto`` takes processes only then: beside a model on the
        same CPU cores decoding is a fifth of an image's CPU or less and threads keep up with the model (1.8-1.9x
        from 2 threads on hymenoptera's photos), while processes cost their start-up and their pipes (MobileNetV2
        on hymenoptera, 2 cores: 159.6 img/s with threads, 136.6 with processes); a GPU runs the model ten times
        faster or more, so decoding is then the limit and must scale past one GIL.
    """
    if kind not in READER_KINDS:
        raise ValueError(f"unknown reader kind {kind!r}; known: {', '.join(READER_KINDS)}")
    workers = max(1, int(workers))
    chunk = max(1, min(CHUNK_IMAGES, batch_size // workers))
    ahead = max(batch_size * 3, workers * 2 * chunk)

    def plan(k: str, reason: str = "", lend: int = 0) -> ReaderPlan:
        return ReaderPlan(k, workers, chunk, ahead, lend, reason)

    if kind == "thread":
        return plan("thread")
    if kind == "auto" and not gpu:
        return plan("thread")
    if kind == "auto" and n_images < PROCESS_MIN_IMAGES:
        return plan("thread", f"{n_images} images: fewer than {PROCESS_MIN_IMAGES}")
    if shm_free is None:
        return plan("thread", f"no {SHM_FOLDER} for the decoded pixels")
    slot_bytes = chunk * image_bytes
    need = _slot_count(ahead, chunk) * slot_bytes
    if need * 2 > shm_free:
        return plan("thread", f"/dev/shm has {shm_free / 2**20:.0f} MiB free, the slots need {need / 2**20:.0f} MiB")
    lend = 2 * math.ceil(batch_size / chunk) + 1  # a batch held, the next one collected, a chunk across both
    # Slots to lend where they fit too; where they do not, rows are copied out of the slots instead.
    return plan("process", lend=lend if (need + lend * slot_bytes) * 2 <= shm_free else 0)


def _slot_count(ahead: int, chunk: int) -> int:
    return math.ceil(ahead / chunk) + 1


def read_batches(root: Path, items: Sequence[ImageItem], size: int, resize: str, batch_size: int,
                 workers: int, views: ViewSpec | None = None, kind: str = "auto",
                 decode: Decode = decode_item, plan: ReaderPlan | None = None,
                 log: Callable[[str], None] | None = None) -> Iterator[list[Decoded]]:
    """Yield batches of :class:`Decoded` in ``items`` order, decoding ahead in ``workers`` processes or threads.

    Each worker decodes ``root / item.relpath`` for :data:`CHUNK_IMAGES` consecutive items per task (fewer when a
    batch is small). At most ``max(3 * batch_size, 2 * workers * chunk)`` images are in flight (each with its
    views).

    Parameters
    ----------
    root : Path
        Folder the items' ``relpath`` are relative to (an absolute ``relpath`` is taken as it is).
    items : sequence of ImageItem
    size : int
        Input side.
    resize : {"crop", "squash", "pad"}
    batch_size : int
    workers : int
    views : ViewSpec, optional
        Augmented views to render with each image.
    kind : {"auto", "process", "thread"}
        See :func:`plan_reader` (ignored when ``plan`` is given).
    decode : callable
        One image -> :class:`Decoded` (:func:`decode_item`).
    plan : ReaderPlan, optional
        A plan already made by :func:`plan_reader` (so a caller that logged it decodes by it).
    log : callable, optional
        Told, in one line, when decoding processes cannot start and threads decode instead.
    """
    n_views = views.n if views is not None and views.n else 0
    image_bytes = (1 + n_views) * size * size * 3
    plan = plan or plan_reader(len(items), workers, batch_size, image_bytes, kind, shm_free_bytes())
    chunks = (list(items[i:i + plan.chunk]) for i in range(0, len(items), plan.chunk))
    pool: _Pool | None = None
    if plan.kind == "process":
        try:
            pool = _ProcessPool(plan, (1 + n_views, size, size, 3), decode)
        except _CannotStart as exc:
            if log is not None:
                log(f"decoding processes could not start ({exc}); {plan.workers} decoding thread(s) instead")
    with pool or _ThreadPool(plan, decode) as pool:
        yield from _batches(pool, chunks, plan, root, size, resize, views, batch_size)


def _batches(pool: "_Pool", chunks: Iterator[list[ImageItem]], plan: ReaderPlan, root: Path, size: int,
             resize: str, views: ViewSpec | None, batch_size: int) -> Iterator[list[Decoded]]:
    """The loop shared by both kinds: keep ``plan.ahead`` images in flight, collect tasks in order, yield batches."""
    pending: deque[tuple[Any, list[ImageItem]]] = deque()  # decoding tasks, in item order
    in_flight = 0

    def fill() -> None:
        nonlocal in_flight
        while in_flight < plan.ahead and (part := next(chunks, None)) is not None:
            pending.append((pool.submit(root, part, size, resize, views), part))
            in_flight += len(part)

    try:
        fill()
        batch: list[Decoded] = []
        while pending:
            fut, part = pending.popleft()
            done = pool.collect(fut, part)
            in_flight -= len(done)
            fill()
            for d in done:
                batch.append(d)
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch
    finally:
        pool.cancel([t for t, _ in pending])


class _Pool:
    """What :func:`_batches` needs of a pool: submit a chunk, collect its result in order, and a context."""

    def __enter__(self) -> "_Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, root: Path, part: list[ImageItem], size: int, resize: str, views: ViewSpec | None) -> Any:
        """Start decoding ``part``; a handle for :meth:`collect`."""
        raise NotImplementedError

    def collect(self, task: Any, part: list[ImageItem]) -> list[Decoded]:
        """The chunk's rows, in order (the oldest task not yet collected)."""
        raise NotImplementedError

    def cancel(self, tasks: list[Any]) -> None:
        """Tasks that will not be collected (the consumer stopped)."""

    def close(self) -> None:
        raise NotImplementedError


def _decode_chunk(decode: Decode, root: Path, items: list[ImageItem], size: int, resize: str,
                  views: ViewSpec | None) -> list[Decoded]:
    return [decode(root, it, size, resize, views) for it in items]


class _ThreadPool(_Pool):
    def __init__(self, plan: ReaderPlan, decode: Decode) -> None:
        self.decode = decode
        self.pool = ThreadPoolExecutor(max_workers=plan.workers, thread_name_prefix="decode")

    def submit(self, root, part, size, resize, views):  # noqa: ANN001 - see _Pool
        return self.pool.submit(_decode_chunk, self.decode, root, part, size, resize, views)

    def collect(self, task, part):  # noqa: ANN001 - see _Pool
        return task.result()

    def cancel(self, tasks):  # noqa: ANN001 - see _Pool
        for fut in tasks:
            fut.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# ---- decoding processes --------------------------------------------------------------------------------------


class _CannotStart(Exception):
    """Decoding processes could not start (the reader then uses threads)."""


def _decode_into(slots: np.ndarray, decode: Decode, slot: int, root: Path, items: list[ImageItem], size: int,
                 resize: str, views: ViewSpec | None) -> list[tuple[str, str]]:
    """In a decoding process: decode ``items`` into slot ``slot``; ``(sha256, error)`` per item, in order."""
    out = []
    for j, it in enumerate(items):
        d = decode(root, it, size, resize, views)
        if d.pixels is not None:
            slots[slot, j, 0] = d.pixels
            if d.views is not None:
                slots[slot, j, 1:] = d.views
        out.append((d.sha256, (d.error or "cannot decode") if d.pixels is None else ""))
    return out


def serve(fd: str, shape: str) -> None:
    """The loop of a decoding process (``python -c``): map the slots, say ready, then decode each task it is sent.

    A task is ``(decode, slot, root, items, size, resize, views)`` pickled on stdin; each answer is a frame on
    stdout (:func:`_frame`): ``("ok", [(sha256, error), ...])`` or ``("error", traceback)`` for a fault that is not
    the image's. It stops at the end of stdin (the reader closed it, or its process is gone).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the command, which stops this process
    dims = tuple(json.loads(shape))
    buf = mmap.mmap(int(fd), int(np.prod(dims)))
    slots = np.ndarray(dims, np.uint8, buffer=buf)
    # The answers go out on a descriptor of their own; file descriptor 1 then points at stderr, so that nothing a
    # decoder or a native library writes to stdout (Python's or C's) can corrupt them.
    inp, out = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out.write(_frame(("ready", os.getpid())))
    out.flush()
    while True:
        try:
            task = pickle.load(inp)
        except EOFError:
            return
        try:
            answer: tuple[str, Any] = ("ok", _decode_into(slots, *task))
        except Exception:  # noqa: BLE001 - a fault of ours, not the image's: the reader raises it
            answer = ("error", traceback.format_exc())
        try:
            out.write(_frame(answer))
            out.flush()
        except BrokenPipeError:
            return


MAX_FRAME = 64 << 20
"""The largest answer the reader accepts (an answer is a few hundred bytes per image): a longer length is garbled
bytes, and the process that sent it is treated as one that died."""


def _frame(message: tuple) -> bytes:
    """A decoding process's answer as sent: its pickle's length (8 bytes, little-endian), then the pickle. The
    reader reads what has arrived from every process without blocking on any (:meth:`_Worker.read_arrived`), which
    a pickle read straight off a buffered pipe cannot tell it."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(8, "little") + data


CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(16 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20),
             "OPENBLAS_NUM_THREADS": "1"}
"""The environment a decoding process adds to the command's (the user's own values, when set, win).

glibc's heap: a process decodes on its main thread, in glibc's main arena, where each image's 150 KB arrays were
mapped and unmapped afresh: 37 page faults per 224 px image, and 0.60 ms of CPU per 128 px flower against 0.45 in a
thread. Allocations up to 16 MiB from the heap, kept up to 64 MiB: 2 faults per image, 0.52 ms; bench/extract.py's
decode phase, 1 process 1,945 img/s instead of 1,770 (docs/benchmarks.md). Other C libraries ignore these variables.

One OpenBLAS thread: decoding does no linear algebra, and NumPy's import otherwise starts one BLAS thread per core
in every process (0.09 s of the 0.2 s of CPU a process took to start here, by ``/usr/bin/time`` of the command's
imports; 16 processes x 16 threads on a GPU node)."""

_BOOT = ("import json, os, sys; sys.path[:0] = json.loads(sys.argv[1]); import pipeline.reader as r; "
         "r.serve(*sys.argv[2:]); os._exit(0)")
"""A decoding process's command (``python -c``): the parent's import path, then :func:`serve`; at the end of its
tasks it exits at once (its answers are flushed and it holds nothing else), without the interpreter's teardown of
NumPy and Pillow: 30-60 ms that the reader's end waited for (timestamps of the answers against the end of
``read_batches`` on hymenoptera, not a bench line)."""


@dataclass(eq=False)
class _Task:
    """One chunk sent to a decoding process: its slot, what to send again if the process dies, and its outcome
    once known (the process's ``(sha256, error)`` per image, or the rows decoded one at a time after a crash)."""

    slot: int
    message: tuple
    worker: "_Worker | None" = None
    results: list | None = None
    rows: list[Decoded] | None = None

    @property
    def done(self) -> bool:
        return self.results is not None or self.rows is not None


@dataclass(eq=False)
class _Worker:
    """One decoding process, its pipes, the tasks it has not answered yet (oldest first) and the bytes of answers
    not yet whole."""

    proc: subprocess.Popen
    tasks: deque = field(default_factory=deque)
    inbox: bytearray = field(default_factory=bytearray)
    answers: deque = field(default_factory=deque)
    answered: int = 0

    @classmethod
    def start(cls, fd: int, shape: tuple[int, ...]) -> "_Worker":
        # The command's own import path first (as multiprocessing's spawn hands it on), so that this package and
        # any decode function the command can import by name are found the same way, installed or not.
        paths = [str(Path(__file__).resolve().parents[1]), *(p for p in sys.path if p)]
        cmd = [sys.executable, "-c", _BOOT, json.dumps(paths), str(fd), json.dumps(list(shape))]
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(fd,),
                                    start_new_session=True, env={**CHILD_ENV, **os.environ})
        except OSError as exc:
            raise _CannotStart(str(exc)) from None
        return cls(proc)

    def wait_ready(self) -> None:
        """The process's first answer, or :class:`_CannotStart` when it exits first."""
        if self.receive() is None:
            raise _CannotStart(f"a decoding process exited with status {self.proc.wait()}")

    def send(self, task: _Task) -> None:
        self.tasks.append(task)
        task.worker = self
        try:
            pickle.dump(task.message, self.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died: the task's collect sees the end of its answers

    def fileno(self) -> int:
        """The answers' pipe (for ``poll``)."""
        return self.stdout.fileno()

    def read_arrived(self) -> bool:
        """Read what the pipe holds (one ``read``; it blocks only when nothing has arrived) into :attr:`answers`;
        False at the end of the pipe (the process is gone)."""
        try:
            data = os.read(self.fileno(), 1 << 16)
        except OSError:
            data = b""
        self.inbox += data
        while len(self.inbox) >= 8:
            n = int.from_bytes(self.inbox[:8], "little")
            if n > MAX_FRAME:
                return False  # garbled: treated as a process that died
            if len(self.inbox) < 8 + n:
                break
            try:
                self.answers.append(pickle.loads(self.inbox[8:8 + n]))
            except (pickle.UnpicklingError, EOFError, ValueError):
                return False  # garbled: treated as a process that died
            del self.inbox[:8 + n]
        return bool(data)

    def receive(self) -> tuple | None:
        """The next answer, waiting for it; None when the process is gone."""
        while not self.answers:
            if not self.read_arrived():
                return None
        return self.answers.popleft()

    def hang_up(self) -> None:
        """Close both pipes: the process finishes the chunk in hand, then sees the end of its tasks."""
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass

    @property
    def stdin(self) -> IO[bytes]:
        return self.proc.stdin  # type: ignore[return-value]

    @property
    def stdout(self) -> IO[bytes]:
        return self.proc.stdout  # type: ignore[return-value]

    def stop(self) -> None:
        self.hang_up()
        try:
            self.proc.wait(timeout=5)  # it finishes the chunk in hand, then sees the end of stdin
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _tracked(buffer: Any) -> tuple[np.ndarray, Callable[[], Any]]:
    """A flat uint8 array over ``buffer`` and a weak reference that dies with the last array derived from it.

    The array is made through a ``memoryview``, so NumPy makes it the base of every view of it, however derived (it
    does not look through a buffer that is not an array): whether anything still uses the memory is known without
    guessing. :class:`_Copies` and the lent slots of :class:`_ProcessPool` both use it.
    """
    handle = np.frombuffer(memoryview(buffer), np.uint8)
    return handle, weakref.ref(handle)


class _Copies:
    """Buffers that a slot is copied out into, each used again once no row of its last copy is left.

    A fresh 1-10 MB array per chunk was memory that glibc mapped or handed back to the system and the reader's
    process then faulted in page by page: 18 page faults per 224 px image, which made the copy 9x a ``memcpy`` (56 of
    the reader's 70 us of CPU per image on 128 px flowers, the one part of decoding with processes that does not run
    in parallel). Whether a buffer is free is known from a weak reference to the base of its rows (:func:`_tracked`).
    A consumer that keeps rows for as long as it likes only makes the reader copy into a fresh array.
    """

    def __init__(self, shape: tuple[int, ...], keep: int) -> None:
        self.shape, self.keep = shape, keep
        self.nbytes = int(np.prod(shape))
        self.buffers: list[tuple[bytearray, Callable[[], Any]]] = []

    def take(self, src: np.ndarray) -> np.ndarray:
        """A copy of ``src`` (a slot's first rows) in a buffer no earlier copy's row still uses."""
        n = src.shape[0]
        for i, (buf, handle) in enumerate(self.buffers):
            if handle() is None:
                break
        else:
            if len(self.buffers) >= self.keep:  # every buffer is held (the consumer keeps rows): a plain copy
                return src.copy()
            buf, i = bytearray(self.nbytes), len(self.buffers)
            self.buffers.append((buf, lambda: None))
        handle, ref = _tracked(buf)
        out = handle.reshape(self.shape)[:n]
        out[...] = src
        self.buffers[i] = (buf, ref)
        return out


def least_busy(workers: Sequence[_Worker]) -> _Worker:
    """The process a new chunk goes to: the one with the fewest chunks not yet answered, and of those the one that
    has answered the most (the quicker one so far; processes of equal speed still take turns).

    Chunks are collected in order, so counting those not yet collected dealt them out in turn, and a process whose
    chunks happened to be cheaper (smaller photos) waited for the other one instead of taking more.
    """
    return min(workers, key=lambda w: (len(w.tasks), -w.answered))


class _ProcessPool(_Pool):
    """Decoding processes writing into the slots of one shared block (``(slots, chunk, 1 + K, s, s, 3)``).

    A chunk's rows are views of its slot, lent to the consumer (no copy), while fewer than ``plan.lend`` slots are
    lent; a lent slot is free again once no row of it is left (:func:`_tracked`). Beyond that (a consumer that keeps
    rows) the rows are copied out (:class:`_Copies`) and the slot is free at once; a chunk decoded again one image at
    a time after a crash is copied image by image, the slot serving each in turn. The copy was
    the larger part of the reader's own CPU, the one part of decoding with processes that does not run in parallel:
    with two processes on 128 px flowers, 38-44 us per image before, 22-23 after (``getrusage`` around
    ``read_batches``; a ``cProfile`` with a CPU clock put the copy at 24 of 56 us).
    """

    def __init__(self, plan: ReaderPlan, image_shape: tuple[int, ...], decode: Decode) -> None:
        self.decode = decode
        self.lend = plan.lend
        self.shape = (_slot_count(plan.ahead, plan.chunk) + plan.lend, plan.chunk, *image_shape)
        nbytes = int(np.prod(self.shape))
        self.workers: list[_Worker] = []
        try:
            self.fd, name = tempfile.mkstemp(prefix="headbench-decode-", dir=plan.shm_folder)
        except OSError as exc:
            raise _CannotStart(f"{plan.shm_folder}: {exc.strerror or exc}") from None
        try:
            os.unlink(name)  # the open descriptors keep it; nothing is left behind whatever happens
            os.ftruncate(self.fd, nbytes)
            self.buf = mmap.mmap(self.fd, nbytes)
            self.slots = np.ndarray(self.shape, np.uint8, buffer=self.buf)
            self.free = deque(range(self.shape[0]))
            self.lent: list[tuple[int, Callable[[], Any]]] = []  # (slot, weak reference to its rows' base)
            self.copies = _Copies(self.shape[1:], 2 * self.shape[0])
            self.workers = [_Worker.start(self.fd, self.shape) for _ in range(plan.workers)]
            for w in self.workers:
                w.wait_ready()
        except BaseException:
            self.close()
            raise

    def submit(self, root, part, size, resize, views):  # noqa: ANN001 - see _Pool
        self._reclaim()
        slot = self.free.popleft()
        task = _Task(slot, (self.decode, slot, root, part, size, resize, views))
        self._pump(wait=False)
        least_busy(self.workers).send(task)
        return task

    def collect(self, task, part):  # noqa: ANN001 - see _Pool
        if task.worker is None:
            raise RuntimeError("internal: a decoding task was collected before it was sent")
        while not task.done:
            self._pump(wait=True)
        if task.rows is not None:  # decoded again one image at a time, already copied out
            self.free.append(task.slot)
            return task.rows
        self._reclaim()
        lend = len(self.lent) < self.lend
        rows = self._rows(task.slot, part, task.results or [], lend)
        if not lend:
            self.free.append(task.slot)
        return rows

    def _reclaim(self) -> None:
        """Lent slots none of whose rows is left are free again."""
        held = []
        for slot, ref in self.lent:
            if ref() is None:
                self.free.append(slot)
            else:
                held.append((slot, ref))
        self.lent = held

    def _pump(self, wait: bool) -> None:
        """Take the answers that have arrived from any process (waiting for one when ``wait``), each for its
        process's oldest task not yet answered; a process that died is replaced and its chunks decoded again."""
        busy = {w.fileno(): w for w in self.workers if w.tasks}
        if not busy:
            return
        poll = select.poll()  # not select(): that refuses descriptors from 1024 on, which a busy process can hold
        for fd in busy:
            poll.register(fd, select.POLLIN)
        for fd, _ in poll.poll(None if wait else 0):
            worker = busy[fd]
            alive = worker.read_arrived()
            while worker.answers and worker.tasks:
                task, answer = worker.tasks.popleft(), worker.answers.popleft()
                if answer[0] != "ok":
                    raise RuntimeError(f"internal: a decoding process failed:\n{answer[1]}")
                task.results = answer[1]
                worker.answered += 1
            if not alive and worker.tasks:  # it died on one of its oldest task's images
                self._recover(worker)

    def _rows(self, slot: int, part: list[ImageItem], results: list[tuple[str, str]], lend: bool) -> list[Decoded]:
        """A chunk's rows: views of its slot, which is then lent (``lend``), or of one copy of it."""
        if lend:
            size = self.slots[slot].nbytes
            handle, ref = _tracked(memoryview(self.buf)[slot * size:(slot + 1) * size])
            block = handle.reshape(self.shape[1:])[:len(part)]
            self.lent.append((slot, ref))
        else:
            block = self.copies.take(self.slots[slot, :len(part)])
        views = block.shape[1] > 1
        return [Decoded(it, None if err else block[j, 0], sha, err, block[j, 1:] if views and not err else None)
                for j, (it, (sha, err)) in enumerate(zip(part, results))]

    def _replace(self, worker: _Worker) -> _Worker:
        """A fresh process in ``worker``'s place (the dead one's tasks are the caller's to send again)."""
        worker.stop()
        fresh = _Worker.start(self.fd, self.shape)
        try:
            fresh.wait_ready()
        except _CannotStart as exc:
            raise DatasetError(f"decoding processes no longer start ({exc}); finished rows are kept: rerun to "
                               f"resume") from None
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    def _recover(self, worker: _Worker) -> None:
        """The dead ``worker``'s oldest task decoded one image at a time by a fresh process (an image it dies on is
        a :data:`CRASHED` row), then its later tasks sent again, in order."""
        task, *later = worker.tasks
        part = task.message[3]
        worker = self._replace(worker)
        rows = []
        for it in part:
            alone = _Task(task.slot, (*task.message[:3], [it], *task.message[4:]))
            worker.send(alone)
            answer = worker.receive()
            worker.tasks.clear()
            if answer is None:
                rows.append(Decoded(it, None, "", CRASHED))
                worker = self._replace(worker)
            elif answer[0] != "ok":
                raise RuntimeError(f"internal: a decoding process failed:\n{answer[1]}")
            else:
                rows.extend(self._rows(task.slot, [it], answer[1], lend=False))  # the slot serves the next image
        task.rows = rows
        for t in later:
            worker.send(t)

    def close(self) -> None:
        for w in self.workers:  # all told first, so that they end together rather than one after another
            w.hang_up()
        for w in self.workers:
            w.stop()
        self.workers = []
        self.slots = None  # type: ignore[assignment]  # no view of the map may outlive it
        if getattr(self, "buf", None) is not None:
            try:
                self.buf.close()
            except BufferError:
                pass  # rows lent to the consumer are left: the map goes with the last of them
        os.close(self.fd)
