"""Replaying the disk spool once the database answers again.

A replay can stop at any record (the database fails again, close() cuts it short, the queue
fills up and needs the writer thread) and must go on later from exactly there, so that no
row is written or counted twice: `SpoolReplayer` keeps that progress between tries. What it
resolves lands in the writer's counters, under the writer's lock, as if the writer had done
it: rows from this writer's own segments move from `spooled` to written or dead; rows from
segments other processes left are counted apart (`replayed`, `replay_dead`), since this
writer never accepted them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from .binary import Item
from .sink import Ledger, entry_view
from .spool import Damage, Spool

if TYPE_CHECKING:
    from .writer import AuditWriter

logger = logging.getLogger("auditq")

#: How often a writer looks for segments left by writers that are gone (seconds); the first
#: look is at its thread's first wake-up.
ORPHAN_SCAN_SECONDS: Final = 30.0

#: How a replay ended: nothing left to take, the database failed again, or it stopped early
#: (a deadline, or the queue needs the writer thread) and goes on later from where it was.
ReplayOutcome = Literal["done", "failed", "paused"]


class SpoolReplayer:
    """The replay of one writer's spool directory: its own segments and orphans.

    Given the writer itself, not a narrower view: replayed rows are resolved into its
    counters under its lock, and when to stop depends on its sink, queue and thread.
    """

    def __init__(self, writer: AuditWriter, spool: Spool) -> None:
        self._writer = writer
        self._spool = spool
        # Replay progress of segments begun but not finished: path -> (byte offset done,
        # rows resolved), and rows of a record the database failed on midway, so a replay
        # cut short resumes without counting (or writing) anything twice.
        self._progress: dict[Path, tuple[int, int]] = {}
        self._carry: dict[Path, list[Item]] = {}
        # True while segments this writer may replay are left (after a failed or paused
        # replay): they are retried at the next probe, not only at the next orphan scan.
        self._backlog = False
        # When the writer may next look for spooled segments to replay (monotonic seconds).
        self._next_scan = 0.0

    def due(self) -> bool:
        """Should this wake-up of the writer thread replay? Own or unfinished segments at
        each probe, orphans every ORPHAN_SCAN_SECONDS."""
        writer = self._writer
        now = time.monotonic()
        return bool(
            ((writer._spooled or self._backlog) and now >= writer._next_probe)
            or now >= self._next_scan
        )

    def replay(self, deadline: float | None = None, *, retry: bool = False) -> ReplayOutcome:
        """Write spooled segments (this writer's and orphans), oldest first, each through
        the sink's idempotent path. On the writer thread a failure hands the rows back at
        once (they stay on disk, and the next try waits for the next probe); with `retry`
        (`replay_spool`) the sink retries with backoff until `deadline`."""
        writer = self._writer
        spool = self._spool
        self._next_scan = time.monotonic() + ORPHAN_SCAN_SECONDS
        if not retry and writer._sink.outage_seconds() > 0 and not writer._sink.probe():
            # Still down: claim nothing (claiming seals this writer's open segment, and
            # would hold orphans another writer might be able to replay).
            writer._probe_later()
            return "failed"
        self._backlog = True
        self._forget_finished()
        divert = None if retry else _always
        for path, own in spool.claim():
            ledger: Ledger = _OwnSpoolLedger(writer) if own else _OrphanSpoolLedger(writer)
            offset, resolved = self._progress.get(path, (0, 0))
            carry = self._carry.pop(path, [])
            for items, end in self._batches(path, offset, carry):
                leftover, why, _ = writer._sink.deliver(
                    items, mode="replay", divert=divert, ledger=ledger
                )
                resolved += len(items) - len(leftover)
                self._progress[path] = (end, resolved)
                if leftover:
                    writer._probe_later()
                    # Where this writer got to stays, with the rows still to do, for its
                    # next try at this segment: from the start it would count the rows it
                    # already resolved again.
                    self._carry[path] = leftover
                    if own or why == "abort":
                        return "paused" if why == "abort" else "failed"
                    # Let another writer (whose database may answer) have the orphan.
                    spool.release(path)
                    return "failed"
                if self._should_pause(deadline):
                    return "paused"
            if own:
                lost = spool.segment_rows(path) - resolved
                if lost > 0:
                    self._rows_lost(lost, path.name)
            self._progress.pop(path, None)
            spool.done(path)
            logger.info("replayed spool segment %s (%d rows)", path.name, resolved)
        self._backlog = False
        return "done"

    def _forget_finished(self) -> None:
        """Drop the progress of segments gone from disk: an orphan this writer released after
        a failure and another writer then finished."""
        for path in [path for path in self._progress if not path.exists()]:
            self._progress.pop(path, None)
            self._carry.pop(path, None)

    def _batches(
        self, path: Path, offset: int, carry: list[Item]
    ) -> Iterable[tuple[list[Item], int]]:
        """The rows of a segment from `offset`, one record at a time (after the rows the
        database failed on last time, if any), each with the offset where it ends."""
        if carry:
            yield carry, offset
        for record in self._spool.records(path, offset, self._damage):
            items: list[Item] = [(data, None) for data in record.rows]
            yield items, record.end

    def _should_pause(self, deadline: float | None) -> bool:
        writer = self._writer
        if writer._abort.is_set() or (deadline is not None and time.monotonic() >= deadline):
            return True
        # The queue needs the thread: it must not drop entries while the spool drains.
        return threading.current_thread() is writer._thread and len(writer._buffer) >= max(
            1, writer.max_queue // 2
        )

    def _damage(self, damage: Damage) -> None:
        """Bytes of a segment that hold no readable record: a dead letter that says so."""
        reason = (
            f"spool {damage.what}: {damage.length} bytes at offset {damage.offset} of "
            f"{damage.segment} are unreadable; the entries they held are lost"
        )
        logger.error("%s", reason)
        note = {"segment": damage.segment, "offset": damage.offset, "bytes": damage.length}
        self._writer._publish_dead_letters([(note, reason)])

    def _rows_lost(self, lost: int, segment: str) -> None:
        """Own rows a damaged segment no longer holds: counted as dead letters."""
        writer = self._writer
        reason = f"{lost} spooled entries were lost to damage in spool segment {segment}"
        with writer._lock:
            writer._spooled -= lost
            writer._dead += lost
            writer._unreported_dead += lost
            writer._last_dead_reason = reason


class _OwnSpoolLedger:
    """Replaying this writer's own spool: rows move from spooled to written/dead."""

    def __init__(self, writer: AuditWriter) -> None:
        self._writer = writer

    def committed(self, count: int) -> None:
        w = self._writer
        with w._lock:
            w._spooled -= count
            w._written += count
            w._batches += 1
            w._last_write_at = datetime.now(UTC)

    def dead(self, items: Sequence[Item], reason: str) -> None:
        w = self._writer
        with w._lock:
            w._spooled -= len(items)
            w._dead += len(items)
            w._unreported_dead += len(items)
            w._last_dead_reason = reason
        w._publish_dead_letters([(entry_view(item), reason) for item in items])

    def retrying(self, error: str) -> None:
        self._writer.retrying(error)


class _OrphanSpoolLedger(_OwnSpoolLedger):
    """Replaying a spool left by another process: counted apart, as `replayed`."""

    def committed(self, count: int) -> None:
        w = self._writer
        with w._lock:
            w._replayed += count
            w._batches += 1
            w._last_write_at = datetime.now(UTC)

    def dead(self, items: Sequence[Item], reason: str) -> None:
        w = self._writer
        with w._lock:
            w._replay_dead += len(items)
        w._publish_dead_letters([(entry_view(item), reason) for item in items])


def _always() -> bool:
    return True
