"""Faults against the pipelined COPY (issue 16): the writer's one COPY connection keeps data
in flight (libpq's buffer, the kernel's) while it encodes the next piece, rows queued while
a COPY runs join it, and the end of the data and the result are one C call.

The issue asked for a cut while another connection has a COPY in flight, a result lost
between two COPYs and close() while both are in flight: the kept design has one COPY
connection per writer, so these are the same faults against it. A cut at a byte offset of
a COPY whose data is in flight; the result lost after the end of a streaming COPY while
the next rows wait (and the replay on the next connection faulted again); close() while a
COPY's data is in flight to a slow or frozen server; libpq left in COPY_IN by a failed flush.

Each test checks that the C path carried the data (`pqcopy.copy` and `pq_put` counted;
for the in-flight cases, that libpq held unsent data, past HIGH_WATER where the test says
so) and the exact accounting: every accepted entry written, dead-lettered or spooled, the
table holding each written row once. The proxy throttles the server's side, with small
kernel buffers, so that the data piles up in libpq's buffer.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from auditq import AuditWriter, pqcopy
from auditq.binary import COPY_COLUMNS, HEADER, TRAILER, encode_row
from auditq.entry import AuditEntry, Row
from auditq.native import speedups
from auditq.schema import qualified
from auditq.writer import DeadLetter

from ..conftest import Table
from ..conftest import _drop as drop_table
from ..conftest import _make_table as make_table
from ..helpers import wait_until
from ..pgserver import EmbeddedServer
from .conftest import FAST, Attempts, Caller, WriterMaker, assert_exact, stored_numbers
from .proxy import COMMIT_MESSAGE, COPY_DONE_MESSAGE, COPY_SIGNATURE, Proxy

C_PATH = pytest.mark.skipif(
    not pqcopy.available(), reason="the C path is off here (no extension, or psycopg's pure impl)"
)
#: Kernel receive buffer on the proxy's client side: small, so that a throttled COPY's
#: data piles up in libpq's buffer (past HIGH_WATER) rather than in the kernel's.
RCVBUF = 128 * 1024


@dataclass
class Copy:
    """One COPY driven from C, as the wrappers saw it."""

    puts: int = 0  # pieces handed to libpq with the GIL held
    unsent: int = 0  # puts after which libpq still buffered data (in flight, unsent)
    drains: int = 0  # puts that waited: HIGH_WATER bytes were unsent
    failed: bool = False  # it raised (cut, lost)


@dataclass
class CPath:
    """What went through `auditq.pqcopy`, counted by thin wrappers (test-only). With
    `sndbuf`, each COPY's socket gets that kernel send buffer (autotuned to 4 MiB
    otherwise), so that its data in flight sits mostly in libpq's buffer."""

    copies: list[Copy] = field(default_factory=list)
    sndbuf: int | None = None
    #: Called on the writer thread after each piece is handed over.
    after_put: Callable[[Copy], None] | None = None

    def total(self, name: str) -> int:
        return sum(getattr(c, name) for c in self.copies)

    def __str__(self) -> str:
        return (
            f"{len(self.copies)} C COPYs, {self.total('puts')} puts, {self.total('unsent')}"
            f" left data unsent, {self.total('drains')} drains,"
            f" {sum(c.failed for c in self.copies)} failed"
        )


def count_c_path(monkeypatch: pytest.MonkeyPatch) -> CPath:
    seen = CPath()
    copy = pqcopy.copy
    assert speedups is not None
    put = speedups.pq_put

    def counted_copy(conn: psycopg.Connection[Any], *args: Any, **kwargs: Any) -> None:
        seen.copies.append(Copy())
        if seen.sndbuf is not None and not conn.closed:
            with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, seen.sndbuf)
        try:
            copy(conn, *args, **kwargs)
        except BaseException:
            seen.copies[-1].failed = True
            raise

    def counted_put(ptr: int, piece: bytes, drain: bool) -> Any:
        current = seen.copies[-1]
        current.puts += 1
        current.drains += bool(drain)
        outcome = put(ptr, piece, drain)
        current.unsent += bool(outcome[0])
        if seen.after_put is not None:
            seen.after_put(current)
        return outcome

    monkeypatch.setattr(pqcopy, "copy", counted_copy)
    monkeypatch.setattr(speedups, "pq_put", counted_put)
    return seen


@pytest.fixture
def c_path(monkeypatch: pytest.MonkeyPatch) -> CPath:
    return count_c_path(monkeypatch)


class Joins:
    """Per COPY the writer starts (`deliver_rows`): [rows it began with, rows that joined it
    from the queue while it ran]. Wraps the sink's entry point (test-only)."""

    def __init__(
        self, writer: AuditWriter, on_first_join: Callable[[], None] | None = None
    ) -> None:
        self.copies: list[list[int]] = []
        sink = writer._sink
        deliver_rows = sink.deliver_rows

        def counted(
            rows: list[Row],
            *,
            divert: Callable[[], bool] | None = None,
            more: Callable[[], list[Row]] | None = None,
        ) -> Any:
            entry = [len(rows), 0]
            self.copies.append(entry)
            joined = more
            if more is not None:
                inner = more

                def joined() -> list[Row]:
                    nonlocal on_first_join
                    extra = inner()
                    entry[1] += len(extra)
                    if extra and on_first_join is not None:
                        on_first_join()
                        on_first_join = None
                    return extra

            return deliver_rows(rows, divert=divert, more=joined)

        sink.deliver_rows = counted  # type: ignore[method-assign]

    @property
    def joined(self) -> int:
        return sum(j for _, j in self.copies)


@pytest.fixture
def slow_proxy(pg_dsn: str) -> Iterator[Proxy]:
    """A proxy with a small receive buffer on the writer's side (see RCVBUF)."""
    with Proxy(pg_dsn, rcvbuf=RCVBUF) as running:
        yield running


def settle(proxy: Proxy, live: int) -> None:
    """Let every cut connection finish on the server's side (a COPY whose end reached the
    proxy may still commit) before the table is read: `live` connections stay open (the
    writer's own)."""
    proxy.throttle(None)
    assert wait_until(lambda: proxy.open_links <= live, timeout=20), proxy.open_links
    time.sleep(0.3)


# -- 1. a connection cut while the COPY has data in flight ---------------------------------


@C_PATH
@pytest.mark.timeout(180)
@pytest.mark.parametrize("offset", [2 * 1024 * 1024 + 7, 5 * 1024 * 1024 + 11])
def test_cut_at_a_byte_offset_while_data_is_in_flight(
    slow_proxy: Proxy, table: Table, writers: WriterMaker, c_path: CPath, offset: int
) -> None:
    proxy = slow_proxy
    # A long write_timeout: a throttled COPY is slow, not hung (the watchdog stays out).
    writer = writers(proxy.dsn, table, batch_size=100_000, max_queue=300_000, write_timeout=30.0)
    caller = Caller(writer)
    joins = Joins(writer)
    caller.stream(1000)
    assert writer.flush(timeout=30)
    # ~110 bytes a row: the caller queues ~5 MB/s for ~2 s, the proxy passes 2 MiB/s: each
    # COPY's data piles up in libpq's buffer past HIGH_WATER (small kernel buffers), the
    # writer waits for it to drain, and meanwhile queued rows join the COPY. The first
    # COPY to reach `offset` bytes is cut there.
    c_path.sndbuf = 64 * 1024
    proxy.throttle(2 * 1024 * 1024)
    proxy.cut_at(offset)
    caller.stream(80_000, chunk=4000, pause=0.08, start=1000)
    assert writer.flush(timeout=120)
    settle(proxy, live=1)

    stats = writer.stats()
    print(f"\n[cut at {offset}] {c_path}; COPYs [start, joined]: {joins.copies}")
    assert proxy.triggered == 1, "no COPY was cut at its offset"
    assert stats.retries >= 1
    # The COPY that was cut had more than HIGH_WATER unsent at least once before.
    cut = [c for c in c_path.copies if c.failed]
    assert len(cut) == 1 and cut[0].drains > 0, c_path
    assert joins.joined > 0, joins.copies
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
    assert_exact(writer, table, caller)
    assert stored_numbers(table) == list(range(81_000))


# -- 2. a result lost between the end of the data and its read -----------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "case",
    [
        "reply-lost",  # CopyDone reached the server (committed), the reply never came back
        "reply-lost-then-replay-cut",  # ... and the replay's own COPY is cut as it starts
        "reply-lost-twice",  # ... and the replay's COMMIT lands but its reply is lost too
        "end-never-arrived",  # the end of the data was sent, the server never got it
    ],
)
@pytest.mark.parametrize("path", ["c", "psycopg"])
def test_result_lost_after_the_end_of_a_streaming_copy(
    slow_proxy: Proxy,
    table: Table,
    writers: WriterMaker,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    path: str,
) -> None:
    if path == "c" and not pqcopy.available():
        pytest.skip("the C path is off here")
    if path == "psycopg":
        monkeypatch.setattr(pqcopy, "enabled", False)
    seen = count_c_path(monkeypatch) if speedups is not None else CPath()
    proxy = slow_proxy
    writer = writers(proxy.dsn, table, batch_size=50_000, max_queue=100_000, write_timeout=30.0)
    caller = Caller(writer)
    attempts = Attempts(writer)
    committed = case != "end-never-arrived"
    triggers = []

    def arm() -> None:
        # Called on the writer thread when queued rows first join a COPY under way: the
        # next end of data the proxy sees is that COPY's.
        first = proxy.cut_on(COPY_DONE_MESSAGE, forward=committed, times=1)
        triggers.append(first)
        if case == "reply-lost-then-replay-cut":
            proxy.cut_on(COPY_SIGNATURE, forward=False, times=1, after=first)
        elif case == "reply-lost-twice":
            proxy.cut_on(COMMIT_MESSAGE, forward=True, times=1, after=first)

    # psycopg's path (the fallback) is covered for the same faults on whichever COPY
    # comes next: its data sits in the kernel's buffers, and rows rarely join.
    joins = Joins(writer, on_first_join=arm if path == "c" else None)
    caller.stream(1000)
    assert writer.flush(timeout=30)
    if path == "psycopg":
        arm()
    # The caller queues faster than the proxy passes: the COPY's data waits in libpq's
    # buffer (small kernel buffers), and rows join the COPY meanwhile.
    seen.sndbuf = 64 * 1024
    proxy.throttle(2 * 1024 * 1024)
    caller.stream(40_000, chunk=4000, pause=0.08, start=1000)
    assert writer.flush(timeout=120)
    settle(proxy, live=1)

    stats = writer.stats()
    print(f"\n[{case}, {path}] {seen}; COPYs [start, joined]: {joins.copies}")
    assert triggers and triggers[0].remaining == 0
    expected_triggers = 1 if case in ("reply-lost", "end-never-arrived") else 2
    assert proxy.triggered == expected_triggers
    assert stats.retries >= expected_triggers
    # Each retry of the lost batch went straight to the idempotent merge: a plain COPY
    # again (a retry that took the lost result for a failure) would be one more attempt.
    assert attempts.attempts == expected_triggers, attempts.attempts
    # The lost COPY's rows, its own and those that joined it, went through the staging
    # table's merge, once (a merge whose own reply is lost is retried, not counted here),
    # and found them stored or not as the server had left them.
    assert len(attempts.merges) == 1, attempts.merges
    size, inserted = attempts.merges[0]
    if path == "c":
        assert any(start + joined == size and joined > 0 for start, joined in joins.copies), (
            size,
            joins.copies,
        )
    assert inserted == (0 if committed else size)
    if path == "c":
        assert seen.copies and seen.total("puts"), seen
    else:
        assert not seen.copies, seen
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
    assert stats.unconfirmed == 0
    assert_exact(writer, table, caller)
    assert stored_numbers(table) == list(range(41_000))


# -- 3. close() while a COPY has data in flight --------------------------------------------


@C_PATH
@pytest.mark.timeout(120)
@pytest.mark.parametrize("spool", [False, True], ids=["no-spool", "spool"])
def test_close_while_a_throttled_copy_streams(
    slow_proxy: Proxy,
    table: Table,
    writers: WriterMaker,
    c_path: CPath,
    tmp_path: Path,
    spool: bool,
) -> None:
    proxy = slow_proxy
    # Dead letters collected by a callback: the default, one logging record each, costs
    # ~80 us a row on the closing thread after the deadline (see the hand-off notes).
    dead: list[DeadLetter] = []
    options: dict[str, Any] = {"spool_dir": tmp_path} if spool else {"on_dead_letter": dead.append}
    # write_timeout far away: only close() can cut the COPY.
    writer = writers(
        proxy.dsn, table, batch_size=50_000, max_queue=200_000, write_timeout=60.0, **options
    )
    caller = Caller(writer)
    caller.stream(1000)
    assert writer.flush(timeout=30)
    c_path.sndbuf = 64 * 1024  # the data in flight waits in libpq's buffer
    proxy.throttle(512 * 1024)  # ~5k rows/s: the backlog cannot be written in time
    caller.stream(60_000, chunk=5000, start=1000)
    assert wait_until(lambda: c_path.total("drains") > 0, timeout=30), c_path  # data is in flight
    timeout = 2.0
    started = time.monotonic()
    done = writer.close(timeout=timeout)
    took = time.monotonic() - started
    print(f"\n[close, throttled, spool={spool}] close({timeout}) took {took:.2f}s, {c_path}")
    assert not done
    assert took < timeout + 1.5
    settle(proxy, live=0)

    stats = writer.stats()
    assert stats.pending == 0
    assert stats.dropped_overflow == stats.rejected == 0
    assert stats.accepted == caller.accepted == 61_000
    assert stats.written + stats.dead_lettered + stats.spooled == stats.accepted, stats
    assert stats.written < stats.accepted
    stored = table.count()
    assert table.distinct_ids() == stored
    if not spool:
        assert stats.spooled == 0 and stats.dead_lettered == len(dead) > 0
        unsure = [d for d in dead if "outcome is unknown" in d.reason]
        assert len(unsure) == stats.unconfirmed
        assert all("not written before close() timed out" in d.reason for d in dead[len(unsure) :])
        # Rows whose end of data was out when close() cut the connection may be stored.
        assert stats.written <= stored <= stats.written + stats.unconfirmed, stats
        assert_exact(writer, table, caller, unconfirmed_stored=stored - stats.written)
        return
    # Everything close() could not write is on disk, none dead-lettered; the next writer
    # replays it exactly once, even rows whose commit may have landed.
    assert stats.dead_lettered == 0 and stats.spooled > 0, stats
    following = writers(proxy.dsn, table, spool_dir=tmp_path)
    following.flush()
    assert wait_until(lambda: following.stats().replayed == stats.spooled, timeout=60), (
        following.stats()
    )
    assert following.stats().replay_dead_lettered == 0
    assert stored_numbers(table) == list(range(61_000))
    assert table.count() == table.distinct_ids() == 61_000


@C_PATH
@pytest.mark.timeout(180)
def test_close_while_the_server_is_frozen_mid_stream_spools_it(
    own_server: EmbeddedServer,
    own_table: Table,
    writers: WriterMaker,
    c_path: CPath,
    tmp_path: Path,
) -> None:
    table = own_table
    writer = writers(
        own_server.dsn,
        table,
        batch_size=100_000,
        max_queue=300_000,
        write_timeout=60.0,
        spool_dir=tmp_path,
    )
    caller = Caller(writer)
    caller.stream(1000)
    assert writer.flush(timeout=30)
    frozen: list[bool] = []

    def freeze_mid_stream(copy: Copy) -> None:
        if copy.puts == 3 and not frozen:
            own_server.freeze()  # SIGSTOP with the COPY under way: the buffers fill
            frozen.append(True)

    c_path.sndbuf = 64 * 1024
    c_path.after_put = freeze_mid_stream
    try:
        caller.stream(100_000, chunk=5000, start=1000)
        # Data in flight: libpq holds unsent data of the open COPY, the writer waits in C.
        assert wait_until(lambda: bool(frozen) and c_path.copies[-1].unsent > 0, timeout=30)
        time.sleep(0.5)
        started = time.monotonic()
        assert writer.close(timeout=2.0) is False
        took = time.monotonic() - started
    finally:
        own_server.thaw()
    print(f"\n[close, frozen server] close(2.0) took {took:.2f}s, {c_path}")
    assert took < 3.5
    stats = writer.stats()
    assert stats.pending == stats.dead_lettered == stats.dropped_overflow == 0, stats
    assert stats.written == 1000 and stats.spooled == 100_000, stats
    following = writers(own_server.dsn, table, spool_dir=tmp_path)
    following.flush()
    assert wait_until(lambda: following.stats().replayed == 100_000, timeout=90), following.stats()
    assert stored_numbers(table) == list(range(101_000))
    assert table.count() == table.distinct_ids() == 101_000


# -- 4. libpq left in COPY_IN --------------------------------------------------------------


def _rows(count: int) -> bytes:
    out = []
    for n in range(count):
        row: Row = AuditEntry(action="a", request_id=str(n)).to_row()
        out.append(encode_row(row)[0])
    return b"".join(out)


class SocketSwap:
    """Replaces a connection's socket descriptor with a pipe's (dup2) between two pieces:
    send() and recv() then fail with ENOTSOCK, an error libpq reports without marking the
    connection bad, so it stays CONNECTION_OK with the COPY open (COPY_IN)."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()
        self.swapped = 0

    def pieces(self, conn: psycopg.Connection[Any], pieces: Iterable[bytes]) -> Iterator[bytes]:
        for n, piece in enumerate(pieces):
            if n == 2 and not self.swapped:
                os.dup2(self.write, conn.pgconn.socket)
                self.swapped += 1
            yield piece

    def close(self) -> None:
        os.close(self.read)
        os.close(self.write)


@pytest.fixture
def swap() -> Iterator[SocketSwap]:
    made = SocketSwap()
    yield made
    made.close()


@C_PATH
@pytest.mark.timeout(60)
def test_a_failed_flush_does_not_leave_copy_in_on_a_healthy_looking_connection(
    pg_dsn: str, table: Table, swap: SocketSwap
) -> None:
    columns = sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS))
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        qualified(table.schema, table.name), columns
    )
    conn = psycopg.connect(pg_dsn, autocommit=True)
    try:
        data = [_rows(500) for _ in range(4)]
        with pytest.raises(psycopg.OperationalError):
            pqcopy.copy(conn, statement.as_bytes(conn), swap.pieces(conn, [HEADER, *data, TRAILER]))
        assert swap.swapped == 1
        # Never handed out again: it reads as closed (libpq finished), not as an idle
        # connection whose libpq still sits in COPY_IN and refuses every command.
        assert conn.closed, conn.pgconn.transaction_status
    finally:
        conn.close()
    assert table.count() == 0


@C_PATH
@pytest.mark.timeout(60)
def test_the_writer_reconnects_after_a_flush_lost_in_copy_in(
    pg_dsn: str,
    table: Table,
    writers: WriterMaker,
    c_path: CPath,
    swap: SocketSwap,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    copy = pqcopy.copy  # the counting wrapper

    def swapping(
        conn: psycopg.Connection[Any], query: bytes, pieces: Iterable[bytes], **kwargs: Any
    ) -> None:
        copy(conn, query, swap.pieces(conn, pieces), **kwargs)

    monkeypatch.setattr(pqcopy, "copy", swapping)
    writer = writers(pg_dsn, table, batch_size=5000, max_queue=50_000)
    caller = Caller(writer)
    caller.stream(5000, chunk=5000)
    caller.stream(15_000, chunk=1000, pause=0.002, start=5000)
    assert writer.flush(timeout=30), writer.stats()
    stats = writer.stats()
    assert swap.swapped == 1 and len(c_path.copies) > 1
    assert 1 <= stats.retries <= 3, stats
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
    assert_exact(writer, table, caller)
    assert stored_numbers(table) == list(range(20_000))


# -- 5. property: any cut point of a streaming COPY ----------------------------------------


@C_PATH
@pytest.mark.timeout(300)
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    where=st.one_of(
        st.tuples(st.just("from-start"), st.integers(0, 1_200_000)),
        # Around the end of the data: in the trailer, in CopyDone, or just after it (the
        # server commits, the reply is lost).
        st.tuples(st.just("from-end"), st.integers(-14, 0)),
    )
)
def test_any_cut_point_of_a_streaming_copy_is_exact(
    pg_dsn: str, proxy: Proxy, c_path: CPath, where: tuple[str, int]
) -> None:
    table = make_table(pg_dsn)  # one per example (the table refuses TRUNCATE)
    proxy.clear()
    kind, offset = where
    if kind == "from-start":
        proxy.cut_at(offset)
    else:
        proxy.cut_at_end(offset)
    writer = AuditWriter(
        proxy.dsn, schema=table.schema, table=table.name, **{**FAST, "batch_size": 20_000}
    )
    try:
        caller = Caller(writer)
        caller.stream(12_000, chunk=3000, pause=0.001)
        assert writer.flush(timeout=60)
        stats = writer.stats()
        assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
        assert_exact(writer, table, caller)
        assert stored_numbers(table) == list(range(12_000))
        assert c_path.copies
    finally:
        writer.close(timeout=5)
        drop_table(table)
