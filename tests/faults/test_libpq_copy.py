"""The COPY driven from C through psycopg's libpq (`auditq.pqcopy`): faults while the GIL is
released for the whole batch, errors that must come back as psycopg's own, and the
connection psycopg finds afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from auditq import pqcopy
from auditq.binary import COPY_COLUMNS, HEADER, TRAILER, encode_row
from auditq.entry import AuditEntry, Row
from auditq.schema import qualified
from auditq.writer import DeadLetter

from ..conftest import Table
from .conftest import Caller, WriterMaker, assert_exact, stored_numbers
from .proxy import COPY_SIGNATURE, Proxy

pytestmark = pytest.mark.skipif(
    not pqcopy.available(), reason="the C path is off here (no extension, or psycopg's pure impl)"
)


@pytest.fixture
def c_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the COPYs the sink sends through the C path (so a test cannot pass on the
    fallback without saying so)."""
    calls: list[int] = []
    real = pqcopy.copy

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(pqcopy, "copy", counted)
    return calls


def test_cuts_mid_copy_from_the_c_path(
    proxy: Proxy, table: Table, writers: WriterMaker, c_copies: list[int]
) -> None:
    # Big batches, so that a COPY's data is in flight from C (GIL released) when it is cut.
    writer = writers(proxy.dsn, table, batch_size=20_000, max_queue=200_000)
    caller = Caller(writer)
    proxy.cut_on(COPY_SIGNATURE, forward=False, times=2)
    stop = threading.Event()

    def cutter() -> None:
        while not stop.wait(0.12):
            proxy.cut_all()

    caller.stream(4000, chunk=1000)
    assert writer.flush(timeout=30)
    assert proxy.triggered == 2
    thread = threading.Thread(target=cutter)
    thread.start()
    try:
        caller.stream(60_000, chunk=3000, pause=0.005, start=4000)
    finally:
        stop.set()
        thread.join()
    assert writer.flush(timeout=60)

    stats = writer.stats()
    assert c_copies, "no COPY went through the C path"
    assert proxy.cuts > 0 and stats.retries >= 2
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
    assert_exact(writer, table, caller)
    assert stored_numbers(table) == list(range(64_000))
    # No latency bound here: with cuts this frequent both paths (C and psycopg's, A/B on
    # this test) showed log() tails of 8-25 ms on the 2-core box, once 53 ms under the full
    # suite; test_network_faults' backlog test bounds it for the (C) path as shipped.
    print(f"\n[cuts mid-COPY, C path] slowest log() {caller.slowest * 1000:.2f} ms")


def test_frozen_server_is_cut_by_the_watchdog_inside_the_c_wait(
    proxy: Proxy, table: Table, writers: WriterMaker, c_copies: list[int]
) -> None:
    writer = writers(proxy.dsn, table, batch_size=5000, write_timeout=1.0)
    caller = Caller(writer)
    caller.stream(1000)
    assert writer.flush(timeout=10)

    # Nothing answers and nothing fails: only the watchdog's shutdown of the socket can
    # end the C call's poll().
    proxy.blackhole(True)
    caller.stream(20_000, chunk=1000, pause=0.01, start=1000)
    time.sleep(2.5)
    assert writer._watchdog.fired > 0, "the hung COPY was never cut"
    proxy.blackhole(False)
    assert writer.flush(timeout=60)

    stats = writer.stats()
    assert c_copies
    assert stats.retries > 0
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
    assert_exact(writer, table, caller)
    assert stored_numbers(table) == list(range(21_000))
    caller.check_latency("frozen server, C path")


def test_close_cuts_a_c_copy_that_hangs(
    proxy: Proxy, table: Table, writers: WriterMaker, c_copies: list[int]
) -> None:
    writer = writers(proxy.dsn, table, batch_size=5000, write_timeout=30.0)
    caller = Caller(writer)
    caller.stream(1000)
    assert writer.flush(timeout=10)
    proxy.blackhole(True)
    caller.stream(5000, start=1000)
    time.sleep(0.5)  # the COPY is under way, stuck in C
    started = time.monotonic()
    writer.close(timeout=1.0)
    assert time.monotonic() - started < 5.0
    proxy.blackhole(False)
    stats = writer.stats()
    assert c_copies
    # Every entry is accounted for: written, or handed to the dead letters at the deadline.
    assert stats.written + stats.dead_lettered + stats.dropped_overflow == caller.accepted


def test_poison_rows_through_the_c_path(
    pg_dsn: str, table: Table, writers: WriterMaker, c_copies: list[int]
) -> None:
    table.execute("ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (resource_id <> 'poison')")
    dead: list[DeadLetter] = []
    writer = writers(pg_dsn, table, batch_size=2000, on_dead_letter=dead.append)
    caller = Caller(writer)
    poisoned = {17, 1500, 2999}
    for i in range(3000):
        caller.log("fault.test", request_id=str(i), resource_id="poison" if i in poisoned else "ok")
    assert writer.flush(timeout=60)
    assert c_copies
    assert sorted(int(d.entry["request_id"]) for d in dead) == sorted(poisoned)
    for letter in dead:
        assert 'violates check constraint "no_poison"' in letter.reason
        assert "Failing row contains" in letter.reason  # the DETAIL, from the C path's fields
    assert stored_numbers(table) == sorted(set(range(3000)) - poisoned)
    assert_exact(writer, table, caller)


# -- the errors and the connection, C path against psycopg's -----------------------------


def _rows(count: int, bad: int | None = None) -> bytes:
    out = []
    for n in range(count):
        row: Row = AuditEntry(action="a", resource_id="poison" if n == bad else "ok").to_row()
        out.append(encode_row(row)[0])
    return b"".join(out)


def _psycopg_copy(conn: psycopg.Connection[Any], statement: sql.Composed, data: bytes) -> None:
    with conn.cursor() as cur, cur.copy(statement) as copy:
        copy.write(HEADER)
        copy.write(data)
        copy.write(TRAILER)


def _c_copy(conn: psycopg.Connection[Any], statement: sql.Composed, data: bytes) -> None:
    pqcopy.copy(conn, statement.as_bytes(conn), [HEADER, data, TRAILER])


def _failure(run: Callable[[], None]) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        run()
    return info.value


@pytest.fixture
def conn(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_dsn, autocommit=True) as connection:
        yield connection


@pytest.mark.parametrize("case", ["check", "no-table", "no-partition", "cancelled"])
def test_errors_match_psycopgs(conn: psycopg.Connection[Any], table: Table, case: str) -> None:
    columns = sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS))
    target = qualified(table.schema, table.name)
    data = _rows(50, bad=7)
    if case == "check":
        table.execute(
            "ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (resource_id <> 'poison')"
        )
    elif case == "no-table":
        target = qualified(table.schema, "auditq_no_such_table")
    elif case == "no-partition":
        name = sql.Identifier(f"{table.name}_p")
        conn.execute(
            sql.SQL("CREATE TABLE {}.{} (LIKE {}) PARTITION BY RANGE (occurred_at)").format(
                sql.Identifier(table.schema), name, target
            )
        )
        target = sql.SQL("{}.{}").format(sql.Identifier(table.schema), name)
    else:
        conn.execute("SET statement_timeout = 1")
        data = _rows(20_000)
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(target, columns)
    theirs = _failure(lambda: _psycopg_copy(conn, statement, data))
    ours = _failure(lambda: _c_copy(conn, statement, data))
    assert type(ours) is type(theirs)
    assert ours.sqlstate == theirs.sqlstate
    # The same wording, line for line (a DETAIL names recorded_at, now() of each COPY).
    assert str(ours).splitlines()[0] == str(theirs).splitlines()[0]
    if case != "cancelled":
        # A 1 ms statement timeout fires before or after the server reads the first line,
        # with or without a CONTEXT line, whichever path sends the data.
        assert len(str(ours).splitlines()) == len(str(theirs).splitlines())
    for name in ("severity", "message_primary", "constraint_name", "table_name", "schema_name"):
        assert getattr(ours.diag, name) == getattr(theirs.diag, name), name
    assert (ours.diag.message_detail is None) == (theirs.diag.message_detail is None)
    # psycopg finds the connection idle and usable.
    assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_connection_stays_psycopgs(conn: psycopg.Connection[Any], table: Table) -> None:
    columns = sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS))
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        qualified(table.schema, table.name), columns
    )
    # Autocommit: the lone COPY committed, the connection idle.
    ended: list[bool] = []
    pqcopy.copy(
        conn,
        statement.as_bytes(conn),
        [HEADER, _rows(10), TRAILER],
        on_end=lambda: ended.append(True),
    )
    assert ended == [True]
    assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
    # In a transaction (the pooled path): still in it, rolled back by psycopg on request.
    conn.autocommit = False
    with pytest.raises(RuntimeError), conn.transaction():
        _c_copy(conn, statement, _rows(10))
        assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        raise RuntimeError("roll it back")
    with conn.transaction():
        _c_copy(conn, statement, _rows(5))
    assert table.count() == 15

    # An exception from the data source aborts the open COPY, as psycopg's block does.
    def failing() -> Iterator[bytes]:
        yield HEADER
        yield _rows(40_000)  # over one group: the COPY is open when the next piece fails
        raise ValueError("the source failed")

    conn.autocommit = True
    with pytest.raises(ValueError):
        pqcopy.copy(conn, statement.as_bytes(conn), failing())
    assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert table.count() == 15


def test_the_psycopg_path_still_serves(
    proxy: Proxy,
    table: Table,
    writers: WriterMaker,
    c_copies: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pqcopy, "enabled", False)
    writer = writers(proxy.dsn, table, batch_size=1000)
    caller = Caller(writer)
    proxy.cut_on(COPY_SIGNATURE, forward=False, times=2)
    caller.stream(5000, chunk=500, pause=0.01)
    assert writer.flush(timeout=30)
    assert proxy.triggered == 2
    assert not c_copies
    assert_exact(writer, table, caller)
    assert stored_numbers(table) == list(range(5000))


def test_no_speedups_turns_the_c_path_off() -> None:
    code = "from auditq import pqcopy; print(pqcopy.available())"
    env = {**os.environ, "AUDITQ_NO_SPEEDUPS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
