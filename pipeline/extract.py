"""The batch stage: run a frozen backbone over every image once and cache the features.

Three small parts, as in batch embedding tools:

* **reader** -- a bounded pool of threads reads, hashes and decodes images (Pillow releases the GIL), keeping a
  few batches in flight so decoding overlaps the model's compute and memory stays flat whatever the dataset size;
* **model** -- the backbone with its preprocessing built in, called through a compiled function in inference mode;
* **writer** -- :class:`pipeline.cache.PartWriter` commits finished rows in small atomic part files, assembled into
  the final cache (marked complete) only when every row is done.

Reruns are incremental: rows whose file has the same relative path, size and modification time are reused from the
complete cache or from parts left by an interrupted run; new or changed files are extracted; removed files are
dropped. Images that cannot be decoded are stored as failed rows with the reason (fatal with ``strict=True``).
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pipeline import cache, package_versions
from pipeline.backbones import (
    BuiltBackbone, backbone_label, build_feature_model, check_options, get_spec, make_runner, resolve_weights,
)
from pipeline.data import DEFAULT_RESIZE, RESIZE_RULES, Dataset, ImageItem, discover, read_image
from pipeline.errors import BackboneError, DatasetError, ImageDecodeError

PIXEL_RULE = "headbench-pixels-2"  # bump when pipeline.data's decoding rule changes: old caches are then rebuilt


@dataclass
class ExtractResult:
    """Summary of one extraction (one dataset x one backbone configuration)."""

    path: Path
    n_total: int
    n_extracted: int
    n_reused: int
    n_dropped: int
    n_failed: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    up_to_date: bool = False


def gpu_available() -> bool:
    """Whether the Keras backend sees a GPU (TensorFlow backend; False elsewhere)."""
    try:
        import keras

        if keras.backend.backend() != "tensorflow":
            return False
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    except Exception:  # a broken CUDA set-up must not stop a CPU run
        return False


def configure_threads() -> None:
    """Use all cores inside ops and one inter-op thread on CPU.

    Measured 151 vs 139 img/s for the unfolded MobileNetV2 against TensorFlow's defaults on an AVX-512 machine; with
    batch normalisations folded (:mod:`pipeline.fold`) the two settings were within noise on an AVX2 machine.
    """
    try:
        import keras

        if keras.backend.backend() != "tensorflow":
            return
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(os.cpu_count() or 1)
    except RuntimeError:
        pass  # the runtime is already initialised in this process; its threading is fixed


def read_batches(root: Path, items: list[ImageItem], size: int, resize: str, batch_size: int,
                 workers: int) -> Iterator[list[tuple[ImageItem, np.ndarray | None, str, str]]]:
    """Yield batches of (item, pixels or None, sha256, error) in ``items`` order, decoding ahead in threads.

    At most ``3 * batch_size`` images are in flight, so memory does not grow with the dataset.
    """

    def work(it: ImageItem) -> tuple[ImageItem, np.ndarray | None, str, str]:
        try:
            px, digest = read_image(root / it.relpath, size, resize)
            return it, px, digest, ""
        except ImageDecodeError as exc:
            return it, None, getattr(exc, "sha256", ""), str(exc)

    ahead = max(batch_size * 3, workers * 2)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[Future] = deque()
        queue = iter(items)
        try:
            for it in queue:
                pending.append(pool.submit(work, it))
                if len(pending) >= ahead:
                    break
            batch: list[tuple[ImageItem, np.ndarray | None, str, str]] = []
            while pending:
                batch.append(pending.popleft().result())
                nxt = next(queue, None)
                if nxt is not None:
                    pending.append(pool.submit(work, nxt))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
        finally:
            for fut in pending:
                fut.cancel()


class _Progress:
    """A rich progress bar (images/s, ETA) on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.bar = None
        if enabled and total:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                transient=False)
            self.task = self.bar.add_task(label, total=total, rate="")
            self.start = time.perf_counter()
            self.bar.start()

    def advance(self, n: int, done: int) -> None:
        if self.bar is not None:
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def extract_dataset(
    root: str | os.PathLike | Dataset,
    backbone: str = "mobilenet_v2",
    weights: str = "imagenet",
    cache_dir: str | os.PathLike = "cache",
    input_size: int | None = None,
    alpha: float | None = None,
    resize: str = DEFAULT_RESIZE,
    maps: bool = False,
    max_pool: bool = False,
    maps_dtype: str = "float16",
    batch_size: int = 32,
    workers: int | None = None,
    strict: bool = False,
    quiet: bool = True,
    command: str = "",
    log: Callable[[str], None] = print,
    checkpoint_every: int = 256,
    checkpoint_seconds: float = 20.0,
) -> ExtractResult:
    """Extract features of every image under ``root`` with one backbone into the cache (incremental, resumable).

    Parameters
    ----------
    root : path or Dataset
        Dataset folder (see :mod:`pipeline.data` for layouts), or an already discovered :class:`Dataset`.
    backbone : str
        Registered backbone name (``python cli.py backbones``).
    weights : str
        ``"imagenet"``, a weights file path, or ``"none"`` (random, reproducible with seed 0).
    cache_dir : path
        Folder of cache files; one file per (dataset, backbone config, resize rule, weights).
    input_size, alpha : optional
        Square input side (default: the backbone's) and width multiplier (MobileNets).
    resize : {"squash", "crop", "pad"}
        Resize rule (see :mod:`pipeline.data`).
    maps, max_pool : bool
        Also store the last spatial maps / global max pooling (average pooling is always stored).
    maps_dtype : {"float16", "float32"}
        Storage type of maps (float16 halves the size; 8x8x2048 is 256 KiB per image).
    batch_size : int
        Images per forward pass. 32 is within noise of 16 and 64 on CPU and fits any GPU for these models.
    workers : int, optional
        Decoding threads (default: number of CPUs).
    strict : bool
        Stop at the first image that cannot be decoded instead of recording it.
    quiet : bool
        No progress bar (it is only drawn on a terminal anyway).
    command : str
        The command line, recorded in the cache.
    log : callable
        Receives one-line messages.
    checkpoint_every, checkpoint_seconds : int, float
        Finished rows are committed to disk every this many images or seconds (whichever comes first); a crash
        loses at most that much work.

    Returns
    -------
    ExtractResult

    Raises
    ------
    DatasetError, BackboneError, WeightsError, CacheError
        For unusable input; with ``strict``, DatasetError at the first undecodable image (finished rows are kept).
    """
    if resize not in RESIZE_RULES:
        raise BackboneError(f"unknown resize rule {resize!r}; choose one of {', '.join(RESIZE_RULES)}")
    if maps_dtype not in ("float16", "float32"):
        raise BackboneError(f"maps dtype must be float16 or float32, got {maps_dtype!r}")
    if batch_size < 1:
        raise BackboneError("--batch-size must be at least 1")
    ds = root if isinstance(root, Dataset) else discover(root)
    spec = get_spec(backbone)
    size, a = check_options(spec, input_size, alpha)
    winfo = resolve_weights(spec, weights, size, a, announce=log)
    if winfo.source == "none":
        log(f"WARNING: {spec.name} runs with RANDOM weights (--weights none): features are not ImageNet features")
    label = backbone_label(spec.name, a, size)
    path = cache.cache_path(cache_dir, ds.name, label, resize, winfo.tag)
    kinds = ["avg"] + (["max"] if max_pool else []) + (["maps"] if maps else [])
    meta: dict[str, Any] = {
        "format": cache.FORMAT_NAME, "schema_version": cache.SCHEMA_VERSION,
        "dataset_name": ds.name, "dataset_root": str(ds.root), "has_splits": bool(ds.has_splits),
        "class_names": list(ds.classes),
        "backbone": spec.name, "backbone_label": label, "alpha": a, "input_size": size, "resize": resize,
        "preprocess": spec.preprocess, "preprocess_mode": spec.preprocess_mode, "pixel_rule": PIXEL_RULE,
        "weights_source": winfo.source, "weights_path": winfo.path, "weights_sha256": winfo.sha256,
        "feature_kinds": kinds, "maps_dtype": maps_dtype if maps else "",
        "versions": package_versions(("tensorflow", "keras", "numpy", "pillow", "h5py")), "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    workers = workers or os.cpu_count() or 1
    with cache.locked(path):
        existing = cache.scan_existing(path, meta)
        for stale in existing.stale_parts:
            stale.unlink(missing_ok=True)
        if existing.stale_parts:
            log(f"discarded {len(existing.stale_parts)} leftover file(s) of an interrupted write or another "
                f"configuration")
        todo: list[ImageItem] = []
        n_reused = 0
        for it in ds.items:
            hit = existing.part_rows.get(it.relpath) or existing.final_rows.get(it.relpath)
            if hit is not None and tuple(hit[-2:]) == (it.size, it.mtime_ns):
                n_reused += 1
            else:
                existing.part_rows.pop(it.relpath, None)
                existing.final_rows.pop(it.relpath, None)
                todo.append(it)
        current = {it.relpath for it in ds.items}
        n_dropped = sum(1 for q in existing.final_rows if q not in current)
        same_classes = existing.meta is not None and existing.meta.get("class_names") == list(ds.classes)
        if same_classes and not todo and not n_dropped and not existing.part_rows:
            n_failed = sum(1 for _ in existing.final_rows) - int(existing.meta.get("n_ok", 0))
            log(f"{path.name}: up to date ({len(ds.items)} images, nothing to extract)")
            return ExtractResult(path, len(ds.items), 0, n_reused, 0, n_failed, up_to_date=True)

        resumed = len(existing.part_rows)
        log(f"{ds.name} x {label} ({resize}, weights {winfo.source}{' ' + winfo.sha256[:12] if winfo.sha256 else ''})"
            f": {len(ds.items)} images; reusing {n_reused} finished rows"
            f"{f' ({resumed} from an interrupted run)' if resumed else ''}, extracting {len(todo)}"
            f"{f', dropping {n_dropped} removed' if n_dropped else ''}")

        t0 = time.perf_counter()
        if todo:
            configure_threads()
            built = build_feature_model(spec.name, winfo, size, a, maps=maps, max_pool=max_pool, announce=log)
            gpu = gpu_available()
            log(f"device: {'GPU' if gpu else f'CPU ({os.cpu_count()} cores)'}, batch {batch_size}, "
                f"{workers} decoding thread(s)")
            _run(built, ds, todo, path, meta, kinds, batch_size, workers, strict, quiet, log,
                            checkpoint_every, checkpoint_seconds)
        seconds = time.perf_counter() - t0
        prior = float(existing.meta.get("extract_seconds", 0.0)) if existing.meta else 0.0
        rescanned = cache.scan_existing(path, meta)
        meta["extract_seconds"] = prior + rescanned.part_seconds
        shapes = cache.source_shapes(path, rescanned, kinds)
        rows = cache.assemble(path, meta, [(it.relpath, it.label, it.split) for it in ds.items], rescanned, shapes)
        all_failed = [(p, e) for p, o, e in zip(rows.path, rows.ok, rows.error) if not o]
        run_s = rescanned.part_seconds - existing.part_seconds  # decoding + model of this run's rows
        ips = f", {len(todo) / run_s:.1f} images/s after start-up" if todo and run_s > 0 else ""
        log(f"wrote {path} ({len(rows)} rows, {len(all_failed)} failed) in {seconds:.1f}s{ips}")
        return ExtractResult(path, len(ds.items), len(todo), n_reused, n_dropped, len(all_failed), all_failed,
                             seconds)


def _run(built: BuiltBackbone, ds: Dataset, todo: list[ImageItem], path: Path, meta: dict[str, Any],
         kinds: list[str], batch_size: int, workers: int, strict: bool, quiet: bool,
         log: Callable[[str], None], flush_rows: int, flush_seconds: float) -> None:
    run = make_runner(built)
    shapes = {"avg": (built.feature_dim,), "max": (built.feature_dim,), "maps": built.map_shape}
    writer = cache.PartWriter(path, meta, {k: shapes[k] for k in kinds}, flush_rows, flush_seconds)
    progress = _Progress(len(todo), f"{built.label}", enabled=not quiet and sys.stderr.isatty())
    done = 0
    # One warm-up batch traces the compiled function and lets oneDNN pick its kernels for this batch shape, so
    # that start-up cost is not charged to the first images (nor to extract_seconds).
    run(np.zeros((min(batch_size, len(todo)), built.input_size, built.input_size, 3), np.uint8))
    last = time.perf_counter()
    try:
        for batch in read_batches(ds.root, todo, built.input_size, meta["resize"], batch_size, workers):
            good = [b for b in batch if b[1] is not None]
            out = run(np.stack([b[1] for b in good])) if good else {}
            k = 0
            for it, px, digest, err in batch:
                row = {"path": it.relpath, "label": it.label, "split": it.split, "size": it.size,
                       "mtime_ns": it.mtime_ns, "sha256": digest, "ok": px is not None, "error": err}
                if px is None:
                    if strict:
                        raise DatasetError(f"{it.relpath}: {err} (--strict); finished rows are kept, rerun to resume")
                    writer.add(row, None)
                else:
                    writer.add(row, {name: out[name][k] for name in kinds})
                    k += 1
            now = time.perf_counter()
            writer.seconds += now - last  # wall time of this batch: decoding wait + model
            last = now
            writer.maybe_flush()
            done += len(batch)
            progress.advance(len(batch), done)
    except KeyboardInterrupt:
        writer.flush()
        progress.close()
        log(f"interrupted after {done} of {len(todo)} images; finished rows are kept in {writer.dir.name}/: "
            f"rerun the same command to resume")
        raise
    finally:
        writer.flush()
        progress.close()
