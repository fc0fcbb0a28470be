"""A one-line progress bar for a person watching a terminal; nothing at all for anyone else.

Small enough not to be worth a dependency: one line redrawn with a carriage return, at most
a few times a second, on stderr so the data on stdout stays clean.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Final, TextIO

#: Seconds between redraws: often enough to look alive, rarely enough to cost nothing.
REDRAW_EVERY: Final = 0.2


def wanted(stream: TextIO | None = None) -> bool:
    """True when `stream` (stderr by default) is a terminal, where a bar helps someone."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _count(n: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


class ProgressBar:
    """`[#####-----]  52%  520.0k/1.0M rows  84.1k rows/s`, redrawn in place."""

    def __init__(self, total: int | None, *, stream: TextIO | None = None, unit: str = "rows"):
        self._total = total
        self._stream = sys.stderr if stream is None else stream
        self._unit = unit
        self._start = time.monotonic()
        self._next_draw = self._start

    def update(self, done: int) -> None:
        """Redraw if enough time has passed; cheap enough to call every few thousand rows."""
        now = time.monotonic()
        if now >= self._next_draw:
            self._next_draw = now + REDRAW_EVERY
            self._draw(done, now)

    def finish(self, done: int) -> None:
        """Draw the final state and end the line."""
        self._draw(done, time.monotonic())
        self._stream.write("\n")
        self._stream.flush()

    def _draw(self, done: int, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = f"{_count(done / elapsed)} {self._unit}/s"
        if self._total:
            share = min(done / self._total, 1.0)
            width = max(10, min(40, shutil.get_terminal_size().columns - 50))
            filled = int(share * width)
            text = (
                f"[{'#' * filled}{'-' * (width - filled)}] {share:4.0%}  "
                f"{_count(done)}/{_count(self._total)} {self._unit}  {rate}"
            )
        else:
            text = f"{_count(done)} {self._unit}  {rate}"
        self._stream.write(f"\r{text}\x1b[K")
        self._stream.flush()
