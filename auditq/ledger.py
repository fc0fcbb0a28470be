"""The ledger: where every accepted entry is accounted for, in one place.

Each entry moves through states (queued, in flight, then written, dead-lettered or spooled),
and the two invariants

    accepted == written + dead_lettered + spooled + pending + filtered
    calls    == accepted + dropped_overflow + rejected

must hold in every snapshot. So every move of an accepted entry happens here, under one
lock, and `snapshot()` reads all counters under that same lock. Calls refused at the call
are the exception: each thread counts its own without the lock (a closing writer hammered by
callers must not make its own thread wait for the lock), and `snapshot()` sums those counts
under the lock, so the invariants stay exact. The sink, the spool replay and the delivery
policy report to the ledger; none of them keeps a counter of its own.

The lock is never held across I/O: callers that touch it (a drop) never wait on the
database. Reports (rate-limited log lines) and dead-letter publishing (the file and the
callback) happen outside it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import orjson

from . import binary
from .binary import Item
from .buffer import Buffer
from .entry import Row
from .redact import loggable
from .stats import WriterStats

logger = logging.getLogger("auditq")
#: Each dead letter, as one JSON line at ERROR, when there is neither a spool (whose file
#: keeps them) nor an `on_dead_letter` callback: a log shipper then keeps its content.
letters_logger = logging.getLogger("auditq.dead_letters")

#: Dead letters logged (no spool, no callback) in one record, one JSON line each, when more
#: than this many are given up at once; fewer get a record each.
LETTERS_PER_RECORD: Final = 100

#: Distinct reasons a report line counts separately; the rest are summed as "other reasons".
MAX_REASONS: Final = 8


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An accepted entry that will never be written, and why."""

    entry: dict[str, Any]
    reason: str
    at: datetime


DeadLetterHandler = Callable[[DeadLetter], None]


class DeadLetterFile(Protocol):
    """Where dead letters are filed on disk (the spool's `dead-letters.jsonl`)."""

    def write_dead_letters(self, records: list[dict[str, Any]]) -> int: ...


class RowReport(Protocol):
    """What the sink reports about the rows of one delivery (`Sink.deliver`)."""

    def committed(self, count: int) -> None: ...
    def dead(self, items: Sequence[Item], reason: str) -> None: ...
    def retrying(self, error: str) -> None: ...


def _describe(row: Row | dict[str, Any], origin: str | None) -> dict[str, Any]:
    """A dead letter's entry as a JSON-friendly dict, its metadata as an object again (it is
    queued and spooled as JSON text)."""
    entry = row if isinstance(row, dict) else binary.describe_row(row, origin=origin)
    metadata = entry.get("metadata")
    if isinstance(metadata, str):
        try:
            entry = {**entry, "metadata": orjson.loads(metadata)}
        except orjson.JSONDecodeError:
            pass  # kept as text: it is what was queued
    return entry


def _action(row: Row | dict[str, Any]) -> Any:
    return row.get("action") if isinstance(row, dict) else row[2] if len(row) > 2 else None


class _Tally:
    """What happened since the last report line: how many, per reason (at most
    MAX_REASONS reasons), each with the action of one entry it happened to, so a line says
    which events are affected and why, not only the last reason."""

    __slots__ = ("reasons", "total")

    def __init__(self) -> None:
        self.total = 0
        self.reasons: dict[str, list[Any]] = {}  # reason -> [count, example action]

    def add(self, reason: str, count: int = 1, action: Any = None) -> None:
        self.total += count
        if reason not in self.reasons and len(self.reasons) >= MAX_REASONS:
            reason = "other reasons"
        entry = self.reasons.setdefault(reason, [0, action])
        entry[0] += count
        if entry[1] is None:
            entry[1] = action

    def describe(self, scrub: Callable[[str], str]) -> str:
        parts = []
        for reason, (count, action) in self.reasons.items():
            example = "" if action is None else f" (e.g. action {_short(action)})"
            parts.append(f"{count} x {scrub(loggable(reason))}{example}")
        return "; ".join(parts)


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = object.__repr__(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _RejectCell:
    """One thread's refused calls: `count` and `reasons` are changed by that thread only,
    `reported` (the count the last report line covered) by the reporter, under the lock."""

    __slots__ = ("count", "reasons", "reported", "thread")

    def __init__(self) -> None:
        self.count = 0
        self.reported = 0
        self.reasons = _Tally()
        # Whose cell this is: once that thread has ended, its count is folded into the
        # ledger's and the cell let go (a thread per request must not leave one each).
        self.thread = threading.current_thread()


class Ledger:
    """The counters of one writer, the condition `flush()` waits on, and its reports."""

    def __init__(
        self,
        buffer: Buffer,
        *,
        warn_interval: float,
        on_dead_letter: DeadLetterHandler | None,
        letter_file: DeadLetterFile | None,
        letter_file_note: str,
        scrub: Callable[[str], str],
        origin: str | None = None,
    ) -> None:
        # The writer's origin, shown in its dead letters as in its rows.
        self._origin = origin
        self._buffer = buffer
        self._warn_interval = warn_interval
        # Called on the writer thread with each dead letter (replaceable on a live writer).
        self.on_dead_letter = on_dead_letter
        # The spool's dead-letter file (None without a spool) and what to say when it is full.
        self._letter_file = letter_file
        self._letter_file_note = letter_file_note
        # Masks the DSN's secrets in report lines (an error text may quote the DSN).
        self._scrub = scrub
        # Guards every counter below and the move of rows out of the buffer.
        self._lock = threading.Lock()
        # flush() waiters sleep here until enough rows are resolved.
        self._resolved_cond = threading.Condition(self._lock)
        # The writer thread, so that its reports can be told apart once close() gave up
        # on it (see `abandon`).
        self.writer_thread: threading.Thread | None = None
        # Set by `abandon()`: close() counted the stuck thread's in-flight rows as dead
        # letters, and what that thread later reports for them only corrects that count.
        self._abandoned = False
        self._taken = 0  # rows ever removed from the buffer (by the writer or close())
        self._inflight = 0  # taken but not yet resolved
        self._written = 0
        self._dead = 0
        self._unconfirmed = 0  # of those, rows whose commit was cut in flight at close()
        self._spooled = 0  # this writer's rows on disk, waiting for replay
        self._replayed = 0  # rows from other processes' spools that this writer wrote
        self._replay_dead = 0  # ... and those it dead-lettered
        self._filtered = 0  # dropped on purpose by the application's before_write hook
        self._dropped = 0
        # Calls refused at the call, one cell per thread that had one (see `rejected`).
        self._local = threading.local()
        self._reject_cells: list[_RejectCell] = []
        self._rejected_done = 0  # ... and those of threads that have ended since
        self._batches = 0
        self._retries = 0
        self._last_error: str | None = None
        self._last_write_at: datetime | None = None
        # Rate-limited reporting: what happened since the last line, and when that was.
        self._unreported_drops = 0
        self._last_reject_reason = ""
        self._dead_tally = _Tally()
        self._last_report = float("-inf")
        # Dead letters the dead-letter file had no room for, since the last report, and
        # those it refused (a full or read-only disk), with the error.
        self._unfiled_letters = 0
        self._letter_file_errors = 0
        self._letter_file_error = ""
        # Batches the spool refused (the disk, not its bound) since the last report.
        self._spool_refusals = 0
        self._spool_refusal = ""

    # -- the caller's side ---------------------------------------------------------------

    def dropped(self) -> None:
        """A call the full queue refused."""
        with self._lock:
            self._dropped += 1
            self._unreported_drops += 1

    def rejected(self, reason: str, action: Any = None) -> None:
        """A call refused at the call (invalid, or the writer closed). Counted without the
        lock, in a cell of the calling thread's own (only that thread ever changes it):
        callers refused flat out (say, while close() drains) must not contend with the
        writer thread for the lock it needs for every batch."""
        try:
            cell: _RejectCell = self._local.cell
        except AttributeError:
            cell = _RejectCell()
            with self._lock:
                self._reject_cells.append(cell)
            self._local.cell = cell
        cell.reasons.add(reason, 1, action)
        cell.count += 1
        self._last_reject_reason = reason

    def _rejected_count(self) -> int:
        """All refused calls (lock held)."""
        return self._rejected_done + sum(cell.count for cell in self._reject_cells)

    def _fold_finished(self) -> list[_RejectCell]:
        """Cells of threads that have ended, taken out of the list, their counts folded
        into `_rejected_done` (lock held); returned for their last report."""
        ended = [cell for cell in self._reject_cells if not cell.thread.is_alive()]
        if ended:
            self._reject_cells = [cell for cell in self._reject_cells if cell.thread.is_alive()]
            self._rejected_done += sum(cell.count for cell in ended)
        return ended

    # -- taking rows -----------------------------------------------------------------------

    def take(self, limit: int, *, at_least: int = 1) -> list[Row]:
        """Move up to `limit` queued rows into flight; none while fewer than `at_least`
        are queued."""
        with self._lock:
            if len(self._buffer) < at_least:
                return []
            rows = self._buffer.take(limit)
            self._taken += len(rows)
            self._inflight += len(rows)
            return rows

    def take_all(self) -> list[Row]:
        """Everything still queued, into flight (close())."""
        return self.take(len(self._buffer))

    # -- what became of rows in flight ------------------------------------------------------

    def committed(self, count: int) -> None:
        with self._lock:
            self._written += count
            if self._abandoned_report():
                self._dead -= count  # close() wrote these off, but they did commit
            else:
                self._inflight -= count
            self._batches += 1
            self._last_write_at = datetime.now(UTC)
            self._resolved_cond.notify_all()

    def dead(self, items: Sequence[Item], reason: str) -> None:
        self.dead_rows([(binary.entry_view(item), reason) for item in items])

    def rejected_rows(self, rows: Sequence[tuple[Row, str]]) -> None:
        """Rows that failed their checks on the writer side: dead letters, with reasons."""
        self.dead_rows(rows)

    def dead_rows(self, rows: Sequence[tuple[Row | dict[str, Any], str]]) -> None:
        """Resolve in-flight rows as dead letters, each with its reason."""
        if not rows:
            return
        # Filed (and handed to the callback) before they count as resolved: once flush()
        # returns, a dead letter is in the file.
        self.publish(rows)
        with self._lock:
            if not self._abandoned_report():  # else close() has counted them already
                self._dead += len(rows)
                self._inflight -= len(rows)
                for row, reason in rows:
                    self._dead_tally.add(reason, 1, _action(row))
            self._resolved_cond.notify_all()
        if threading.current_thread() is not self.writer_thread:
            self.report()  # close() or an inline drain: the writer thread will not say it

    def unconfirmed(self, count: int) -> None:
        """Of the dead letters about to be reported, rows whose commit was cut in flight."""
        with self._lock:
            self._unconfirmed += count

    def spooled(self, count: int) -> None:
        """In-flight rows now on disk, waiting for replay."""
        with self._lock:
            if self._abandoned_report():
                self._dead -= count  # close() wrote these off, but they are on disk
            else:
                self._inflight -= count
            self._spooled += count
            self._resolved_cond.notify_all()

    def filtered(self, count: int) -> None:
        """In-flight rows the application's `before_write` hook dropped on purpose."""
        if not count:
            return
        with self._lock:
            self._inflight -= count
            self._filtered += count
            self._resolved_cond.notify_all()

    def retrying(self, error: str) -> None:
        with self._lock:
            self._retries += 1
            self._last_error = error

    def last_error(self) -> str | None:
        with self._lock:
            return self._last_error

    # -- the spool's rows (replay) ----------------------------------------------------------

    def own_spool(self) -> RowReport:
        """Where a replay of this writer's own segments reports: spooled -> written/dead."""
        return _OwnSpoolReport(self)

    def orphan_spool(self) -> RowReport:
        """Where a replay of another process's segments reports: counted apart."""
        return _OrphanSpoolReport(self)

    def spool_lost(self, count: int, reason: str) -> None:
        """Own spooled rows that a damaged segment no longer holds."""
        with self._lock:
            self._spooled -= count
            self._dead += count
            self._dead_tally.add(reason, count)

    def spool_refused(self, error: str) -> None:
        """The spool's disk refused a batch (it stays in flight, retried as without a
        spool): said once per report interval."""
        with self._lock:
            self._spool_refusals += 1
            self._spool_refusal = error

    def has_spooled(self) -> bool:
        return self._spooled > 0  # a read of one int: no lock needed for a hint

    # -- close() ----------------------------------------------------------------------------

    def abandon(self) -> None:
        """close() gives up on a writer thread stuck past its deadline: its in-flight rows
        are counted as dead letters now."""
        with self._lock:
            self._abandoned = True
            stuck, self._inflight = self._inflight, 0
            self._dead += stuck
            if stuck:
                self._dead_tally.add("not written before close() timed out", stuck)
            self._resolved_cond.notify_all()

    def _abandoned_report(self) -> bool:
        """True for a report from a writer thread that close() gave up on (lock held)."""
        return self._abandoned and threading.current_thread() is self.writer_thread

    # -- flush() ----------------------------------------------------------------------------

    def target(self) -> int:
        """How many rows must be resolved for everything accepted so far to be."""
        with self._lock:
            return self._taken + len(self._buffer)

    def wait_resolved(self, target: int, deadline: float | None) -> bool:
        """Wait until `target` rows are resolved; False if `deadline` passes first."""
        with self._resolved_cond:
            while self._taken - self._inflight < target:
                if deadline is None:
                    self._resolved_cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._resolved_cond.wait(remaining)
        return True

    def settled(self) -> bool:
        """Nothing queued or in flight."""
        with self._lock:
            return self._inflight == 0 and len(self._buffer) == 0

    def pending(self) -> int:
        with self._lock:
            return self._inflight + len(self._buffer)

    # -- stats() and reports -----------------------------------------------------------------

    def snapshot(self) -> WriterStats:
        """A consistent snapshot of the counters: the invariants hold in it."""
        with self._lock:
            queued = len(self._buffer)
            return WriterStats(
                accepted=self._taken + queued,
                written=self._written,
                dropped_overflow=self._dropped,
                rejected=self._rejected_count(),
                dead_lettered=self._dead,
                spooled=self._spooled,
                pending=self._inflight + queued,
                batches=self._batches,
                retries=self._retries,
                last_error=self._last_error,
                last_write_at=self._last_write_at,
                replayed=self._replayed,
                replay_dead_lettered=self._replay_dead,
                unconfirmed=self._unconfirmed,
                filtered=self._filtered,
            )

    def last_reject_reason(self) -> str:
        return self._last_reject_reason

    def publish(self, rows: Sequence[tuple[Row | dict[str, Any], str]]) -> None:
        """Hand dead letters to the dead-letter file and the callback (never raises)."""
        now = datetime.now(UTC)
        letters = [DeadLetter(_describe(row, self._origin), reason, now) for row, reason in rows]
        if self._letter_file is not None:
            records = [
                {"entry": d.entry, "reason": d.reason, "at": d.at.isoformat()} for d in letters
            ]
            try:
                kept = self._letter_file.write_dead_letters(records)
            except OSError as exc:  # a full or read-only disk: said by report(), once
                with self._lock:
                    self._letter_file_errors += len(records)
                    self._letter_file_error = f"{type(exc).__name__}: {exc}"
            else:
                if kept < len(records):  # no room left in the file: said by report()
                    with self._lock:
                        self._unfiled_letters += len(records) - kept
        handler = self.on_dead_letter
        if (
            handler is None
            and self._letter_file is None
            and letters_logger.isEnabledFor(logging.ERROR)
        ):
            lines = [
                orjson.dumps(
                    {"entry": letter.entry, "reason": loggable(letter.reason), "at": letter.at},
                    default=str,
                ).decode()
                for letter in letters
            ]
            # One record a letter, as a log search expects; but many at once (close()'s
            # leftovers, up to max_queue of them) go LETTERS_PER_RECORD lines to a record:
            # a record each cost ~30 µs with a file handler, seconds past close()'s timeout.
            per_record = 1 if len(lines) <= LETTERS_PER_RECORD else LETTERS_PER_RECORD
            for start in range(0, len(lines), per_record):
                letters_logger.error("%s", "\n".join(lines[start : start + per_record]))
        if handler is not None:
            for letter in letters:
                try:
                    handler(letter)
                except BaseException:  # even SystemExit: it must not end the writer thread
                    logger.exception("on_dead_letter callback failed")

    def report(self, *, final: bool = False) -> None:
        """Rate-limited warnings for drops, rejections and dead letters; `final` (close())
        says what is left whatever the interval, so nothing goes unsaid."""
        now = time.monotonic()
        with self._lock:
            if not final and now - self._last_report < self._warn_interval:
                return
            drops, self._unreported_drops = self._unreported_drops, 0
            rejects = _Tally()
            rejected = 0  # the number said: from the counts, exact whatever the reasons
            ended = self._fold_finished()
            for cell in [*self._reject_cells, *ended]:
                count, tally = cell.count, cell.reasons
                if count == cell.reported:
                    continue
                cell.reasons = _Tally()
                # The owner may still be adding to `tally` (it read it before the swap):
                # its reasons are read from a copy, its number from the count.
                for reason, (n, action) in list(tally.reasons.items()):
                    rejects.add(reason, n, action)
                unnamed = count - cell.reported - tally.total
                if unnamed > 0:
                    rejects.add("refused while this report was being made", unnamed)
                rejected += count - cell.reported
                cell.reported = count
            dead, self._dead_tally = self._dead_tally, _Tally()
            unfiled, self._unfiled_letters = self._unfiled_letters, 0
            file_errors, self._letter_file_errors = self._letter_file_errors, 0
            refusals, self._spool_refusals = self._spool_refusals, 0
            if drops or rejected or dead.total or unfiled or file_errors or refusals:
                self._last_report = now
        if drops:
            logger.warning(
                "queue full (max_queue=%d): dropped %d entries since the last report",
                self._buffer.max_queue,
                drops,
            )
        if rejected:
            logger.warning(
                "rejected %d invalid entries since the last report: %s",
                rejected,
                rejects.describe(self._scrub),
            )
        if dead.total:
            logger.error(
                "dead-lettered %d entries since the last report: %s",
                dead.total,
                dead.describe(self._scrub),
            )
        if file_errors:
            logger.error(
                "could not write %d dead letters to the dead-letter file (%s); they are "
                "counted in stats() and passed to on_dead_letter",
                file_errors,
                self._scrub(self._letter_file_error),
            )
        if refusals:
            logger.warning(
                "the spool refused %d batches (%s): holding entries in memory up to "
                "max_queue=%d meanwhile, as without a spool; the spool is tried again later",
                refusals,
                self._scrub(self._spool_refusal),
                self._buffer.max_queue,
            )
        if unfiled:
            logger.error(
                "%s: %d dead letters since the last report were not written to it (they are "
                "counted in stats() and passed to on_dead_letter); move the file aside to "
                "make room",
                self._letter_file_note,
                unfiled,
            )


class _OwnSpoolReport:
    """Replaying this writer's own spool: rows move from spooled to written/dead."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def committed(self, count: int) -> None:
        ledger = self._ledger
        with ledger._lock:
            ledger._spooled -= count
            ledger._written += count
            ledger._batches += 1
            ledger._last_write_at = datetime.now(UTC)

    def dead(self, items: Sequence[Item], reason: str) -> None:
        ledger = self._ledger
        views = [binary.entry_view(item) for item in items]
        ledger.publish([(view, reason) for view in views])
        with ledger._lock:
            ledger._spooled -= len(items)
            ledger._dead += len(items)
            for view in views:
                ledger._dead_tally.add(reason, 1, _action(view))

    def retrying(self, error: str) -> None:
        self._ledger.retrying(error)


class _OrphanSpoolReport(_OwnSpoolReport):
    """Replaying a spool left by another process: counted apart, as `replayed`."""

    def committed(self, count: int) -> None:
        ledger = self._ledger
        with ledger._lock:
            ledger._replayed += count
            ledger._batches += 1
            ledger._last_write_at = datetime.now(UTC)

    def dead(self, items: Sequence[Item], reason: str) -> None:
        ledger = self._ledger
        with ledger._lock:
            ledger._replay_dead += len(items)
        ledger.publish([(binary.entry_view(item), reason) for item in items])
