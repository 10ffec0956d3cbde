"""The local engine: reader threads -> one runtime -> part writer, on this machine.

Finished rows are committed in small atomic part files (:class:`pipeline.cache.PartWriter`) every
``checkpoint_rows`` images or ``checkpoint_seconds``, between whole batches, so a resumed run feeds the model the
same batches an uninterrupted run would. A row whose features come out non-finite (NaN or inf) is stored as a
failed row with that reason, never as a usable one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pipeline import cache
from pipeline.errors import DatasetError
from pipeline.extract.plan import Plan
from pipeline.extract.progress import Progress
from pipeline.extract.reader import Decoded, read_batches
from pipeline.extract.runtime import Runtime, make_runtime

NON_FINITE = "the backbone produced non-finite features (NaN or inf) for this image"


@dataclass
class EngineReport:
    """What an engine did: rows committed, their wall time, the workers used and the runtime's provenance."""

    rows: int
    seconds: float
    workers: int
    runtime: dict[str, Any] = field(default_factory=dict)


def rows_of_batch(batch: list[Decoded], out: dict[str, np.ndarray], kinds: tuple[str, ...],
                  ) -> list[tuple[dict[str, Any], dict[str, np.ndarray] | None]]:
    """Pair each decoded image of a batch with its features (None when it failed), as part-writer rows.

    ``out`` holds the runtime's outputs for the decoded images only, in batch order. Rows whose features are not
    finite become failed rows with :data:`NON_FINITE` as the reason.
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


def run_local(plan: Plan, log: Callable[[str], None] = print,
              runtime: Runtime | None = None) -> EngineReport:
    """Extract ``plan.todo`` into part files of ``plan.path``'s parts folder.

    Raises
    ------
    DatasetError
        With ``strict``, at the first image that cannot be decoded (finished rows are committed first).
    KeyboardInterrupt
        After committing finished rows (Ctrl-C or SIGTERM).
    """
    cfg = plan.config
    rt = runtime or make_runtime(cfg.model, cfg.runtime, log=log, batch_size=cfg.batch_size)
    log(f"device: {rt.device}, runtime {rt.summary()}, batch {cfg.batch_size}, {cfg.workers} decoding thread(s)")
    writer = cache.PartWriter(plan.path, plan.meta, {k: rt.shapes[k] for k in cfg.kinds}, cfg.checkpoint_rows,
                              cfg.checkpoint_seconds, run_info={**plan.run_info, "engine": "local", **rt.describe()})
    todo = plan.todo
    progress = Progress(len(todo), cfg.label, enabled=not cfg.quiet and sys.stderr.isatty())
    done = 0
    # One warm-up batch traces the compiled function and lets the runtime pick its kernels for this batch shape,
    # so that start-up cost is not charged to the first images (nor to extract_seconds).
    size = cfg.model.input_size
    rt(np.zeros((min(cfg.batch_size, len(todo)), size, size, 3), np.uint8))
    total = 0.0
    last = time.perf_counter()
    try:
        for batch in read_batches(plan.dataset.root, todo, size, cfg.resize, cfg.batch_size, cfg.workers):
            good = [d for d in batch if d.pixels is not None]
            out = rt(np.stack([d.pixels for d in good])) if good else {}
            writer.run_info.update(rt.describe())  # after the first real batch's parity check, which may switch runtime
            for row, feats in rows_of_batch(batch, out, cfg.kinds):
                if feats is None and cfg.strict and row["error"]:
                    raise DatasetError(f"{row['path']}: {row['error']} (--strict); finished rows are kept, rerun to "
                                       f"resume")
                writer.add(row, feats)
            now = time.perf_counter()
            writer.seconds += now - last  # wall time of this batch: decoding wait + model
            total += now - last
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
    return EngineReport(rows=done, seconds=total, workers=1, runtime=rt.describe())
