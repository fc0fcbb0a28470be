"""A batch's rejects are reported after the rest of it resolves (flush() counts resolved
rows), a dead letter whose values cannot even be shown is still reported, and a failed
warm start does not stop the writer."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

import pytest

from auditq.binary import Item
from auditq.entry import Row
from auditq.watchdog import Watchdog
from auditq.writer import DeadLetter

from .conftest import Table, WriterFactory
from .helpers import own_sink


class Events:
    """A ledger that records the order of what the sink reports."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def committed(self, count: int) -> None:
        self.seen.append(("committed", count))

    def dead(self, items: Sequence[Item], reason: str) -> None:
        self.seen.append(("dead", len(items)))

    def retrying(self, error: str) -> None:
        self.seen.append(("retrying", 0))

    def rejected_rows(self, rows: Sequence[tuple[Row, str]]) -> None:
        self.seen.append(("rejected", len(rows)))


def _deliver(table: Table, rows: list[Row]) -> list[tuple[str, int]]:
    events = Events()
    with own_sink(table.dsn, table.schema, table.name, events) as sink:
        assert sink.deliver_rows(rows).items == []
    return events.seen


def _row(
    request_id: str, resource_id: str = "ok", actor_id: Any = "user-1", action: str = "order.test"
) -> Row:
    return (None, time.time_ns(), action, "t", actor_id, None, "doc", resource_id,
            None, None, None, request_id, None)  # fmt: skip


#: A queued row the encoder rejects: content is repaired (docs/fields.md), but a row
#: without an action cannot be a row.
_REJECTED: Final = {"action": ""}


def test_rejects_come_after_the_commit(table: Table) -> None:
    rows = [_row("1"), _row("2", **_REJECTED), _row("3")]
    assert _deliver(table, rows) == [("committed", 2), ("rejected", 1)]
    assert table.count() == 2


def test_rejects_come_after_a_failed_batch_is_resolved(table: Table) -> None:
    table.execute("ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (resource_id <> 'poison')")
    rows = [_row("1"), _row("2", **_REJECTED), _row("3", resource_id="poison"), _row("4")]
    seen = _deliver(table, rows)
    assert seen[-1] == ("rejected", 1)
    assert sum(n for kind, n in seen if kind == "committed") == 2
    assert ("dead", 1) in seen
    assert table.count() == 2


class _Unshowable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def test_a_dead_letter_whose_value_cannot_be_shown_is_still_reported(
    table: Table, make_writer: WriterFactory
) -> None:
    letters: list[DeadLetter] = []
    writer = make_writer(on_dead_letter=letters.append, flush_interval=0.1)
    # str() of an id falls back on repr(), which raises: the row is rejected.
    assert writer.log("order.test", id=_Unshowable(), request_id="x")
    assert writer.log("order.test", request_id="y")
    assert writer.flush(timeout=30)
    stats = writer.stats()
    assert (stats.written, stats.dead_lettered, stats.pending) == (1, 1, 0)
    assert len(letters) == 1 and "_Unshowable object at 0x" in letters[0].entry["id"]
    assert table.count() == 1


def test_a_failed_warm_start_does_not_stop_the_writer(
    table: Table, make_writer: WriterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_thread(self: Watchdog) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(Watchdog, "start", no_thread)
    writer = make_writer(flush_interval=0.1)
    for n in range(10):
        assert writer.log("order.test", request_id=str(n))
    assert writer.flush(timeout=30)
    assert writer.stats().written == 10 == table.count()
    assert writer._thread is not None and writer._thread.is_alive()


def test_a_block_that_fails_to_encode_loses_and_repeats_nothing(
    table: Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    # encode_block raising partway (out of memory, say) after it put a reject in `bad`:
    # the failure path must encode that chunk again, once, and keep the rows more() added.
    import auditq.sink as sink_module

    real = sink_module.encode_block
    calls = [0]

    def flaky(
        rows: Sequence[Row], kept: list[Row], bad: list[tuple[Row, str]], *origin: Any
    ) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            bad.append((rows[0], "half done"))
            raise MemoryError("no room for this block")
        return real(rows, kept, bad, *origin)

    monkeypatch.setattr(sink_module, "encode_block", flaky)
    first = [_row("1"), _row("2", **_REJECTED)]
    extra = [[_row("3"), _row("4", **_REJECTED)], [_row("5")]]
    events = Events()
    with own_sink(table.dsn, table.schema, table.name, events) as sink:
        assert sink.deliver_rows(first, more=lambda: extra.pop(0) if extra else []).items == []
    stored = sorted(r[0] for r in table.query("SELECT request_id FROM {table}"))
    assert stored == ["1", "3"]  # every row taken, once; "5" was never taken: still queued
    assert len(extra) == 1
    assert sum(n for kind, n in events.seen if kind == "committed") == 2
    assert [n for kind, n in events.seen if kind == "rejected"] == [2]
    assert events.seen[-1][0] == "rejected"
