"""The writer owns its session (issue 14, item 1) and its staging table (item 13):
a role's low statement_timeout, a server that cancels large COPYs, and a `search_path`
that puts `public` before `pg_temp` neither lose entries nor let a planted row in."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from auditq import AuditWriter
from auditq.binary import Item
from auditq.connection import DsnSource, system_identifier
from auditq.dsn import Dsn
from auditq.entry import Row
from auditq.sink import make_items

from .conftest import Table
from .helpers import own_sink


@contextmanager
def _role(table: Table, *settings: str) -> Iterator[str]:
    """A login role (unique name, dropped after) that may write `table`, with `settings`
    (`ALTER ROLE ... SET name = value`)."""
    name = f"auditq_h4_{uuid.uuid4().hex[:10]}"
    role = sql.Identifier(name)
    target = sql.Identifier(table.schema, table.name)
    with psycopg.connect(table.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
        try:
            conn.execute(
                sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(table.schema), role)
            )
            conn.execute(sql.SQL("GRANT INSERT, SELECT ON {} TO {}").format(target, role))
            for setting in settings:
                conn.execute(sql.SQL("ALTER ROLE {} SET ").format(role) + sql.SQL(setting))
            yield make_conninfo(table.dsn, user=name)
        finally:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (name,),
            )
            conn.execute(sql.SQL("DROP OWNED BY {}").format(role))
            conn.execute(sql.SQL("DROP ROLE {}").format(role))


def test_the_writer_sets_its_own_session_timeouts(table: Table) -> None:
    with _role(table, "statement_timeout = '86ms'", "idle_session_timeout = '1s'") as dsn:
        source = DsnSource(Dsn(dsn))
        source.bound_session(2.0)
        try:
            conn = source.acquire()
            show = {
                name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
                for name in (
                    "statement_timeout",
                    "lock_timeout",
                    "idle_in_transaction_session_timeout",
                    "idle_session_timeout",
                )
            }
        finally:
            source.close()
    assert show["statement_timeout"] == ("1800ms",)
    assert show["idle_in_transaction_session_timeout"] == ("1800ms",)
    assert show["lock_timeout"] == ("900ms",)
    assert show["idle_session_timeout"] == ("0",)


def test_a_role_statement_timeout_does_not_fail_every_batch(table: Table) -> None:
    # The scenario: 60,000 entries, batches up to 50,000 rows, a role whose
    # statement_timeout (86ms) no COPY of that size meets.
    with _role(table, "statement_timeout = '86ms'") as dsn:
        writer = AuditWriter(
            dsn,
            schema=table.schema,
            table=table.name,
            batch_size=50_000,
            max_queue=100_000,
            retry_backoff_max=0.2,
            flush_interval=0.5,
        )
        try:
            for i in range(60_000):
                assert writer.log("timeout.role", resource_id=str(i))
            assert writer.flush(timeout=120)
        finally:
            writer.close(timeout=10)
        stats = writer.stats()
    assert stats.dead_lettered == 0
    assert stats.written == 60_000
    assert table.count() == 60_000


def test_a_cancelled_copy_is_written_in_smaller_batches(
    table: Table, caplog: pytest.LogCaptureFixture
) -> None:
    # Each row costs the server 10 ms (a trigger), so a COPY of 200 rows outlasts the
    # writer's own statement_timeout (0.9 x write_timeout = 0.9 s) and is cancelled (57014)
    # however often it is repeated; halves of 50 rows fit.
    table.execute(
        "CREATE FUNCTION auditq_test.slow_{name}() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(0.01); RETURN NEW; END $$".replace("{name}", table.name)
    )
    table.execute(
        "CREATE TRIGGER slow BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
        + f"auditq_test.slow_{table.name}()"
    )
    caplog.set_level(logging.WARNING, logger="auditq")
    writer = AuditWriter(
        table.dsn,
        schema=table.schema,
        table=table.name,
        batch_size=200,
        flush_interval=5,
        write_timeout=1.0,
        retry_backoff_max=0.2,
    )
    try:
        for i in range(200):
            assert writer.log("timeout.cancelled", resource_id=str(i))
        assert writer.flush(timeout=60)
    finally:
        writer.close(timeout=10)
    stats = writer.stats()
    assert stats.dead_lettered == 0
    assert stats.written == 200
    assert table.count() == 200
    assert "the server cancelled a write of 200 rows ([57014]" in caplog.text


class _Ledger:
    def __init__(self) -> None:
        self.committed_rows = 0
        self.dead_rows = 0

    def committed(self, count: int) -> None:
        self.committed_rows += count

    def dead(self, items: Sequence[Item], reason: str) -> None:
        self.dead_rows += len(items)

    def retrying(self, error: str) -> None:
        pass

    def rejected_rows(self, rows: Sequence[tuple[Row, str]]) -> None:
        self.dead_rows += len(rows)


def _row(resource_id: str) -> Row:
    return (None, time.time_ns(), "staging.test", "t", "u", None, "doc", resource_id,
            None, None, None, None, None)  # fmt: skip


def test_staging_table_is_pg_temp_whatever_the_search_path(table: Table) -> None:
    # `search_path = public, pg_temp`: an unqualified staging table resolves to a table of
    # the same name in public, where another role may have planted rows.
    staging = f"auditq_staging_{zlib.crc32(f'{table.schema}.{table.name}'.encode()):08x}"
    planted = sql.Identifier("public", staging)
    with psycopg.connect(table.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(
                planted, sql.Identifier(table.schema, table.name)
            )
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, occurred_at, action) "
                "VALUES (gen_random_uuid(), now(), 'planted.row')"
            ).format(planted)
        )
    try:
        dsn = make_conninfo(table.dsn, options="-c search_path=public,pg_temp")
        ledger = _Ledger()
        items, bad = make_items([_row(str(i)) for i in range(5)])
        assert not bad
        with own_sink(dsn, table.schema, table.name, ledger) as sink:
            assert sink.deliver(items, mode="replay").items == []
        assert ledger.committed_rows == 5
        assert table.count() == 5
        assert table.query("SELECT count(*) FROM {table} WHERE action = 'planted.row'") == [(0,)]
        with psycopg.connect(table.dsn, autocommit=True) as conn:
            left = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(planted)).fetchone()
        assert left == (1,)  # neither emptied nor filled by the writer
    finally:
        with psycopg.connect(table.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(planted))


def test_system_identifier_names_the_cluster(table: Table) -> None:
    with psycopg.connect(table.dsn, autocommit=True) as conn:
        expected = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
        assert expected is not None
        assert system_identifier(conn) == str(expected[0])
    with psycopg.connect(table.dsn) as conn:  # not autocommit: no transaction left open
        assert system_identifier(conn) == str(expected[0])
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_a_pool_of_the_applications_keeps_its_session_settings(table: Table) -> None:
    # Borrowed connections get the writer's timeouts for its own transactions only.
    from psycopg_pool import ConnectionPool

    with (
        _role(table, "statement_timeout = '86ms'") as dsn,
        ConnectionPool(dsn, min_size=1, max_size=1, open=True) as pool,
    ):
        writer = AuditWriter(pool, schema=table.schema, table=table.name, batch_size=50_000)
        try:
            for i in range(60_000):
                assert writer.log("timeout.pool", resource_id=str(i))
            assert writer.flush(timeout=120)
        finally:
            writer.close(timeout=10)
        with pool.connection() as conn:
            shown = conn.execute("SHOW statement_timeout").fetchone()
    assert writer.stats().written == 60_000 and writer.stats().dead_lettered == 0
    assert table.count() == 60_000
    assert shown == ("86ms",)  # the application's session is as its role set it


class _OptionsRefusingPooler:
    """Answers a startup packet that carries `options` as PgBouncer does by default (an
    error, `unsupported startup parameter: options`); passes any other connection through
    to the real server."""

    SSL_REQUEST = 80877103
    GSSENC_REQUEST = 80877104

    def __init__(self, dsn: str) -> None:
        params = conninfo_to_dict(dsn)
        host, port = str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)
        self._upstream: tuple[int, Any] = (
            (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
            if host.startswith("/")
            else (socket.AF_INET, (host, port))
        )
        self.refused = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    @staticmethod
    def _exact(sock: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _handle(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                head = self._exact(client, 4)
                body = self._exact(client, int.from_bytes(head, "big") - 4)
                if int.from_bytes(body[:4], "big") in (self.SSL_REQUEST, self.GSSENC_REQUEST):
                    client.sendall(b"N")
                    continue
                break
            keys = body[4:].split(b"\0")[0::2]
            if b"options" in keys:
                self.refused += 1
                fields = b"SFATAL\0C08P01\0Munsupported startup parameter: options\0\0"
                client.sendall(b"E" + (len(fields) + 4).to_bytes(4, "big") + fields)
                client.close()
                return
            family, address = self._upstream
            upstream = socket.socket(family, socket.SOCK_STREAM)
            upstream.connect(address)
            upstream.sendall(head + body)
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
            self._pipe(client, upstream)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def test_a_pooler_that_refuses_startup_options_still_gets_the_rows(
    table: Table, caplog: pytest.LogCaptureFixture
) -> None:
    pooler = _OptionsRefusingPooler(table.dsn)
    params = conninfo_to_dict(table.dsn)
    dsn = make_conninfo(
        "", host="127.0.0.1", port=pooler.port, dbname=params.get("dbname"),
        user=params.get("user"), password=params.get("password"), sslmode="disable",
    )  # fmt: skip
    caplog.set_level(logging.WARNING, logger="auditq")
    try:
        writer = AuditWriter(dsn, schema=table.schema, table=table.name, retry_backoff_max=0.2)
        try:
            for i in range(100):
                assert writer.log("pooler.options", resource_id=str(i))
            assert writer.flush(timeout=30)
        finally:
            writer.close(timeout=5)
    finally:
        pooler.close()
    assert table.count() == 100
    assert pooler.refused == 1  # refused once, then connected without the options
    assert caplog.text.count("refused the writer's session settings") == 1
