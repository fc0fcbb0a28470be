"""The bounded queue between callers and the writer thread.

Callers append without taking any lock: `deque.append` and `deque.popleft` are atomic in
CPython, so the only shared state a caller touches is the deque itself. The bound is checked
with `len()` before appending, so concurrent callers may overshoot `max_queue` by at most
the number of threads appending at that instant; nothing is ever dropped silently.

How many entries were accepted is not counted on the caller's path (a shared `+= 1` is not
atomic across threads and a lock costs more than the append). It is derived instead:
everything the writer has taken plus what is still queued, read under the ledger's lock.

The buffer is the one owner of the queue's two numbers, `max_queue` and `wake_rows`; the C
caller path (`_caller.c`) is made from them, never from copies kept elsewhere.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Final

from .entry import Row

#: Rows freed (or encoded, or joined) per C call on the writer thread. One call over a
#: whole batch is one long hold of the GIL: the interpreter cannot switch threads inside
#: it, so every caller of log() waits until it ends. Pieces this size let it switch.
PIECE_ROWS: Final = 1000


def release(rows: list[Any]) -> None:
    """Empty `rows` a piece at a time, from the end (no memmove): when this list holds the
    last reference to its rows, freeing them all at once (`del`, or the list going out of
    scope) would be one long hold of the GIL."""
    while rows:
        del rows[-PIECE_ROWS:]


class Buffer:
    """A FIFO of `Row`s with a soft bound and a wake-up signal for the writer."""

    __slots__ = ("_max_queue", "_wake", "_wake_rows", "items")

    def __init__(self, max_queue: int, wake_rows: int, wake: Callable[[], None]) -> None:
        # The entries themselves; unbounded deque so that overflow drops the newest entry
        # (the caller learns of it) instead of silently evicting the oldest (`maxlen`).
        self.items: deque[Row] = deque()
        self._max_queue = max_queue
        # Every `wake_rows`-th append wakes the writer before its flush interval.
        self._wake_rows = wake_rows
        self._wake = wake

    @property
    def max_queue(self) -> int:
        """Entries held at most; a call beyond it is refused (and counted as dropped)."""
        return self._max_queue

    @property
    def wake_rows(self) -> int:
        """Every this many queued entries the writer is woken before its interval."""
        return self._wake_rows

    @property
    def wake(self) -> Callable[[], None]:
        return self._wake

    def offer(self, row: Row) -> bool:
        """Append `row` unless the queue is full; never blocks."""
        items = self.items
        size = len(items)
        if size >= self._max_queue:
            return False
        items.append(row)
        if (size + 1) % self._wake_rows == 0:
            self._wake()
        return True

    def half_full(self) -> bool:
        return len(self.items) >= max(1, self._max_queue // 2)

    def take(self, limit: int) -> list[Row]:
        """Remove and return up to `limit` entries, oldest first (under the ledger's lock)."""
        items = self.items
        n = min(limit, len(items))
        popleft = items.popleft
        return [popleft() for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)


class Gate:
    """Two flags every call reads (the Python log() and its C twin alike): whether the
    writer still takes entries, and whether its thread was started (the first call starts
    it). Plain attributes: a caller reads them without a lock, and each is only ever
    switched one way while the writer lives."""

    __slots__ = ("closed", "started")

    def __init__(self) -> None:
        self.closed = False
        self.started = False
