"""Network faults through the test proxy: cuts mid-COPY, a blackhole, a lost COMMIT reply,
and an outage that outlasts the queue (spool off)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from ..conftest import Table
from .conftest import Attempts, Caller, WriterMaker, assert_exact, stored_numbers
from .proxy import COMMIT_MESSAGE, COPY_DONE_MESSAGE, COPY_SIGNATURE, Proxy


def test_cut_mid_copy_retries_the_batch(proxy: Proxy, table: Table, writers: WriterMaker) -> None:
    writer = writers(proxy.dsn, table, batch_size=1000)
    caller = Caller(writer)
    # The first three COPY streams are cut as their data starts to flow.
    proxy.cut_on(COPY_SIGNATURE, forward=False, times=3)
    caller.stream(5000, chunk=500, pause=0.01)
    assert writer.flush(timeout=30)
    assert proxy.triggered == 3

    # Then whole-connection cuts at arbitrary moments while a stream runs.
    stop = threading.Event()

    def cutter() -> None:
        while not stop.wait(0.1):
            proxy.cut_all()

    thread = threading.Thread(target=cutter)
    thread.start()
    try:
        caller.stream(20_000, chunk=500, pause=0.01, start=5000)
    finally:
        stop.set()
        thread.join()
    assert writer.flush(timeout=30)

    stats = writer.stats()
    assert stats.retries >= 3
    assert proxy.cuts > 0
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
    assert_exact(writer, table, caller)
    assert stored_numbers(table) == list(range(25_000))
    caller.check_latency("proxy cuts mid-COPY")


def test_cuts_while_a_backlog_streams_through_one_copy(
    proxy: Proxy, table: Table, writers: WriterMaker
) -> None:
    # A batch_size far above the wake-up count: each COPY keeps taking queued rows (more())
    # while the connection is cut under it, so retries carry rows taken mid-COPY.
    writer = writers(proxy.dsn, table, batch_size=20_000, max_queue=200_000)
    caller = Caller(writer)
    attempts = Attempts(writer)
    stop = threading.Event()

    def cutter() -> None:
        while not stop.wait(0.15):
            proxy.cut_all()

    thread = threading.Thread(target=cutter)
    thread.start()
    try:
        caller.stream(60_000, chunk=3000, pause=0.005)
    finally:
        stop.set()
        thread.join()
    assert writer.flush(timeout=60)

    stats = writer.stats()
    assert proxy.cuts > 0 and stats.retries > 0
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
    # Some COPYs carried more rows than the wake-up count: rows joined them mid-COPY.
    assert max(stats.written / max(stats.batches, 1), *map(len, attempts.deliveries)) > 5000
    assert_exact(writer, table, caller)
    assert stored_numbers(table) == list(range(60_000))
    caller.check_latency("proxy cuts while a backlog streams")


def test_blackhole_is_cut_by_the_watchdog(proxy: Proxy, table: Table, writers: WriterMaker) -> None:
    writer = writers(proxy.dsn, table, batch_size=500, write_timeout=1.0)
    caller = Caller(writer)
    caller.stream(1000)
    assert writer.flush(timeout=10)

    proxy.blackhole(True)
    started = time.monotonic()
    caller.stream(10_000, chunk=500, pause=0.02, start=1000)
    time.sleep(max(0.0, 2.5 - (time.monotonic() - started)))
    proxy.blackhole(False)
    assert writer.flush(timeout=60)

    stats = writer.stats()
    assert writer._watchdog.fired > 0, "the hung COPY was never cut"
    assert stats.retries > 0
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
    assert_exact(writer, table, caller)
    assert stored_numbers(table) == list(range(11_000))
    caller.check_latency("proxy blackhole")


@pytest.mark.parametrize(
    "committed", [True, False], ids=["commit-landed-reply-lost", "commit-never-arrived"]
)
@pytest.mark.parametrize("source", ["own", "pool"])
def test_commit_outcome_unknown_replays_without_duplicates(
    proxy: Proxy, table: Table, writers: WriterMaker, committed: bool, source: str
) -> None:
    pool: ConnectionPool[Any] | None = None
    if source == "own":
        # The writer's own connection is in autocommit: the end of the COPY data commits.
        writer = writers(proxy.dsn, table, batch_size=1000)
        commit = COPY_DONE_MESSAGE
    else:
        # A pooled connection keeps its pool's mode: COPY inside BEGIN ... COMMIT.
        pool = ConnectionPool(proxy.dsn, min_size=1, max_size=2, open=True)
        writer = writers(pool, table, batch_size=1000)
        commit = COMMIT_MESSAGE
    attempts = Attempts(writer)
    caller = Caller(writer)
    # The first commit is cut: after reaching the server (committed=True) or before.
    proxy.cut_on(commit, forward=committed, times=1)
    caller.stream(5000, chunk=500, pause=0.01)
    assert writer.flush(timeout=30)
    assert proxy.triggered == 1

    stats = writer.stats()
    assert stats.retries >= 1
    # The lost batch went through the staging-table replay exactly once, and the replay
    # found its rows already stored (or not) just as the server had left them.
    assert len(attempts.merges) == 1, attempts.merges
    size, inserted = attempts.merges[0]
    assert inserted == (0 if committed else size)
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
    assert stats.written == 5000
    assert_exact(writer, table, caller)
    assert stored_numbers(table) == list(range(5000))
    caller.check_latency(f"commit outcome unknown (committed={committed}, {source})")
    if pool is not None:
        writer.close(timeout=5)
        pool.close()


def test_outage_longer_than_the_queue_drops_exactly(
    proxy: Proxy, table: Table, writers: WriterMaker
) -> None:
    writer = writers(proxy.dsn, table, batch_size=200, max_queue=1000)
    caller = Caller(writer)
    before = caller.stream(500, chunk=100)
    assert writer.flush(timeout=10)

    proxy.refuse(True)  # the server is gone: every connection is cut at once
    during = caller.stream(5000, chunk=500, pause=0.01, start=500)
    mid = writer.stats()
    assert mid.dropped_overflow == caller.refused > 0
    assert mid.retries > 0

    proxy.refuse(False)
    assert writer.flush(timeout=30)  # the queue drains once the server is back
    after = caller.stream(500, chunk=100, start=5500)
    assert after == list(range(5500, 6000))
    assert writer.flush(timeout=30)

    stats = writer.stats()
    assert stats.dead_lettered == stats.rejected == 0
    assert stats.dropped_overflow == caller.refused == 5000 - len(during)
    # The queue held max_queue entries (plus the batch in flight when the outage began).
    assert 1000 <= len(during) <= 1000 + 200
    assert_exact(writer, table, caller)
    # Exactly the accepted entries were written: nothing else was lost.
    assert stored_numbers(table) == before + during + after
    caller.check_latency("outage > queue, no spool")


def test_close_returns_on_time_while_the_server_hangs(
    proxy: Proxy, table: Table, writers: WriterMaker
) -> None:
    writer = writers(proxy.dsn, table, batch_size=500, write_timeout=30.0)
    caller = Caller(writer)
    caller.stream(1000)
    assert writer.flush(timeout=10)

    proxy.blackhole(True)  # hung, and write_timeout is far away: only close() can cut it
    caller.stream(2000, chunk=500, start=1000)
    time.sleep(0.3)  # let the writer get stuck in a COPY
    started = time.monotonic()
    assert writer.close(timeout=1.5) is False  # not everything could be written
    took = time.monotonic() - started
    proxy.blackhole(False)

    print(f"\n[close while hung] close(timeout=1.5) returned after {took:.2f}s")
    assert took < 2.0
    stats = writer.stats()
    assert stats.written == 1000
    assert stats.dead_lettered == 2000  # each with "not written before close() timed out"
    assert stats.dropped_overflow == stats.rejected == 0
    # The cut COPY reaches the server after the blackhole. Its end of data (the commit, in
    # autocommit) was sent before the hang, so it may commit: those rows are the
    # `unconfirmed` ones, dead-lettered with a reason that says they may be stored.
    time.sleep(0.5)
    assert stats.unconfirmed in (0, 500)
    stored = stored_numbers(table)
    assert stored[:1000] == list(range(1000))
    assert len(stored) - 1000 in (0, stats.unconfirmed)
    assert_exact(writer, table, caller, unconfirmed_stored=len(stored) - 1000)
    caller.check_latency("close while hung")
