"""The audit table's DDL and the SQL helpers every DDL module shares: quoted, schema-qualified
names, the bookkeeping tables (schema versions, the retention log) and their advisory locks.

The steps that use them (`schema.create`, partitions, roles, migrations) sit above this
module, so it imports none of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, Literal

import psycopg
from psycopg import sql

from . import guards
from .regclass import regclass_text as regclass_text

DEFAULT_TABLE = "audit_logs"
DEFAULT_SCHEMA = "public"

#: The shape `create()` makes. 1: the table before versions were recorded (outcome CHECKed
#: against a vocabulary, no origin, no guards). 2: free-text outcome, `origin`, guards.
#: 3: the hash chain (`chain_stream`, `chain_pos`, their index, the digests, checkpoints and
#: retention tables: `chain_schema`).
SCHEMA_VERSION: Final = 3
VERSION_TABLE: Final = "auditq_schema_version"
RETENTION_TABLE: Final = "auditq_retention_log"
#: The longest outcome the table takes; the vocabulary itself is documented, not enforced.
OUTCOME_MAX_CHARS: Final = 64
OUTCOME_CHECK: Final = "auditq_outcome_length"
#: Months created after the current one by `init-db --partitioned`.
DEFAULT_AHEAD: Final = 3

Layout = Literal["plain", "partitioned", "distributed", "distributed-partitioned"]


def qualified(schema: str, table: str) -> sql.Composed:
    """`"schema"."table"`, quoted."""
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


def short_name(table: str, suffix: str, limit: int = 63) -> str:
    """`<table><suffix>` within PostgreSQL's identifier length, hashed when `table` is
    long, so that two long table names never truncate to the same derived name."""
    name = f"{table}{suffix}"
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha1(table.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{table.encode()[:40].decode(errors='ignore')}_{digest}{suffix}"


def _index_name(table: str) -> str:
    name = f"{table}_tenant_occurred_idx"
    if len(name.encode()) <= 63:
        return name
    return short_name(table, "_tenant_idx")


def table_ddl(schema: str, table: str, layout: Layout = "plain") -> list[sql.Composed]:
    """The statements that create the audit table and its index if they are missing.

    `origin` is the last column: tables migrated from version 1 get it appended, and
    both shapes must list their columns in the same order."""
    partitioned = layout in ("partitioned", "distributed-partitioned")
    distributed = layout.startswith("distributed")
    # A partitioned table's unique keys must hold the partition key; a distributed one's
    # must hold the distribution column (Citus enforces uniqueness only then).
    key = ["id", "occurred_at"] if partitioned else ["id"]
    if distributed:
        key = ["tenant_id", *key]
    target = qualified(schema, table)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)),
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {target} (
    id            uuid        NOT NULL,
    occurred_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    action        text        NOT NULL CHECK (action <> ''),
    tenant_id     text{tenant_null},
    actor_id      text,
    actor_type    text,
    resource_type text,
    resource_id   text,
    outcome       text        CONSTRAINT {outcome_check} CHECK (char_length(outcome) <= {limit}),
    ip            inet,
    user_agent    text,
    request_id    text,
    metadata      jsonb       CHECK (metadata IS NULL OR jsonb_typeof(metadata) = 'object'),
    origin        text,
    PRIMARY KEY ({key})
){partition}"""
        ).format(
            target=target,
            tenant_null=sql.SQL(" NOT NULL" if distributed else ""),
            outcome_check=sql.Identifier(OUTCOME_CHECK),
            limit=sql.Literal(OUTCOME_MAX_CHARS),
            key=sql.SQL(", ").join(map(sql.Identifier, key)),
            partition=sql.SQL(" PARTITION BY RANGE (occurred_at)" if partitioned else ""),
        ),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (tenant_id, occurred_at)").format(
            sql.Identifier(_index_name(table)), target
        ),
    ]


def ddl(schema: str = DEFAULT_SCHEMA, table: str = DEFAULT_TABLE) -> list[sql.Composed]:
    """The plain table's statements (kept for callers of the first version)."""
    return table_ddl(schema, table)


def meta_ddl(schema: str) -> list[sql.Composed]:
    """The schema's bookkeeping tables."""
    s = sql.Identifier(schema)
    return [
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {}.{} (
    table_name text        NOT NULL,
    version    integer     NOT NULL,
    layout     text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    applied_by text        NOT NULL DEFAULT session_user,
    note       text
)"""
        ).format(s, sql.Identifier(VERSION_TABLE)),
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {}.{} (
    table_name        text        NOT NULL,
    partition_name    text        NOT NULL,
    range_from        timestamptz,
    range_to          timestamptz NOT NULL,
    row_count         bigint      NOT NULL,
    total_bytes       bigint      NOT NULL,
    keep              text        NOT NULL,
    dropped_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    dropped_by        text        NOT NULL DEFAULT current_user,
    session_user_name text        NOT NULL DEFAULT session_user
)"""
        ).format(s, sql.Identifier(RETENTION_TABLE)),
    ]


def advisory_key(text: str) -> int:
    digest = hashlib.sha1(f"auditq:{text}".encode(), usedforsecurity=False)
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


def lock(conn: psycopg.Connection[Any], text: str) -> None:
    """Serialise DDL on one name across processes, until the transaction ends
    (concurrent CREATE ... IF NOT EXISTS can still race on the catalog)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key(text),))


def function_exists(conn: psycopg.Connection[Any], schema: str, signature: str) -> bool:
    row = conn.execute(
        "SELECT to_regprocedure(%s) IS NOT NULL",
        (f"{sql.Identifier(schema).as_string(conn)}.{signature}",),
    ).fetchone()
    return bool(row and row[0])


def ensure_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create `schema` only when it is missing: `CREATE SCHEMA IF NOT EXISTS` needs CREATE on
    the database even when the schema exists, which a least-privilege role lacks."""
    found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    if found is None:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))


def ensure_meta(conn: psycopg.Connection[Any], schema: str) -> None:
    """The bookkeeping tables and trigger function, guarded; inside the caller's transaction."""
    lock(conn, f"meta:{schema}")
    ensure_schema(conn, schema)
    if not function_exists(conn, schema, f"{guards.FUNCTION}()"):
        # Only when missing: CREATE OR REPLACE needs ownership of the existing function.
        conn.execute(guards.function_ddl(schema))
    for statement in meta_ddl(schema):
        conn.execute(statement)
    for name in (VERSION_TABLE, RETENTION_TABLE):
        guards.install(conn, schema, name)


def record_version(
    conn: psycopg.Connection[Any],
    schema: str,
    table: str,
    layout: str,
    note: str,
    version: int = SCHEMA_VERSION,
) -> None:
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (table_name, version, layout, note) VALUES (%s, %s, %s, %s)"
        ).format(qualified(schema, VERSION_TABLE)),
        (table, version, layout, note),
    )


def recorded(conn: psycopg.Connection[Any], schema: str, table: str) -> tuple[int, str] | None:
    """(version, layout) last recorded for `table`, or None (never recorded, or no table)."""
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (regclass_text(schema, VERSION_TABLE),)
    ).fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT version, layout FROM {} WHERE table_name = %s "
            "ORDER BY applied_at DESC, version DESC LIMIT 1"
        ).format(qualified(schema, VERSION_TABLE)),
        (table,),
    ).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


class SchemaError(ValueError):
    """The table exists in another layout than the one asked for; one line."""


def check_version(
    conn: psycopg.Connection[Any], schema: str, table: str, *, missing_ok: bool = False
) -> str | None:
    """None when `schema.table` is in the shape this auditq writes; otherwise one line
    saying what to run (`missing_ok`: None for a table that does not exist either, which a
    writer reports itself when it first writes). Never raises, and never commits: a writer
    calls it at start on its connection (a pool's, maybe) and keeps accepting (and
    retaining) entries whatever it says."""
    where = f"{schema}.{table}"
    target = f"--schema {schema} --table {table}"
    try:
        with _read_only(conn):
            found = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (regclass_text(schema, table),)
            ).fetchone()
            if not found or not found[0]:
                if missing_ok:
                    return None
                return f"audit table {where} does not exist: run `auditq init-db {target}`"
            state = recorded(conn, schema, table)
    except psycopg.Error as exc:
        return (
            f"cannot read the schema version of {where} ({exc.sqlstate}): "
            f"run `auditq migrate {target}` as its owner"
        )
    if state is None:
        return (
            f"audit table {where} has schema version 1 (made before versions were recorded) "
            f"and auditq needs version {SCHEMA_VERSION}: run `auditq migrate {target}`"
        )
    version = state[0]
    if version < SCHEMA_VERSION:
        return (
            f"audit table {where} has schema version {version} and auditq needs "
            f"version {SCHEMA_VERSION}: run `auditq migrate {target}`"
        )
    if version > SCHEMA_VERSION:
        return (
            f"audit table {where} has schema version {version}, newer than this auditq "
            f"knows ({SCHEMA_VERSION}): upgrade auditq"
        )
    return None


@contextmanager
def _read_only(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Reads that leave the connection as they found it: inside the caller's transaction a
    savepoint, on an idle connection a transaction rolled back (no COMMIT is sent)."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        with conn.transaction():
            yield
        return
    try:
        yield
    finally:
        if not conn.autocommit:
            conn.rollback()
