"""The writer thread's policy for each batch: take rows, write them through the sink, divert
them to the spool in a long outage, replay the spool when the database is back, and give up
on what close() cannot get written in time.

The writer (`writer.py`) owns the thread and the lifecycle; this module decides what the
thread does with the rows. What becomes of each row is reported to the ledger; nothing here
counts anything itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from . import hooks
from .binary import Item
from .buffer import Buffer, release
from .config import DEFAULT_BATCH_SIZE
from .entry import Row
from .hooks import BeforeWrite
from .ledger import Ledger
from .replay import ProbeClock, SpoolReplayer
from .sink import CHUNK_ROWS, DATA, Sink
from .spool import Spool, SpoolFull

logger = logging.getLogger("auditq")


class Delivery:
    """How one writer's rows reach the table (or the spool, or the dead letters)."""

    def __init__(
        self,
        buffer: Buffer,
        ledger: Ledger,
        sink: Sink,
        spool: Spool | None,
        *,
        batch_size: int,
        spool_after: float,
        retry_backoff_max: float,
        abort: threading.Event,
        before_write: BeforeWrite | None = None,
    ) -> None:
        self._buffer = buffer
        # The application's redaction/enrichment hook, run on each row before it is encoded.
        self._before_write = before_write
        self._ledger = ledger
        self._sink = sink
        self._spool = spool
        self._batch_size = batch_size
        self._spool_after = spool_after
        # Set by close() at its deadline: the sink stops retrying and hands rows back.
        self._abort = abort
        # Set by close(): batches that cannot be written now go to the spool at once, and
        # nothing is replayed (what is spooled stays for the next writer).
        self.closing = False
        # When the database may next be tried while this writer spools through an outage.
        self._probe = ProbeClock(retry_backoff_max)
        # Until when (monotonic) the spool is left alone after its disk refused a batch
        # (full, read-only): meanwhile rows stay in memory and are retried as without a
        # spool, so a broken spool never loses more than no spool at all.
        self._spool_rests_until = 0.0
        self._spool_rest = max(1.0, retry_backoff_max)
        # The lists of rows the batch under way has taken (see `drain`).
        self._held: list[list[Row]] = []
        # Replays the spool once the database answers again (None without a spool); made
        # anew with the delivery, so a forked child keeps none of the parent's progress.
        self._replayer = (
            None
            if spool is None
            else SpoolReplayer(
                spool,
                sink,
                ledger,
                probe=self._probe,
                abort=abort,
                should_yield=self._queue_needs_thread,
            )
        )

    # -- the writer thread's work ---------------------------------------------------------

    def warm_up(self) -> None:
        """Open the connection while the first batch is still filling up (see Sink)."""
        self._sink.warm_up()

    def drain(self, drain_all: bool) -> None:
        """Write batches until the queue is empty (or, unless `drain_all`, holds fewer rows
        than wake the writer)."""
        at_least = 1 if drain_all else self._buffer.wake_rows
        while not self._abort.is_set():
            rows = self._ledger.take(self._batch_rows(), at_least=at_least)
            if not rows:
                return
            rows = self._rewrite(rows)
            # Every row the batch takes stays referenced here until it is resolved, so that
            # the sink's own lists die with nothing to free, and the rows are freed below a
            # piece at a time (see `release`).
            self._held = [rows]
            try:
                if rows:
                    self._deliver(rows)
            finally:
                held, self._held = self._held, []
                for part in held:
                    release(part)

    def drain_until(self, deadline: float) -> None:
        """close() without a writer thread: drain here, bounded by `deadline`."""
        self._sink.deadline = deadline
        self.drain(drain_all=True)

    def upkeep(self) -> None:
        """At each wake-up of the writer thread: replay spooled segments once the database
        may be back (see `SpoolReplayer.due`), and fsync what the "interval" policy left
        unsynced. A closing writer replays nothing: what it spooled stays for the next
        writer."""
        spool, replayer = self._spool, self._replayer
        if spool is None or replayer is None:
            return
        if not self.closing and replayer.due():
            replayer.replay()
        try:
            spool.sync(due_only=True)
        except OSError:
            logger.exception("could not fsync the spool")

    def give_up_queued(self) -> None:
        """close(), after its deadline: what is still queued is spooled or dead-lettered."""
        leftovers = self._ledger.take_all()
        if leftovers:
            items, bad = self._sink.make_items(leftovers)
            self._ledger.dead_rows(bad)
            self._give_up(items)
            release(items)
            release(leftovers)

    def replay_spool(self, deadline: float | None) -> bool:
        """Replay every spooled segment no live writer holds, now, in the calling thread,
        retrying a failing database with backoff until `deadline` (`auditq spool replay`).
        True when nothing is left that this writer could take."""
        replayer = self._replayer
        if replayer is None:
            raise ValueError("this writer has no spool_dir")
        self._sink.deadline = deadline
        try:
            return replayer.replay(deadline, retry=True) == "done"
        finally:
            self._sink.deadline = None

    # -- one batch --------------------------------------------------------------------------

    def _deliver(self, rows: list[Row]) -> None:
        """Write one batch. With a spool: a write that keeps failing for `spool_after` (or
        while the queue fills up, or at close) is diverted to disk; while this writer's own
        spool is not empty and the database was failing a moment ago, batches go straight to
        disk without waiting on it again; once it may be back, the spool is replayed before
        this batch is written (yielding to the queue only when that fills up)."""
        replayer = self._replayer
        if (
            replayer is not None
            and self._ledger.has_spooled()
            and self._spool_usable()
            and self._sink.outage_seconds() > 0
            and (self.closing or not self._probe.due() or replayer.replay() == "failed")
        ):
            items, bad = self._sink.make_items(rows)
            self._ledger.dead_rows(bad)
            refused = self._to_spool(items)
            if not refused:
                release(items)
                return
            handed = self._sink.deliver(refused, divert=self._should_divert)
        else:
            handed = self._sink.deliver_rows(
                rows, divert=self._should_divert, more=self._follow_on(len(rows))
            )
        while handed.why == "divert":
            self._probe.later()
            refused = self._to_spool(handed.items)
            if not refused:
                release(handed.items)
                return
            # The spool's disk refused them: keep them and go on trying the database.
            handed = self._sink.deliver(refused, divert=self._should_divert)
        if handed.items:
            self._give_up(handed.items, unconfirmed=handed.unconfirmed)
            release(handed.items)

    def _follow_on(self, taken: int) -> Callable[[], list[Row]]:
        """More rows for the COPY under way, up to `batch_size` rows in all, while at least
        a chunk of them is queued: a backlog streams through one COPY, but a trickle does
        not keep a COPY (and its transaction) open. Nothing once close() is cutting the
        writer short: what is still queued is then close()'s to account for."""
        budget = self._batch_rows() - taken

        def more() -> list[Row]:
            nonlocal budget
            want = min(CHUNK_ROWS, budget)
            if want <= 0 or self._sink.stopping():
                return []
            rows = self._ledger.take(want, at_least=want)
            budget -= len(rows)
            rows = self._rewrite(rows)
            self._held.append(rows)
            return rows

        return more

    def _batch_rows(self) -> int:
        """Rows per COPY: `batch_size`, and at least the default one while close() drains.
        Each COPY costs the writer thread a few waits for the GIL (its start, its end, the
        result), and callers still calling a closing writer flat out hold the GIL for the
        rest: small batches would then spend close()'s whole timeout waiting, not writing.
        A server that cancels large COPYs still gets smaller ones (the sink's row cap)."""
        if self.closing:
            return max(self._batch_size, DEFAULT_BATCH_SIZE)
        return self._batch_size

    def _rewrite(self, rows: list[Row]) -> list[Row]:
        """Rows through the `before_write` hook: what it drops is counted as filtered, what
        it fails on is dead-lettered with the reason."""
        hook = self._before_write
        if hook is None or not rows:
            return rows
        kept, bad, dropped = hooks.run(hook, rows)
        self._ledger.dead_rows(bad)
        self._ledger.filtered(dropped)
        return kept

    def _should_divert(self) -> bool:
        """After a failed attempt (and during its backoff): stop retrying and spool? Only
        with a spool, and when the outage has lasted `spool_after`, the queue is half
        full, or the writer is closing."""
        if self._spool is None or not self._spool_usable():
            return False
        return (
            self.closing
            or self._sink.outage_seconds() >= self._spool_after
            or len(self._buffer) >= self._buffer.max_queue // 2
        )

    def _queue_needs_thread(self) -> bool:
        """A replay on the writer thread yields when the queue fills up: it must not drop
        entries while the spool drains."""
        return threading.current_thread() is self._ledger.writer_thread and (
            self._buffer.half_full()
        )

    def _spool_usable(self) -> bool:
        return time.monotonic() >= self._spool_rests_until

    def _to_spool(self, items: list[Item]) -> list[Item]:
        """Move in-flight rows to the spool (or, past its bound, to the dead letters).
        Returns the rows its disk refused (full, read-only, ...): they stay in flight."""
        assert self._spool is not None
        if not items:
            return []
        try:
            self._spool.append([item[DATA] for item in items])
        except SpoolFull as exc:
            self._ledger.dead(
                items,
                f"not written: the database is unavailable and the spool refused them ({exc})",
            )
            self._sink.abandoned(items)
            return []
        except OSError as exc:
            self._spool_rests_until = time.monotonic() + self._spool_rest
            self._ledger.spool_refused(f"{type(exc).__name__}: {exc}")
            return items
        self._ledger.spooled(len(items))
        self._sink.handed_off(items)
        return []

    def _give_up(self, items: list[Item], *, unconfirmed: int = 0) -> None:
        """Rows close() could not get written in time: spool them if possible, else dead.
        The first `unconfirmed` had their commit cut in flight and may be in the table."""
        if not items:
            return
        if self._spool is not None:
            # A replay dedupes, so rows that did commit stay single. What the disk refuses
            # is given up on below, as without a spool.
            refused = self._to_spool(items)
            unconfirmed = max(0, unconfirmed - (len(items) - len(refused)))
            items = refused
            if not items:
                return
        self._sink.abandoned(items)
        if unconfirmed:
            self._ledger.unconfirmed(unconfirmed)
            self._ledger.dead(
                items[:unconfirmed],
                "close() timed out while the commit was in flight: the outcome is unknown,"
                " so this row may also be in the table",
            )
        if items[unconfirmed:]:
            last_error = self._ledger.last_error()
            self._ledger.dead(
                items[unconfirmed:],
                "not written before close() timed out"
                + (f" (last error: {last_error})" if last_error else ""),
            )
