"""Shared pieces of the audit-trail tests: a schema of the test's own, unique roles that are
dropped afterwards (roles are cluster-wide and the server is shared), and SQL helpers."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from auditq.roles import RoleNames
from auditq.schema import qualified


@dataclass
class Trail:
    """One test's schema and table (and roles, when it asked for them)."""

    dsn: str
    schema: str
    table: str
    roles: RoleNames

    def dsn_as(self, role: str) -> str:
        return make_conninfo(self.dsn, user=role)

    def connect(self, role: str | None = None) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn_as(role) if role else self.dsn, autocommit=True)

    def run(self, text: str, *params: Any, role: str | None = None) -> list[tuple[Any, ...]]:
        """Run `text` ({table} and {schema} filled in) and return its rows, if any."""
        statement = sql.SQL(text).format(  # type: ignore[arg-type]
            table=qualified(self.schema, self.table), schema=sql.Identifier(self.schema)
        )
        with self.connect(role) as conn:
            cur = conn.execute(statement, params or None)
            return cur.fetchall() if cur.description else []

    def insert(
        self, occurred_at: datetime, *, tenant: str | None = None, role: str | None = None
    ) -> None:
        self.run(
            "INSERT INTO {table} (id, occurred_at, action, tenant_id) "
            "VALUES (gen_random_uuid(), %s, 'test.insert', %s)",
            occurred_at,
            tenant,
            role=role,
        )


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def trail(dsn: str) -> Iterator[Trail]:
    """A fresh schema and role names; everything dropped afterwards, roles last."""
    tag = unique_name("h2t")
    made = Trail(dsn, tag, "audit_logs", RoleNames.with_prefix(tag))
    try:
        yield made
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(tag)))
            for _, role in reversed(made.roles.kinds()):
                exists = conn.execute(
                    "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)
                ).fetchone()
                if exists:
                    conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def allow_login(made: Trail) -> None:
    """The roles but the owner are made NOLOGIN; the tests connect as them."""
    with made.connect() as conn:
        for _, role in made.roles.kinds()[1:]:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)))


def refused(conn: psycopg.Connection[Any], statement: str | sql.Composable) -> str:
    """Run `statement`, which must fail; returns the SQLSTATE."""
    try:
        conn.execute(statement)  # type: ignore[arg-type]
    except psycopg.Error as exc:
        return str(exc.sqlstate)
    raise AssertionError(f"not refused: {statement!r}")
