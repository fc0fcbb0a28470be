"""Counters and their immutable snapshot.

The invariants hold in every snapshot, because a snapshot is taken under the same lock that
moves entries between states:

    accepted == written + dead_lettered + spooled + pending + filtered
    calls    == accepted + dropped_overflow + rejected
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class WriterStats:
    """A point-in-time view of one writer (in this process; a forked child starts at zero)."""

    #: Entries handed to the queue (`log`/`write` returned True).
    accepted: int
    #: Entries committed to the table.
    written: int
    #: Entries refused because the queue was full (the caller got False).
    dropped_overflow: int
    #: Entries refused at the call: missing action, unserialisable metadata, writer closed.
    rejected: int
    #: Entries the writer could not write (bad data, shutdown timeout), each with a reason.
    dead_lettered: int
    #: Entries on disk waiting for replay (0 until a spool is configured).
    spooled: int
    #: Entries queued or in flight.
    pending: int
    #: Transactions committed.
    batches: int
    #: Failed write attempts that were retried.
    retries: int
    #: The last write error, secrets removed; None after nothing failed yet.
    last_error: str | None
    #: When the last batch committed.
    last_write_at: datetime | None
    #: Rows from spools left by other processes that this writer wrote (outside `accepted`).
    replayed: int = 0
    #: Rows from such spools that it dead-lettered.
    replay_dead_lettered: int = 0
    #: Of `dead_lettered`: rows close() gave up on while their commit was in flight (no
    #: spool to hand them to). The server may have committed any of them, so the table
    #: holds between `written` and `written + unconfirmed` rows of this writer.
    unconfirmed: int = 0
    #: Entries the application's `before_write` hook dropped on purpose (returned None).
    filtered: int = 0

    @property
    def calls(self) -> int:
        """Every call that offered an entry, whatever became of it."""
        return self.accepted + self.dropped_overflow + self.rejected
