"""A progress bar for the batch stage (rows done, images/s, ETA) on a terminal; silent otherwise."""

from __future__ import annotations

import time


class Progress:
    """A rich progress bar, drawn only when ``enabled`` (the caller checks for a terminal).

    Parameters
    ----------
    total : int
        Rows to do.
    label : str
        Shown before the bar.
    enabled : bool
    """

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.bar = None
        if enabled and total:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                    transient=False)
            self.task = self.bar.add_task(label, total=total, rate="")
            self.start = time.perf_counter()
            self.bar.start()

    def advance(self, n: int, done: int) -> None:
        """Add ``n`` finished rows (``done`` in total so far)."""
        if self.bar is not None:
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f} img/s")

    def close(self) -> None:
        """Stop drawing (idempotent)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
