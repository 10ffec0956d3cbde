"""The local engine: the reader (decoding processes or threads) -> one runtime -> part writer, on this machine.

Finished rows are committed in small atomic part files (:class:`pipeline.cache.PartWriter`) every
``checkpoint_rows`` images or ``checkpoint_seconds``, between whole batches, so a resumed run feeds the model the
same batches an uninterrupted run would. A part is committed before a batch that would take the uncommitted rows
past ``checkpoint_rows`` (the batch itself is at most that: :func:`pipeline.extract.config.fit_batch_to_checkpoint`),
so a crash loses at most ``checkpoint_rows`` images of work. A row whose features come out non-finite (NaN or inf) is stored as a
failed row with that reason, never as a usable one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pipeline import cache
from pipeline.atomic import Commit, commit_file
from pipeline.errors import DatasetError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.plan import Plan
from pipeline.extract.progress import Progress
from pipeline.reader import Decoded, plan_reader, read_batches, shm_free_bytes
from pipeline.runtime.base import Runtime, choice_tag
from pipeline.runtime.factory import RuntimeFactory, make_runtime

NON_FINITE = "the backbone produced non-finite features (NaN or inf) for this image"


@dataclass
class EngineReport:
    """What an engine did: rows committed, their wall time, the workers used and the runtime's provenance."""

    rows: int
    seconds: float
    workers: int
    runtime: dict[str, Any] = field(default_factory=dict)


def view_keys(config: ExtractConfig) -> tuple[str, ...]:
    """Dataset names of the views' features: ``views/avg`` (and ``views/max``) when the spec asks for views.

    Spatial maps of views are never stored: a map is ``h x w`` times a pooled vector per view (8x8x2048 values for
    InceptionV3), so K of them per image would multiply the cache by up to 64 K for little use.
    """
    n = config.views.n if config.views is not None else 0
    return tuple(f"views/{k}" for k in config.kinds if k != "maps") if n else ()


def feature_shapes(runtime: Runtime, config: ExtractConfig) -> dict[str, tuple[int, ...]]:
    """Per-row shape of every dataset a row stores (the part writer's ``shapes``): kinds, then views ``(K, D)``."""
    shapes = {k: tuple(runtime.shapes[k]) for k in config.kinds}
    n = config.views.n if config.views is not None else 0
    for key in view_keys(config):
        shapes[key] = (n, *runtime.shapes[key.split("/", 1)[1]])
    return shapes


def rows_of_batch(batch: list[Decoded], out: dict[str, np.ndarray], kinds: tuple[str, ...],
                  ) -> list[tuple[dict[str, Any], dict[str, np.ndarray] | None]]:
    """Pair each decoded image of a batch with its features (None when it failed), as part-writer rows.

    ``out`` holds, for the decoded images only and in batch order, one array per dataset name in ``kinds``
    (``avg``, ``views/avg``...). Rows whose features are not all finite become failed rows with
    :data:`NON_FINITE` as the reason.
    """
    rows = []
    k = 0
    for d in batch:
        it = d.item
        row = {"path": it.relpath, "label": it.label, "split": it.split, "size": it.size,
               "mtime_ns": it.mtime_ns, "sha256": d.sha256, "ok": d.pixels is not None, "error": d.error}
        feats = None
        if d.pixels is not None:
            feats = {name: out[name][k] for name in kinds}
            k += 1
            if not all(np.isfinite(v).all() for v in feats.values()):
                row.update(ok=False, error=NON_FINITE)
                feats = None
        rows.append((row, feats))
    return rows


def run_batch(runtime: Runtime, batch: list[Decoded], config: ExtractConfig,
              ) -> list[tuple[dict[str, Any], dict[str, np.ndarray] | None]]:
    """Run one decoded batch (centre views and augmented views) through ``runtime``: part-writer rows.

    The centre views of the decoded images run in calls of at most ``config.batch_size`` images, exactly as they
    would without views (so a row's centre features do not depend on the view spec, bit for bit), then their
    augmented views (image by image, view by view) in calls of at most ``config.batch_size`` images: the same
    decoded batch always meets the model as the same calls (a resumed run computes what an uninterrupted one
    would). Each row's
    features are ``{kind: (D,) or map}`` for the centre view and ``{"views/<kind>": (K, D)}`` for its views
    (pooled kinds only, see :func:`view_keys`); failed images get ``None``. This is the one function both the
    local and the Ray engines call per batch.

    Parameters
    ----------
    runtime : Runtime
        Pixels in, ``{kind: array}`` out.
    batch : list of Decoded
        From :func:`pipeline.reader.read_batches` (views present when ``config.views.n`` > 0).
    config : ExtractConfig
        Its ``kinds``, ``views`` (fixed) and ``batch_size`` are used.

    Returns
    -------
    list of (row, feats or None)
        In batch order, for :meth:`pipeline.cache.PartWriter.add`.
    """
    good = [d for d in batch if d.pixels is not None]
    vkeys = view_keys(config)
    n_views = config.views.n if vkeys and config.views is not None else 0
    if not good:
        return rows_of_batch(batch, {}, config.kinds + vkeys)
    step = max(1, int(config.batch_size))
    n = len(good)
    centres = np.stack([d.pixels for d in good])
    chunks = [runtime(centres[i:i + step]) for i in range(0, n, step)]
    out = {k: np.concatenate([c[k] for c in chunks]) for k in config.kinds}
    if n_views:
        for d in good:
            if d.views is None or len(d.views) != n_views:
                raise ValueError(f"internal: {d.item.relpath} was decoded without its {n_views} views")
        views = np.concatenate([d.views for d in good])
        chunks = [runtime(views[i:i + step]) for i in range(0, len(views), step)]
        for key in vkeys:
            kind = key.split("/", 1)[1]
            out[key] = np.concatenate([c[kind] for c in chunks]).reshape(n, n_views, -1)
    return rows_of_batch(batch, out, config.kinds + vkeys)


def run_local(plan: Plan, log: Callable[[str], None] = print, runtime: Runtime | None = None,
              runtime_factory: RuntimeFactory = make_runtime, commit: Commit = commit_file) -> EngineReport:
    """Extract ``plan.todo`` into part files of ``plan.path``'s parts folder.

    Parameters
    ----------
    plan : Plan
    log : callable
        Receives one-line messages.
    runtime : Runtime, optional
        An already built runtime of ``plan.config.model``.
    runtime_factory : callable
        Builds the runtime when none is given: ``(model, runtime, log=, batch_size=) -> Runtime``
        (:func:`pipeline.runtime.factory.make_runtime`, the default).
    commit : callable
        Makes each written part its file (:func:`pipeline.atomic.commit_file`, the default).

    Returns
    -------
    EngineReport

    Raises
    ------
    DatasetError
        With ``strict``, at the first image that cannot be decoded (finished rows are committed first).
    KeyboardInterrupt
        After committing finished rows (Ctrl-C or SIGTERM).
    """
    cfg = plan.config
    rt = runtime or runtime_factory(cfg.model, cfg.runtime, log=log, batch_size=cfg.batch_size)
    todo = plan.todo
    size = cfg.model.input_size
    n_views = cfg.views.n if cfg.views is not None else 0
    reading = plan_reader(len(todo), cfg.workers, cfg.batch_size, (1 + n_views) * size * size * 3,
                          kind=cfg.reader, shm_free=shm_free_bytes(), gpu=rt.on_gpu)
    log(f"device: {rt.device}, runtime {rt.summary()}{choice_tag(rt.choice)}, batch {cfg.batch_size}, {reading.describe()}")
    writer = cache.PartWriter(plan.path, plan.meta, feature_shapes(rt, cfg), cfg.checkpoint_rows,
                              cfg.checkpoint_seconds, run_info={**plan.run_info, "engine": "local", **rt.describe()},
                              commit=commit)
    progress = Progress(len(todo), cfg.label, enabled=not cfg.quiet and sys.stderr.isatty())
    done = 0
    # One warm-up batch traces the compiled function and lets the runtime pick its kernels for this batch shape,
    # so that start-up cost is not charged to the first images (nor to extract_seconds).
    rt(np.zeros((min(cfg.batch_size, len(todo)), size, size, 3), np.uint8))
    total = 0.0
    last = time.perf_counter()
    try:
        for batch in read_batches(plan.dataset.root, todo, size, cfg.resize, cfg.batch_size, cfg.workers,
                                  cfg.views, plan=reading, log=log):
            rows = run_batch(rt, batch, cfg)
            writer.run_info.update(rt.describe())  # after the first real batch's parity check, which may switch runtime
            for row, feats in rows:
                if feats is None and cfg.strict and row["error"]:
                    raise DatasetError(f"{row['path']}: {row['error']} (--strict); finished rows are kept, rerun to "
                                       f"resume")
                writer.add(row, feats)
            now = time.perf_counter()
            writer.seconds += now - last  # wall time of this batch: decoding wait + model
            total += now - last
            last = now
            writer.maybe_flush(coming=cfg.batch_size)
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
    return EngineReport(rows=done, seconds=total, workers=1, runtime=rt.describe())
