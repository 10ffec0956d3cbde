"""The Ray engine: the same extraction, spread over a Ray cluster, committed into the same cache.

Planning stays on the driver (:mod:`pipeline.extract.plan`, exactly as for the local engine); only the images to
do flow through Ray Data, and the driver assembles the cache afterwards (:mod:`pipeline.extract.run`)::

    driver: plan.todo cut into chunks (whole model batches, about ``checkpoint_rows`` images each)
      -> ray.data.from_arrow(one block per chunk: path, label, split, size, mtime)
      -> map_batches(decode_chunk)          CPU tasks: read, hash, decode, render augmented views
                                            (pipeline.reader.decode_item)
      -> map_batches(ChunkExtractor)        actor pool: the runtime built once per actor (GPUs per actor), batches
                                            of ``batch_size`` through the model (pipeline.extract.local.run_batch,
                                            as the local engine), rows committed as part files
      -> driver: one small record per committed chunk (progress bar), then the check that every row is committed

Each actor holds its own :class:`pipeline.cache.PartWriter` and commits a chunk before returning it, so a chunk
the driver has seen is on disk. Chunks are cut from the todo list at multiples of ``batch_size`` and the actor
feeds them to the model in ``batch_size`` slices from their start, so the model sees the very batches the local
engine would. Parts are written atomically (temporary name, fsync, rename) into ``<cache>.parts/``; their numbers
carry the writer's own id (:class:`pipeline.cache.PartWriter`), so concurrent writers never collide.

Faults: Ray Data restarts a lost actor (``max_restarts=-1``) and retries the chunks it held
(``max_task_retries=-1``); a lost decoding task is retried too. A chunk that a dying actor committed but did not
return is computed again and committed a second time: the rows are the same, and the assembler takes one of them.
Whatever happens, the driver checks at the end that every image it planned has a committed row and otherwise stops
with a message saying that a rerun extracts only what is missing; a cache never looks complete when it is not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pipeline import cache
from pipeline.atomic import write_then_commit
from pipeline.data import ImageItem
from pipeline.errors import CacheError, DatasetError, EngineError, HeadbenchError, WeightsError
from pipeline.extract.config import PIXEL_RULE, ExtractConfig, RayOptions
from pipeline.extract.local import EngineReport, feature_shapes, run_batch
from pipeline.extract.plan import Plan
from pipeline.extract.progress import Progress
from pipeline.reader import Decoded, decode_item
from pipeline.runtime.base import choice_tag
from pipeline.runtime.factory import make_runtime
from pipeline.views import NO_VIEWS, ViewSpec

RAY_HINT = "the Ray engine needs Ray Data: pip install 'headbench[ray]' (or pip install 'ray[data]')"
ADDRESS_RE = re.compile(r"^(auto|ray://[^\s:/]+:\d+|[^\s:/]+:\d+)$")
LOCAL_OBJECT_STORE = 512 * 1024**2
"""Object store of a Ray instance started here: room for a dozen decoded 256-image chunks (38 MB each at 224 px)
in flight, which keeps the actors fed; more only costs shared memory."""
DECODE_TASK_MEMORY = 192 * 1024**2
"""Memory a decoding task reserves besides twice its chunk's pixels (a Ray worker with NumPy, Pillow and Arrow
loaded peaks at about 120 MiB)."""
MAX_CHUNK_BYTES = 96 * 1024**2
"""Decoded chunks stay under Ray Data's 128 MiB target block size, so Ray never splits one across batches."""


def import_ray() -> Any:
    """Import Ray and Ray Data, or raise EngineError with the install line."""
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] extra is what the engine needs
    except ImportError:
        raise EngineError(RAY_HINT) from None
    return ray


def check_ray_options(opts: RayOptions) -> None:
    """Validate the Ray options without touching Ray (raises EngineError with one line)."""
    if opts.address is not None and not ADDRESS_RE.match(opts.address):
        raise EngineError(f"--ray-address must be 'auto', 'ray://HOST:PORT' or 'HOST:PORT', got {opts.address!r}")
    if opts.num_workers is not None and opts.num_workers < 1:
        raise EngineError(f"--num-workers must be at least 1, got {opts.num_workers}")
    if opts.gpus_per_worker < 0:
        raise EngineError(f"--gpus-per-worker must be 0 or more, got {opts.gpus_per_worker}")


# ---- chunks ----------------------------------------------------------------------------------------------------------


def chunk_rows(cfg: ExtractConfig) -> int:
    """Images per chunk: the largest multiple of ``batch_size`` within ``checkpoint_rows`` (the local engine's part
    size, so a crash loses at most that much work), kept under :data:`MAX_CHUNK_BYTES` of decoded pixels (whole
    batches, at least one: the batch is never above ``checkpoint_rows``, see
    :func:`pipeline.extract.config.fit_batch_to_checkpoint`)."""
    b = cfg.batch_size
    rows = max(b, cfg.checkpoint_rows // b * b)
    per_image = _pixels_per_image(cfg)
    cap = max(b, (MAX_CHUNK_BYTES // per_image) // b * b)
    return min(rows, cap)


def _pixels_per_image(cfg: ExtractConfig) -> int:
    """Bytes of decoded pixels per image: its centre view and its augmented views."""
    n_views = cfg.views.n if cfg.views is not None else 0
    return 3 * cfg.model.input_size ** 2 * (1 + n_views)


def chunks(items: list[ImageItem], rows: int) -> list[list[ImageItem]]:
    """``items`` cut into consecutive chunks of ``rows`` (the last one shorter)."""
    return [items[i:i + rows] for i in range(0, len(items), rows)]


def _table(items: list[ImageItem], start: int) -> Any:
    """One chunk as an Arrow table: its images' position in the todo list and their identity."""
    import pyarrow as pa

    return pa.table({
        "index": pa.array(range(start, start + len(items)), pa.int64()),
        "relpath": [it.relpath for it in items], "label": pa.array([it.label for it in items], pa.int64()),
        "split": [it.split for it in items], "size": pa.array([it.size for it in items], pa.int64()),
        "mtime_ns": pa.array([it.mtime_ns for it in items], pa.int64()),
    })


def _items(batch: dict[str, np.ndarray]) -> list[ImageItem]:
    return [ImageItem(str(q), int(lab), str(s), int(z), int(t)) for q, lab, s, z, t in
            zip(batch["relpath"], batch["label"], batch["split"], batch["size"], batch["mtime_ns"])]


def decode_chunk(batch: dict[str, np.ndarray], root: str, size: int, resize: str,
                 views: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Ray Data stage 1 (a CPU task): read, hash and decode one chunk by the local engine's rule.

    Adds ``pixels`` ``(n, size, size, 3)`` uint8 (zeros where decoding failed), ``ok``, ``sha256`` and ``error``,
    and with a view spec (``ViewSpec.to_json()``) ``views`` ``(n, K, size, size, 3)``.
    """
    spec = ViewSpec.from_json(views)
    decoded = [decode_item(Path(root), it, size, resize, spec) for it in _items(batch)]
    pixels = np.zeros((len(decoded), size, size, 3), np.uint8)
    out_views = np.zeros((len(decoded), spec.n, size, size, 3), np.uint8) if spec.n else None
    for i, d in enumerate(decoded):
        if d.pixels is not None:
            pixels[i] = d.pixels
            if out_views is not None:
                out_views[i] = d.views
    out = {**batch, "pixels": pixels, "ok": np.array([d.pixels is not None for d in decoded], bool),
           "sha256": np.array([d.sha256 for d in decoded], dtype=object),
           "error": np.array([d.error for d in decoded], dtype=object)}
    if out_views is not None:
        out["views"] = out_views
    return out


# ---- the actor -------------------------------------------------------------------------------------------------------


def _local_weights(cfg: ExtractConfig, blob: bytes | None) -> ExtractConfig:
    """The config with its weights file materialised on this node from the bytes the driver shipped."""
    w = cfg.model.weights
    if blob is None or not w.path:
        return cfg
    if hashlib.sha256(blob).hexdigest() != w.sha256:
        raise WeightsError(f"the weights {w.path} changed while the Ray run started (SHA-256 is no longer "
                           f"{w.sha256[:12]}); run the command again")
    folder = Path(tempfile.gettempdir()) / "headbench-weights" / w.sha256[:16]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / Path(w.path).name  # the same name: Keras picks the file format by it
    if not path.exists() or path.stat().st_size != len(blob):
        write_then_commit(path, lambda tmp: tmp.write_bytes(blob))  # flushed; a failed copy leaves no temporary
    return replace(cfg, model=replace(cfg.model, weights=replace(w, path=str(path))))


class ChunkExtractor:
    """Ray Data stage 2 (an actor): the runtime, built once, turns decoded chunks into committed part files.

    Parameters
    ----------
    cfg : ExtractConfig
    path : str
        The cache file (absolute); parts go to its parts folder.
    meta : dict
        The plan's cache attributes (the parts' signature).
    weights : list
        ``[ObjectRef]`` of the weights file's bytes (``[None]`` for random weights).
    run_info : dict
        The run's provenance (the plan's, plus the engine and its workers); the runtime adds its own.
    """

    def __init__(self, cfg: ExtractConfig, path: str, meta: dict[str, Any], weights: list,
                 run_info: dict[str, Any]) -> None:
        self.error: HeadbenchError | None = None
        self.run_info: dict[str, Any] = {}
        self._last: float | None = None
        try:
            self._start(cfg, Path(path), meta, weights, run_info)
        except HeadbenchError as exc:  # Ray would carry only its traceback's text: hand it back as a record
            self.error = exc

    def _start(self, cfg: ExtractConfig, path: Path, meta: dict[str, Any], weights: list,
               run_info: dict[str, Any]) -> None:
        import ray

        blob = ray.get(weights[0]) if weights[0] is not None else None
        self.cfg = _local_weights(cfg, blob)
        self.rt = make_runtime(self.cfg.model, self.cfg.runtime, log=lambda _m: None)
        size = cfg.model.input_size
        self.rt(np.zeros((cfg.batch_size, size, size, 3), np.uint8))  # trace and pick kernels before timing
        self.run_info = {**run_info, **self.rt.describe()}
        self.writer = cache.PartWriter(path, meta, feature_shapes(self.rt, self.cfg), cfg.checkpoint_rows,
                                       cfg.checkpoint_seconds, run_info=self.run_info)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        added, error = 0, self.error
        if error is None:
            try:
                added = self._extract(batch)
            except HeadbenchError as exc:
                error = exc
            except OSError as exc:  # a failing disk: the rows of this chunk were not committed
                error = CacheError(f"cannot write a part in {self.writer.dir} ({exc.strerror or exc}); committed "
                                   f"rows are kept: fix the storage and rerun the same command")
            if getattr(self.writer, "failed", False) or isinstance(error, CacheError):
                self.error = error  # the writer is unusable: the chunks still queued here report it, not commit
        return {"rows": np.array([added]),
                "error_type": np.array([type(error).__name__ if error else ""], dtype=object),
                "error": np.array([str(error) if error else ""], dtype=object),
                "runtime": np.array([json.dumps(self.run_info)], dtype=object),
                "choice": np.array([self.rt.choice], dtype=object)}  # why auto took it, for the device line

    def _extract(self, batch: dict[str, np.ndarray]) -> int:
        """Run one chunk through the model and commit its rows; returns how many were committed.

        Model batches start where the local engine's do: at multiples of ``batch_size`` in the todo list.
        """
        cfg = self.cfg
        items = _items(batch)
        index = batch["index"]
        views = batch.get("views")
        decoded = [Decoded(it, batch["pixels"][i] if batch["ok"][i] else None, str(batch["sha256"][i]),
                           str(batch["error"][i]), views[i] if views is not None and batch["ok"][i] else None)
                   for i, it in enumerate(items)]
        cuts = [i for i in range(len(decoded)) if i == 0 or index[i] % cfg.batch_size == 0
                or index[i] != index[i - 1] + 1] + [len(decoded)]
        added = 0
        # Wall time since this actor's previous batch ended: model + waiting for decoded input, the local engine's
        # measure; summed over the workers in the cache's extract_seconds.
        last = self._last or time.perf_counter()
        try:
            for start, end in zip(cuts, cuts[1:]):
                rows = run_batch(self.rt, decoded[start:end], cfg)
                self.writer.run_info.update(self.rt.describe())  # after the first batch's parity check
                self.run_info = self.writer.run_info
                for row, feats in rows:
                    if feats is None and cfg.strict and row["error"]:
                        raise DatasetError(f"{row['path']}: {row['error']} (--strict); finished rows are kept, "
                                           f"rerun to resume")
                    self.writer.add(row, feats)
                    added += 1
                now = time.perf_counter()
                self.writer.seconds += now - last
                last = now
                self.writer.maybe_flush(coming=cfg.batch_size)
        finally:
            self._last = last
            self.writer.flush()  # what was added is committed, also before a --strict stop
        return added


# ---- start-up checks ---------------------------------------------------------------------------------------------


def probe_node(token_file: str, token: str, parts: str, root: str) -> tuple[str, str, str, str]:
    """Ray task run on every node at start-up: does this node share the driver's cache folder, can it write the
    parts folder, can it list the dataset folder?

    ``token_file`` was written by the driver in the cache folder; seeing it with ``token`` inside proves that this
    node reaches the same storage (a node that writes the same path on a disk of its own would commit parts the
    driver never sees). Returns ``(host, problem, probe file, pixel rule)``; ``problem`` is "" when all is well.
    Probe files are named like temporary files, so a probe killed half-way leaves nothing a later run would take
    for a part.
    """
    from pipeline.extract.config import PIXEL_RULE as rule

    host = socket.gethostname()
    try:
        seen = Path(token_file).read_text()
    except OSError:
        seen = ""
    if seen != token:
        return host, "does not see the cache folder this machine writes", "", rule
    probe = Path(parts) / f".probe-{host}-{os.getpid()}.tmp"
    try:
        Path(parts).mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as f:
            f.write(token)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return host, f"cannot write the cache folder ({exc.strerror or exc})", "", rule
    try:
        with os.scandir(root) as entries:
            next(entries, None)
    except OSError as exc:
        return host, f"cannot read the dataset folder {root} ({exc.strerror or exc})", str(probe), rule
    return host, "", str(probe), rule


def check_nodes(ray: Any, path: Path, root: Path) -> int:
    """Run :func:`probe_node` on every alive node; raise CacheError or EngineError (one line) if one fails.

    Returns the number of alive nodes that have CPUs (where model workers can run).
    """
    import uuid

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    parts = cache.parts_dir(path)
    token = uuid.uuid4().hex
    token_file = cache.temp_path(path, f"probe-{token[:8]}")  # removed as stale if a run dies here
    path.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(token)
    probe = ray.remote(num_cpus=0, max_retries=1)(probe_node)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    try:
        results = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                           .remote(str(token_file), token, str(parts), str(root)) for n in nodes])
    finally:
        token_file.unlink(missing_ok=True)
    problems = []
    for host, problem, probe_file, rule in results:
        if probe_file:
            written = Path(probe_file)
            try:
                back = written.read_text()
                written.unlink()
            except OSError:
                back = ""
            if not problem and back != token:  # written, but not where this machine reads
                problem = "does not see the cache folder this machine writes"
        problems.append((host, problem, rule))
    where = f"--cache-dir {path.parent}"
    for host, problem, rule in problems:
        if problem.startswith(("cannot write", "does not see")):
            raise CacheError(f"a Ray worker on {host} {problem} ({where}): put the cache folder on storage that "
                             f"every node mounts at the same path and can write (a shared filesystem)")
        if problem:
            raise EngineError(f"a Ray worker on {host} {problem}: the dataset must be on storage that every node "
                              f"mounts at the same path")
        if rule != PIXEL_RULE:
            raise EngineError(f"the headbench on {host} decodes by {rule}, this one by {PIXEL_RULE}: install the "
                              f"same headbench release on every node")
    return sum(1 for n in nodes if n.get("Resources", {}).get("CPU", 0) > 0) or len(nodes)


# ---- the driver ----------------------------------------------------------------------------------------------------


@contextmanager
def ray_session(opts: RayOptions, log: Callable[[str], None]) -> Iterator[Any]:
    """Ray, connected: a session already open in this process, a cluster joined by address, or a local instance
    started here (minimal: no dashboard, a small object store). Only what was started or joined here is shut down.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = opts.address or os.environ.get("RAY_ADDRESS") or None  # Ray's own convention for "join this one"
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    # Workers' output stays in Ray's log files (TensorFlow's start-up chatter would flood the terminal); what a
    # worker raises still reaches the driver as an exception.
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.ERROR)
    if address is None:
        # A model actor reserves one CPU slot and decoding needs another, so even a one-core machine gets two.
        kwargs.update(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False,
                      object_store_memory=LOCAL_OBJECT_STORE)
    else:
        log(f"ray: joining the cluster at {address}")
    try:
        ray.init(address=address or "local", **kwargs)  # "local": a new instance, never a cluster found lying around
    except (ConnectionError, TimeoutError) as exc:
        raise EngineError(f"cannot join the Ray cluster at {address} ({str(exc).splitlines()[0][:200]}); is it "
                          f"running (`ray status` on its head node), and with token authentication (Ray's default), "
                          f"are RAY_AUTH_MODE=token and its token (~/.ray/auth_token) set here?") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)  # Ray installs its own; keep the command's (Ctrl-C semantics)
    try:
        yield ray
    finally:
        ray.shutdown()  # a local instance stops; a joined cluster is only disconnected from


@contextmanager
def quiet_ray_data() -> Iterator[Any]:
    """Ray Data without its progress bars and start-up lines (its warnings and errors stay visible)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in ("enable_progress_bars", "print_on_execution_start")}
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # INFO lines of every execution, and the warning that says the bars are off (they are, on purpose)
    floors = {"ray.data": logging.WARNING, "ray": logging.WARNING, "ray.data._internal.progress": logging.ERROR}
    loggers = [logging.getLogger(n) for n in floors]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), floors[lg.name]))
    try:
        yield ctx
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def default_workers(ray: Any, gpus_per_worker: float, n_nodes: int) -> int:
    """Model actors when ``--num-workers`` is not given: as many as the GPUs allow, else one per node (the
    runtime already uses every core of its node)."""
    if gpus_per_worker > 0:
        return max(1, int(ray.cluster_resources().get("GPU", 0) // gpus_per_worker))
    return max(1, n_nodes)


def check_resources(resources: dict[str, float], workers: int, gpus_per_worker: float) -> None:
    """Raise EngineError (one line) when the cluster cannot hold ``workers`` model actors and a decoding task.

    Each model actor reserves one CPU (and its GPUs); decoding needs at least one more CPU. Without this check
    Ray Data would wait for resources that never come.
    """
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if gpus_per_worker > 0 and gpus < workers * gpus_per_worker:
        raise EngineError(f"{workers} worker(s) x {gpus_per_worker:g} GPU need {workers * gpus_per_worker:g} GPUs; "
                          f"the cluster has {gpus:g}: lower --num-workers or --gpus-per-worker")
    if cpus < workers + 1:
        raise EngineError(f"{workers} worker(s) need {workers + 1} CPUs (one each, one more for decoding); the "
                          f"cluster has {cpus:g}: lower --num-workers")


def _committed(plan: Plan, todo: list[ImageItem]) -> int:
    """How many of ``todo`` have a row in a committed part (of this run or an earlier one)."""
    done = cache.scan_existing(plan.path, plan.meta).part_rows
    return sum(1 for it in todo if it.relpath in done)


def _rebuild(kind: str, message: str) -> HeadbenchError:
    """The error a worker reported as a record (its class name and message), raised again on the driver."""
    import pipeline.errors

    cls = getattr(pipeline.errors, kind, HeadbenchError)
    return cls(message) if isinstance(cls, type) and issubclass(cls, HeadbenchError) else HeadbenchError(message)


def _remote_error(exc: BaseException) -> HeadbenchError | None:
    """The HeadbenchError that a Ray task or actor raised, if ``exc`` wraps one (Ray wraps it in an exception whose
    text is the remote traceback; the original, with its one-line message, is its ``cause``)."""
    from ray.exceptions import RayError

    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, HeadbenchError) and not isinstance(seen, RayError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None


def run_ray(plan: Plan, log: Callable[[str], None] = print) -> EngineReport:
    """Extract ``plan.todo`` on a Ray cluster into part files of ``plan.path``'s parts folder.

    Raises
    ------
    EngineError
        Ray is not installed, the cluster cannot be joined, or a node cannot read the images.
    CacheError
        A node cannot write the cache folder, or some planned rows were not committed (the message says that a
        rerun extracts only those).
    DatasetError
        With ``strict``, at the first image that cannot be decoded (finished rows are kept).
    KeyboardInterrupt
        Ctrl-C or SIGTERM: committed parts are kept and the same command resumes.
    """
    cfg = plan.config
    check_ray_options(cfg.ray)
    import_ray()

    path = plan.path.resolve()  # workers do not share the driver's working folder
    root = plan.dataset.root.resolve()
    parts = cache.parts_dir(path)
    todo = plan.todo
    done = 0
    described: dict[str, Any] = {}
    first = (0.0, 0)  # seconds until the first committed chunk came back, and its rows
    progress = Progress(len(todo), f"{cfg.label} (ray)", enabled=not cfg.quiet and sys.stderr.isatty())
    t0 = time.perf_counter()
    try:
        with ray_session(cfg.ray, log) as ray, quiet_ray_data():
            n_nodes = check_nodes(ray, path, root)
            workers = cfg.ray.num_workers or default_workers(ray, cfg.ray.gpus_per_worker, n_nodes)
            check_resources(ray.cluster_resources(), workers, cfg.ray.gpus_per_worker)
            rows = chunk_rows(cfg)
            log(f"ray: {n_nodes} node(s), {workers} model worker(s)"
                f"{f' with {cfg.ray.gpus_per_worker:g} GPU each' if cfg.ray.gpus_per_worker else ''}, "
                f"chunks of {rows} images, batch {cfg.batch_size}")
            w = cfg.model.weights
            blob = ray.put(Path(w.path).read_bytes()) if w.path else None
            ds = ray.data.from_arrow([_table(c, i * rows) for i, c in enumerate(chunks(todo, rows))])
            # Decoding tasks reserve the memory of the chunk they decode. Besides being true, that keeps them
            # apart from the model actors: Ray Data fuses stages with equal resource requests, which would decode
            # inside the actor, one chunk after another, instead of ahead of it on the other cores.
            ds = ds.map_batches(decode_chunk, batch_size=None, batch_format="numpy", num_cpus=1,
                                memory=DECODE_TASK_MEMORY + 2 * rows * _pixels_per_image(cfg),
                                fn_kwargs={"root": str(root), "size": cfg.model.input_size, "resize": cfg.resize,
                                           "views": (cfg.views or NO_VIEWS).to_json()})
            ds = ds.map_batches(ChunkExtractor, batch_size=None, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=workers),
                                num_cpus=1, num_gpus=cfg.ray.gpus_per_worker or None,
                                fn_constructor_kwargs={"cfg": cfg, "path": str(path), "meta": plan.meta,
                                                       "weights": [blob], "run_info": {
                                                           **plan.run_info, "engine": "ray", "workers": workers,
                                                           "nodes": n_nodes}})
            failure: HeadbenchError | None = None
            try:
                for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                    n = int(out["rows"].sum())
                    done += n
                    progress.advance(n, done)
                    failure = next((_rebuild(str(t), str(m)) for t, m in zip(out["error_type"], out["error"]) if m),
                                   None)
                    if failure is not None:
                        break
                    if not described:
                        first = (time.perf_counter() - t0, n)
                        described = json.loads(str(out["runtime"][0]))
                        choice = choice_tag(out["choice"][0])
                        log(f"device: {described.get('device')}, runtime {described.get('runtime')}{choice} "
                            f"(first of {workers} worker(s))")
            except Exception as exc:  # Ray wraps what a worker raised: ours become their one line again
                ours = _remote_error(exc)
                if ours is None:
                    raise  # a bug or a Ray failure: keep its traceback
                raise ours from None
            if failure is not None:
                raise failure
    except KeyboardInterrupt:
        progress.close()
        kept = _committed(plan, todo)
        log(f"interrupted: {kept} of {len(todo)} images are committed in {parts.name}/; rerun the same command to "
            f"extract the rest")
        raise
    finally:
        progress.close()
    seconds = time.perf_counter() - t0
    missing = len(todo) - _committed(plan, todo)
    if missing:
        raise CacheError(f"{missing} of {len(todo)} images have no committed row after the Ray run (a worker was "
                         f"lost); rerun the same command: it extracts only those")
    after, n_first = first
    steady = seconds - after >= 1.0 and done - n_first >= 2 * n_first  # enough chunks after the first for a rate
    rate = f", then {(done - n_first) / (seconds - after):.1f} img/s" if steady else ""
    log(f"ray: {len(todo)} images on {workers} worker(s), {n_nodes} node(s) in {seconds:.1f}s: first rows "
        f"committed after {after:.1f}s (Ray and model start-up){rate}")
    return EngineReport(rows=done, seconds=seconds, workers=workers,
                        runtime={**described, "engine": "ray", "workers": workers, "nodes": n_nodes})
