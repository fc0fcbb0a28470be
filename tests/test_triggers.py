"""Batches leave the queue when full or when the interval passes, without flush()."""

from __future__ import annotations

import time

from .conftest import Table, WriterFactory
from .helpers import wait_until


def test_batch_size_trigger(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(batch_size=10, flush_interval=60)
    for i in range(9):
        assert writer.log("trigger.size", resource_id=str(i))
    time.sleep(0.5)
    # A partial batch waits for the interval (60 s): nothing is written yet.
    assert table.count() == 0
    assert writer.stats().pending == 9
    assert writer.log("trigger.size", resource_id="9")
    assert wait_until(lambda: table.count() == 10, timeout=15)
    stats = writer.stats()
    assert (stats.written, stats.pending, stats.batches) == (10, 0, 1)


def test_several_full_batches_leave_the_remainder(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(batch_size=10, flush_interval=60)
    for i in range(35):
        assert writer.log("trigger.size", resource_id=str(i))
    assert wait_until(lambda: table.count() == 30, timeout=15)
    time.sleep(0.3)
    assert table.count() == 30
    assert writer.stats().pending == 5
    assert writer.flush(timeout=30)
    assert table.count() == 35


def test_interval_trigger(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(batch_size=1000, flush_interval=0.3)
    start = time.monotonic()
    for i in range(3):
        assert writer.log("trigger.interval", resource_id=str(i))
    assert wait_until(lambda: table.count() == 3, timeout=15)
    assert time.monotonic() - start < 10
    assert writer.stats().written == 3
    # And again after an idle period: the loop keeps waking on its interval.
    time.sleep(0.5)
    assert writer.log("trigger.interval", resource_id="later")
    assert wait_until(lambda: table.count() == 4, timeout=15)


def test_close_does_not_wait_out_the_interval(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(batch_size=1000, flush_interval=60)
    for i in range(5):
        assert writer.log("trigger.close", resource_id=str(i))
    time.sleep(0.2)  # the writer thread is asleep on its 60 s interval
    start = time.monotonic()
    assert writer.close(timeout=30)
    assert time.monotonic() - start < 10
    assert table.count() == 5
