"""Faults that need a server of the test's own: an immediate-mode restart, and SIGSTOP."""

from __future__ import annotations

import threading
import time

from ..conftest import Table
from ..pgserver import EmbeddedServer
from .conftest import Caller, WriterMaker, assert_exact, start_server, stop_server, stored_numbers

STREAM = 100_000


def test_immediate_restart_mid_stream_loses_nothing(
    own_server: EmbeddedServer, own_table: Table, writers: WriterMaker
) -> None:
    writer = writers(own_server.dsn, own_table, batch_size=2000, max_queue=STREAM * 2)
    caller = Caller(writer)
    outage = threading.Event()

    def restart() -> None:
        stop_server(own_server)  # pg_ctl -m immediate: backends die mid-transaction
        outage.set()
        time.sleep(1.0)
        start_server(own_server)

    restarter = threading.Thread(target=restart)

    def at_chunk(n: int) -> None:
        if n == 25:
            restarter.start()

    # 100 chunks of 1000 with a short pause: ~2.5 s of stream, the outage lands a quarter in.
    accepted = caller.stream(STREAM, chunk=1000, pause=0.02, on_chunk=at_chunk)
    restarter.join(60)
    assert outage.is_set()
    assert writer.flush(timeout=60)

    stats = writer.stats()
    assert stats.retries > 0, "the restart was not noticed"
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
    assert stats.written == STREAM
    assert_exact(writer, own_table, caller)
    assert stored_numbers(own_table) == accepted == list(range(STREAM))
    caller.check_latency("immediate restart")


def test_frozen_server_longer_than_write_timeout(
    own_server: EmbeddedServer, own_table: Table, writers: WriterMaker
) -> None:
    writer = writers(own_server.dsn, own_table, batch_size=500, write_timeout=1.0)
    caller = Caller(writer)
    caller.stream(1000)
    assert writer.flush(timeout=10)  # connected and idle on a live server
    frozen = threading.Event()

    def freeze() -> None:
        own_server.freeze()
        frozen.set()
        time.sleep(3.0)  # three write_timeouts
        own_server.thaw()

    freezer = threading.Thread(target=freeze)

    def at_chunk(n: int) -> None:
        if n == 4:
            freezer.start()

    # 40 chunks of 500 over ~2 s: the last 1.5 s of the stream happen while frozen.
    caller.stream(20_000, chunk=500, pause=0.05, start=1000, on_chunk=at_chunk)
    freezer.join(30)
    assert frozen.is_set()
    assert writer.flush(timeout=60)

    stats = writer.stats()
    assert stats.retries > 0
    assert writer._watchdog.fired > 0, "the hung COPY was never cut"
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
    assert stats.written == 21_000
    assert_exact(writer, own_table, caller)
    assert stored_numbers(own_table) == list(range(21_000))
    caller.check_latency("SIGSTOP > write_timeout")
