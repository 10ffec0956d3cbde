"""The reader: a bounded pool of threads that reads, hashes and decodes images ahead of the model.

Pillow releases the GIL while decoding, so threads overlap decoding with the model's compute. At most a few
batches are in flight, so memory stays flat whatever the dataset size. With augmented views
(:mod:`pipeline.views`) each image is decoded once (:func:`pipeline.views.read_views`) and its views are rendered
from the decoded pixels in the same thread.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.data import ImageItem
from pipeline.errors import ImageDecodeError
from pipeline.views import ViewSpec, read_views


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


def read_batches(root: Path, items: list[ImageItem], size: int, resize: str, batch_size: int,
                 workers: int, views: ViewSpec | None = None) -> Iterator[list[Decoded]]:
    """Yield batches of :class:`Decoded` in ``items`` order, decoding ahead in ``workers`` threads.

    At most ``max(3 * batch_size, 2 * workers)`` images are in flight (each with its views).
    """
    ahead = max(batch_size * 3, workers * 2)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[Future] = deque()
        queue = iter(items)
        try:
            for it in queue:
                pending.append(pool.submit(decode_item, root, it, size, resize, views))
                if len(pending) >= ahead:
                    break
            batch: list[Decoded] = []
            while pending:
                batch.append(pending.popleft().result())
                nxt = next(queue, None)
                if nxt is not None:
                    pending.append(pool.submit(decode_item, root, nxt, size, resize, views))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
        finally:
            for fut in pending:
                fut.cancel()
