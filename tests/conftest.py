"""Fixtures: a real PostgreSQL (AUDITQ_TEST_DSN, else an embedded one), a fresh table per test."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from auditq import AuditWriter
from auditq.schema import create, qualified

from .pgserver import EmbeddedServer, embedded_server

SCHEMA = "auditq_test"


def pytest_report_header() -> str:
    where = "AUDITQ_TEST_DSN" if os.environ.get("AUDITQ_TEST_DSN") else "an embedded server"
    return f"auditq tests against {where}"


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    dsn = os.environ.get("AUDITQ_TEST_DSN")
    if dsn:
        yield dsn
        return
    with embedded_server() as server:
        yield server.dsn


@dataclass
class Table:
    """One test's audit table and a few ways to look inside it."""

    dsn: str
    schema: str
    name: str

    def query(self, text: str, *params: Any) -> list[tuple[Any, ...]]:
        statement = sql.SQL(text).format(table=qualified(self.schema, self.name))
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(statement, params or None).fetchall()

    def count(self) -> int:
        return int(self.query("SELECT count(*) FROM {table}")[0][0])

    def distinct_ids(self) -> int:
        return int(self.query("SELECT count(DISTINCT id) FROM {table}")[0][0])

    def execute(self, text: str) -> None:
        statement = sql.SQL(text).format(table=qualified(self.schema, self.name))
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(statement)


def _make_table(dsn: str) -> Table:
    table = Table(dsn, SCHEMA, f"audit_{uuid.uuid4().hex[:12]}")
    create(dsn, schema=table.schema, table=table.name)
    return table


def _drop(table: Table) -> None:
    with contextlib.suppress(psycopg.Error):
        table.execute("DROP TABLE IF EXISTS {table}")


@pytest.fixture
def table(pg_dsn: str) -> Iterator[Table]:
    made = _make_table(pg_dsn)
    yield made
    _drop(made)


WriterFactory = Callable[..., AuditWriter]


@pytest.fixture
def make_writer(table: Table) -> Iterator[WriterFactory]:
    """Writers on this test's table; each is closed at teardown."""
    made: list[AuditWriter] = []

    def factory(dsn: str | None = None, **options: Any) -> AuditWriter:
        options.setdefault("schema", table.schema)
        options.setdefault("table", table.name)
        writer = AuditWriter(dsn or table.dsn, **options)
        made.append(writer)
        return writer

    yield factory
    for writer in made:
        writer.close(timeout=5)


@pytest.fixture
def own_server() -> Iterator[EmbeddedServer]:
    """A server this test may freeze or restart."""
    with embedded_server() as server:
        yield server


@pytest.fixture
def own_table(own_server: EmbeddedServer) -> Table:
    return _make_table(own_server.dsn)


@pytest.fixture
def default_writer(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A clean module-level default writer: none before the test, shut down after it."""
    import auditq
    import auditq.default

    for name in ("AUDITQ_DSN", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    auditq.shutdown(timeout=5)
    yield
    auditq.shutdown(timeout=5)
