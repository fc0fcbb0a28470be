"""The audit table's DDL, with every identifier quoted through `psycopg.sql`."""

from __future__ import annotations

import hashlib

import psycopg
from psycopg import sql

from .dsn import Dsn

DEFAULT_TABLE = "audit_logs"
DEFAULT_SCHEMA = "public"


def qualified(schema: str, table: str) -> sql.Composed:
    """`"schema"."table"`, quoted."""
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


def _index_name(table: str) -> str:
    # PostgreSQL truncates identifiers to 63 bytes; a long table name must not make two
    # tables' indexes collide, so long names get a hash suffix.
    name = f"{table}_tenant_occurred_idx"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha1(table.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{table.encode()[:40].decode(errors='ignore')}_{digest}_tenant_idx"


def ddl(schema: str = DEFAULT_SCHEMA, table: str = DEFAULT_TABLE) -> list[sql.Composed]:
    """The statements that create the table and its index if they are missing."""
    target = qualified(schema, table)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)),
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {} (
    id            uuid        PRIMARY KEY,
    occurred_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    action        text        NOT NULL CHECK (action <> ''),
    tenant_id     text,
    actor_id      text,
    actor_type    text,
    resource_type text,
    resource_id   text,
    outcome       text,
    ip            inet,
    user_agent    text,
    request_id    text,
    metadata      jsonb       CHECK (metadata IS NULL OR jsonb_typeof(metadata) = 'object'),
    origin        text
)"""
        ).format(target),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (tenant_id, occurred_at)").format(
            sql.Identifier(_index_name(table)), target
        ),
    ]


def create(
    conn_or_dsn: psycopg.Connection[object] | str | Dsn,
    *,
    table: str = DEFAULT_TABLE,
    schema: str = DEFAULT_SCHEMA,
) -> None:
    """Create the audit table and its index; safe to run again and from several processes."""
    if isinstance(conn_or_dsn, psycopg.Connection):
        _create(conn_or_dsn, schema, table)
        return
    dsn = conn_or_dsn if isinstance(conn_or_dsn, Dsn) else Dsn(conn_or_dsn)
    try:
        with psycopg.connect(dsn.secret_value) as conn:
            _create(conn, schema, table)
    except psycopg.Error as exc:
        raise psycopg.OperationalError(dsn.scrub(str(exc))) from None


def _create(conn: psycopg.Connection[object], schema: str, table: str) -> None:
    with conn.transaction():
        # Concurrent CREATE ... IF NOT EXISTS can still race on the catalog; serialise them.
        digest = hashlib.sha1(f"auditq:{schema}.{table}".encode(), usedforsecurity=False)
        key = int.from_bytes(digest.digest()[:8], "big", signed=True)
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        for statement in ddl(schema, table):
            conn.execute(statement)
