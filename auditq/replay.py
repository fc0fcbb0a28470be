"""Replaying the disk spool once the database answers again.

A replay can stop at any record (the database fails again, close() cuts it short, the queue
fills up and needs the writer thread) and must go on later from exactly there, so that no
row is written or counted twice: `SpoolReplayer` keeps that progress between tries. What it
resolves is reported to the ledger: rows from this writer's own segments move from `spooled`
to written or dead; rows from segments other processes left are counted apart (`replayed`,
`replay_dead`), since this writer never accepted them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final, Literal

from .binary import Item
from .ledger import Ledger, RowReport
from .sink import Sink
from .spool import Damage, Spool

logger = logging.getLogger("auditq")

#: How often a writer looks for segments left by writers that are gone (seconds); the first
#: look is at its thread's first wake-up.
ORPHAN_SCAN_SECONDS: Final = 30.0

#: While its own spool is not empty and the database was failing, how often the writer tries
#: it again (seconds; capped by retry_backoff_max).
PROBE_SECONDS: Final = 1.0

#: Tries of one spooled record that fail while the database otherwise answers, before its
#: rows are dead-lettered: a record the server keeps refusing as a whole (a protocol error
#: on bytes that pass the checksum, say) must not stall every later segment forever.
MAX_RECORD_ATTEMPTS: Final = 5

#: How a replay ended: nothing left to take, the database failed again, or it stopped early
#: (a deadline, or the queue needs the writer thread) and goes on later from where it was.
ReplayOutcome = Literal["done", "failed", "paused"]


class ProbeClock:
    """When a writer that is spooling through an outage may next try the database again;
    replays wait for it too, so a database that is still down costs one probe per interval."""

    def __init__(self, retry_backoff_max: float) -> None:
        self._interval = min(retry_backoff_max, PROBE_SECONDS)
        self._next = 0.0  # monotonic seconds

    def later(self) -> None:
        self._next = time.monotonic() + self._interval

    def due(self) -> bool:
        return time.monotonic() >= self._next


class SpoolReplayer:
    """The replay of one writer's spool directory: its own segments and orphans.

    Given its collaborators, never the writer: the spool it reads, the sink it writes
    through, the ledger it reports to, the probe clock it shares with the delivery policy,
    the abort event of close(), and `should_yield()`, true when the queue needs the writer
    thread back before the replay is done.
    """

    def __init__(
        self,
        spool: Spool,
        sink: Sink,
        ledger: Ledger,
        *,
        probe: ProbeClock,
        abort: threading.Event,
        should_yield: Callable[[], bool],
    ) -> None:
        self._spool = spool
        self._sink = sink
        self._ledger = ledger
        self._probe = probe
        self._abort = abort
        self._should_yield = should_yield
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
        # Failed tries of the record a segment's replay stopped at: path -> (offset, tries).
        self._attempts: dict[Path, tuple[int, int]] = {}

    def due(self) -> bool:
        """Should this wake-up of the writer thread replay? Own or unfinished segments at
        each probe, orphans every ORPHAN_SCAN_SECONDS."""
        return bool(
            ((self._ledger.has_spooled() or self._backlog) and self._probe.due())
            or time.monotonic() >= self._next_scan
        )

    def replay(self, deadline: float | None = None, *, retry: bool = False) -> ReplayOutcome:
        """Write spooled segments (this writer's and orphans), oldest first, each through
        the sink's idempotent path. On the writer thread a failure hands the rows back at
        once (they stay on disk, and the next try waits for the next probe); with `retry`
        (`replay_spool`) the sink retries with backoff until `deadline`."""
        spool, sink = self._spool, self._sink
        self._next_scan = time.monotonic() + ORPHAN_SCAN_SECONDS
        if not retry and sink.outage_seconds() > 0 and not sink.probe():
            # Still down: claim nothing (claiming seals this writer's open segment, and
            # would hold orphans another writer might be able to replay).
            self._probe.later()
            return "failed"
        self._backlog = True
        self._forget_finished()
        divert = None if retry else _always
        for path, own in spool.claim():
            report: RowReport = self._ledger.own_spool() if own else self._ledger.orphan_spool()
            offset, resolved = self._progress.get(path, (0, 0))
            carry = self._carry.pop(path, [])
            for items, end in self._batches(path, offset, carry):
                try:
                    leftover, why, _ = sink.deliver(
                        items, mode="replay", divert=divert, ledger=report
                    )
                except Exception:  # a surprise must not skip, nor stall, the segment
                    logger.exception("spool replay of %s failed", path.name)
                    leftover, why = items, "divert"
                if leftover and why != "abort" and self._suspect(path, end):
                    leftover = self._isolate(leftover, report)
                resolved += len(items) - len(leftover)
                self._progress[path] = (end, resolved)
                if leftover:
                    self._probe.later()
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
                    self._ledger.spool_lost(
                        lost,
                        f"{lost} spooled entries were lost to damage in spool segment {path.name}",
                    )
            self._progress.pop(path, None)
            self._attempts.pop(path, None)
            spool.done(path)
            logger.info("replayed spool segment %s (%d rows)", path.name, resolved)
        self._backlog = False
        return "done"

    def _suspect(self, path: Path, end: int) -> bool:
        """After a failed try of a record: has it failed MAX_RECORD_ATTEMPTS times while
        the database answered? A database that is down counts no try against the record."""
        if not self._sink.probe():
            return False
        offset, tries = self._attempts.get(path, (end, 0))
        tries = tries + 1 if offset == end else 1
        self._attempts[path] = (end, tries)
        return tries >= MAX_RECORD_ATTEMPTS

    def _isolate(self, rows: list[Item], report: RowReport) -> list[Item]:
        """Replay a suspect record row by row: a row that fails while the database answers
        is dead-lettered, the others are written. Returns the rows left when the database
        stops answering midway (they are tried again later)."""
        logger.warning(
            "a spooled record keeps failing; replaying its %d rows one by one", len(rows)
        )
        for index, item in enumerate(rows):
            left, _, _ = self._sink.deliver([item], mode="replay", divert=_always, ledger=report)
            if not left:
                continue
            if not self._sink.probe():
                return rows[index:]
            report.dead(
                left,
                f"spool replay gave up on this row after {MAX_RECORD_ATTEMPTS} tries of its "
                f"record while the database answered (last error: {self._ledger.last_error()})",
            )
        return []

    def _forget_finished(self) -> None:
        """Drop the progress of segments gone from disk: an orphan this writer released after
        a failure and another writer then finished."""
        for path in [path for path in self._progress if not path.exists()]:
            self._progress.pop(path, None)
            self._carry.pop(path, None)
            self._attempts.pop(path, None)

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
        if self._abort.is_set() or (deadline is not None and time.monotonic() >= deadline):
            return True
        # The queue needs the thread: it must not drop entries while the spool drains.
        return self._should_yield()

    def _damage(self, damage: Damage) -> None:
        """Bytes of a segment that hold no readable record: a dead letter that says so."""
        reason = (
            f"spool {damage.what}: {damage.length} bytes at offset {damage.offset} of "
            f"{damage.segment} are unreadable; the entries they held are lost"
        )
        logger.error("%s", reason)
        note = {"segment": damage.segment, "offset": damage.offset, "bytes": damage.length}
        self._ledger.publish([(note, reason)])


def _always() -> bool:
    return True
