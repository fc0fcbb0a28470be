"""The bounded queue between callers and the writer thread.

Callers append without taking any lock: `deque.append` and `deque.popleft` are atomic in
CPython, so the only shared state a caller touches is the deque itself. The bound is checked
with `len()` before appending, so concurrent callers may overshoot `max_entries` by at most
the number of threads appending at that instant; nothing is ever dropped silently.

How many entries were accepted is not counted on the caller's path (a shared `+= 1` is not
atomic across threads and a lock costs more than the append). It is derived instead:
everything the writer has taken plus what is still queued, read under the writer's lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .entry import Row


class Buffer:
    """A FIFO of `Row`s with a soft bound and a wake-up signal for the writer."""

    __slots__ = ("_batch_size", "_max_entries", "_wake", "items")

    def __init__(self, max_entries: int, batch_size: int, wake: Callable[[], None]) -> None:
        # The entries themselves; unbounded deque so that overflow drops the newest entry
        # (the caller learns of it) instead of silently evicting the oldest (`maxlen`).
        self.items: deque[Row] = deque()
        self._max_entries = max_entries
        # Every `batch_size`-th append wakes the writer before its interval (the writer
        # passes min(batch_size, max_queue // 2)).
        self._batch_size = batch_size
        self._wake = wake

    def offer(self, row: Row) -> bool:
        """Append `row` unless the queue is full; never blocks."""
        items = self.items
        size = len(items)
        if size >= self._max_entries:
            return False
        items.append(row)
        if (size + 1) % self._batch_size == 0:
            self._wake()
        return True

    def take(self, limit: int) -> list[Row]:
        """Remove and return up to `limit` entries, oldest first (writer thread only)."""
        items = self.items
        n = min(limit, len(items))
        popleft = items.popleft
        return [popleft() for _ in range(n)]

    def take_all(self) -> list[Row]:
        """Remove and return everything queued (writer or shutdown path)."""
        return self.take(len(self.items))

    def __len__(self) -> int:
        return len(self.items)
