"""The reader: a bounded pool of threads that reads, hashes and decodes images ahead of the model.

Pillow releases the GIL while decoding, so threads overlap decoding with the model's compute. At most a few
batches are in flight, so memory stays flat whatever the dataset size.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.data import ImageItem, read_image
from pipeline.errors import ImageDecodeError


@dataclass
class Decoded:
    """One image read by the reader: its pixels (None when it could not be decoded), file digest and error."""

    item: ImageItem
    pixels: np.ndarray | None
    sha256: str
    error: str


def decode_item(root: Path, item: ImageItem, size: int, resize: str) -> Decoded:
    """Read and decode one image; a failure is returned with its reason, never raised."""
    try:
        px, digest = read_image(root / item.relpath, size, resize)
        return Decoded(item, px, digest, "")
    except ImageDecodeError as exc:
        return Decoded(item, None, getattr(exc, "sha256", ""), str(exc))


def read_batches(root: Path, items: list[ImageItem], size: int, resize: str, batch_size: int,
                 workers: int) -> Iterator[list[Decoded]]:
    """Yield batches of :class:`Decoded` in ``items`` order, decoding ahead in ``workers`` threads.

    At most ``max(3 * batch_size, 2 * workers)`` images are in flight.
    """
    ahead = max(batch_size * 3, workers * 2)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[Future] = deque()
        queue = iter(items)
        try:
            for it in queue:
                pending.append(pool.submit(decode_item, root, it, size, resize))
                if len(pending) >= ahead:
                    break
            batch: list[Decoded] = []
            while pending:
                batch.append(pending.popleft().result())
                nxt = next(queue, None)
                if nxt is not None:
                    pending.append(pool.submit(decode_item, root, nxt, size, resize))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
        finally:
            for fut in pending:
                fut.cancel()
