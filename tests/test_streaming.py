"""A backlog streams through one COPY: rows queued while a COPY is under way join it (up to
batch_size), instead of each batch ending its COPY and starting another."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from auditq import AuditWriter
from auditq.binary import Item
from auditq.entry import Row

from .conftest import Table, WriterFactory
from .helpers import own_sink, wait_until


class Recorder:
    """A ledger that keeps what the sink reports."""

    def __init__(self) -> None:
        self.written = 0
        self.dead_letters: list[tuple[Item, str]] = []
        self.rejected: list[tuple[Row, str]] = []
        self.errors: list[str] = []

    def committed(self, count: int) -> None:
        self.written += count

    def dead(self, items: Sequence[Item], reason: str) -> None:
        self.dead_letters.extend((item, reason) for item in items)

    def retrying(self, error: str) -> None:
        self.errors.append(error)

    def rejected_rows(self, rows: Sequence[tuple[Row, str]]) -> None:
        self.rejected.extend(rows)


def _row(n: int, resource_id: str = "ok") -> Row:
    return (
        None,
        time.time_ns(),
        "stream.test",
        "tenant-1",
        "user-1",
        None,
        "document",
        resource_id,
        None,
        None,
        None,
        str(n),
        None,
    )


def _chunks_of(rows: list[Row], size: int) -> Callable[[], list[Row]]:
    """A `more()` that hands over `rows` `size` at a time, then nothing."""
    pending = list(rows)

    def more() -> list[Row]:
        taken, pending[:] = pending[:size], pending[size:]
        return taken

    return more


def _transactions(table: Table) -> int:
    return int(table.query("SELECT count(DISTINCT xmin::text) FROM {table}")[0][0])


def test_rows_from_more_join_the_same_copy(table: Table) -> None:
    ledger = Recorder()
    rows = [_row(n) for n in range(4500)]
    with own_sink(table.dsn, table.schema, table.name, ledger) as sink:
        handed = sink.deliver_rows(rows[:1000], more=_chunks_of(rows[1000:], 1000))
    assert handed.items == [] and ledger.written == 4500
    assert table.count() == 4500 == table.distinct_ids()
    assert _transactions(table) == 1  # one COPY, one transaction
    numbers = sorted(int(r[0]) for r in table.query("SELECT request_id FROM {table}"))
    assert numbers == list(range(4500))


def test_a_row_the_server_rejects_in_a_later_chunk_sinks_only_itself(table: Table) -> None:
    table.execute("ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (resource_id <> 'poison')")
    ledger = Recorder()
    rows = [_row(n, "poison" if n == 3210 else "ok") for n in range(4000)]
    with own_sink(table.dsn, table.schema, table.name, ledger) as sink:
        handed = sink.deliver_rows(rows[:1000], more=_chunks_of(rows[1000:], 1000))
    assert handed.items == []
    assert ledger.written == 3999 and table.count() == 3999
    assert len(ledger.dead_letters) == 1
    item, reason = ledger.dead_letters[0]
    assert item[1] is not None and item[1][11] == "3210"
    assert 'violates check constraint "no_poison"' in reason
    stored = {int(r[0]) for r in table.query("SELECT request_id FROM {table}")}
    assert stored == set(range(4000)) - {3210}


def _held_at(request_id: str, release: threading.Event) -> Callable[[dict[str, Any]], Any]:
    """A `before_write` hook that holds the writer thread at one entry until `release`."""

    def hook(entry: dict[str, Any]) -> dict[str, Any]:
        if entry["request_id"] == request_id:
            assert release.wait(30)
        return entry

    return hook


def _queue_backlog_while_held(writer: AuditWriter, release: threading.Event) -> None:
    """5,000 entries the writer takes (and is held on), then 15,000 more queued meanwhile."""
    try:
        for n in range(5_000):
            assert writer.log("stream.test", request_id=str(n))
        assert wait_until(lambda: len(writer._buffer) == 0, timeout=10)
        for n in range(5_000, 20_000):
            assert writer.log("stream.test", request_id=str(n))
        assert writer.stats().pending == 20_000 and writer.stats().written == 0
    finally:
        release.set()  # never leave the writer thread held (teardown closes it)


def _per_transaction(table: Table) -> list[int]:
    rows = table.query(
        "SELECT count(*), min(request_id::int) FROM {table} GROUP BY xmin::text ORDER BY 2"
    )
    return [int(r[0]) for r in rows]


def test_a_backlog_queued_during_a_copy_goes_into_that_copy(
    table: Table, make_writer: WriterFactory
) -> None:
    # The writer is held on the last entry of its first batch while the backlog queues up;
    # the COPY it then starts takes the whole backlog.
    release = threading.Event()
    writer = make_writer(
        batch_size=20_000, flush_interval=60, before_write=_held_at("4999", release)
    )
    _queue_backlog_while_held(writer, release)
    assert writer.flush(timeout=60)
    stats = writer.stats()
    assert (stats.written, stats.batches, stats.dead_lettered) == (20_000, 1, 0)
    assert table.count() == 20_000 == table.distinct_ids()
    assert _per_transaction(table) == [20_000]
