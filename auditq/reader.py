"""`auditq.read()`: stored entries as typed `AuditEntry` objects, streamed in constant memory.

The rows come through a server-side (named) cursor a page at a time, so reading a tenant's
whole history costs one page of memory, not the history. Each row becomes a `StoredEntry`
without validation: the table is the evidence, and a read must never refuse a stored row
because it breaks today's input rules (a row written by another tool, before a limit
changed, or with an outcome outside the vocabulary).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, Final

import orjson
import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.types.json import set_json_loads

from .dsn import Dsn
from .entry import AuditEntry
from .filters import TENANT_SETTING, Filters, Moment, NoTable, scope_session, table_columns
from .tables import DEFAULT_SCHEMA, DEFAULT_TABLE, qualified

#: Rows fetched per round trip by the server-side cursor: the memory a read holds.
PAGE_ROWS: Final = 2000


class StoredEntry(AuditEntry):
    """An `AuditEntry` as stored: with the columns the database adds."""

    recorded_at: datetime | None = None
    """When the database stored it (its transaction's start)."""
    origin: str | None = None
    """Where the event occurred (service and host), on tables that have the column."""


#: Columns a read selects when the table has them, in this order.
ENTRY_COLUMNS: Final = tuple(StoredEntry.model_fields)


def select_entries(
    schema: str, table: str, present: Sequence[str], filters: Filters
) -> tuple[sql.Composed, list[Any], list[str]]:
    """The SELECT for `filters` over the entry columns the table has, oldest first.

    Returns the statement, its parameters and the selected column names.
    """
    names = [name for name in ENTRY_COLUMNS if name in present]
    where, params = filters.where()
    statement = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {}, {}").format(
        sql.SQL(", ").join(map(sql.Identifier, names)),
        qualified(schema, table),
        where,
        sql.Identifier("occurred_at"),
        sql.Identifier("id"),
    )
    if filters.limit is not None:
        statement = sql.SQL("{} LIMIT %s").format(statement)
        params.append(filters.limit)
    return statement, params, names


def entry_from_row(names: Sequence[str], row: Sequence[Any]) -> StoredEntry:
    """A `StoredEntry` from a row psycopg already typed (uuid, datetime, ip, dict)."""
    return StoredEntry.model_construct(**dict(zip(names, row, strict=True)))


def read(
    dsn_or_conn: str | Dsn | psycopg.Connection[Any],
    *,
    tenant: str | None = None,
    since: Moment | str | None = None,
    until: Moment | str | None = None,
    action: str | None = None,
    actor: str | None = None,
    schema: str = DEFAULT_SCHEMA,
    table: str = DEFAULT_TABLE,
    limit: int | None = None,
) -> Iterator[StoredEntry]:
    """Stored entries matching the filters, oldest first (`occurred_at`, then `id`).

    `tenant` scopes the read twice: the transaction's `auditq.tenant` setting (for a
    row-level security policy) and an explicit `tenant_id =` condition. `since` and `until`
    take aware datetimes, durations back from the database's clock (`timedelta(hours=24)`),
    or the text the CLI accepts (`"2026-01-31T00:00Z"`, `"7d"`). Bad filters raise
    `auditq.filters.FilterError` (a `ValueError`) at the call, before any query.

    With a DSN the read opens and closes its own connection; with a connection it runs in a
    transaction (a savepoint if one is open) on it, which it must not share with other work
    until the iterator is exhausted or closed.
    """
    filters = Filters.checked(
        tenant=tenant, since=since, until=until, action=action, actor=actor, limit=limit
    )
    return _read(dsn_or_conn, filters, schema, table)


def _read(
    dsn_or_conn: str | Dsn | psycopg.Connection[Any],
    filters: Filters,
    schema: str,
    table: str,
) -> Iterator[StoredEntry]:
    if isinstance(dsn_or_conn, psycopg.Connection):
        yield from _read_on(dsn_or_conn, filters, schema, table)
        return
    dsn = dsn_or_conn if isinstance(dsn_or_conn, Dsn) else Dsn(dsn_or_conn)
    try:
        conn = psycopg.connect(dsn.secret_value)
    except psycopg.Error as exc:
        raise psycopg.OperationalError(dsn.scrub(str(exc))) from None
    with conn:
        yield from _read_on(conn, filters, schema, table)


def _read_on(
    conn: psycopg.Connection[Any], filters: Filters, schema: str, table: str
) -> Iterator[StoredEntry]:
    nested = conn.info.transaction_status == TransactionStatus.INTRANS
    with conn.transaction():
        with conn.cursor() as cur:
            present = table_columns(cur, schema, table)
            if not present:
                raise NoTable(f"no table {schema}.{table}")
            previous = None
            if nested:
                # set_config(..., true) outlives a savepoint: put the caller's value back.
                cur.execute("SELECT current_setting(%s, true)", (TENANT_SETTING,))
                previous = cur.fetchone()
            scope_session(cur, filters.tenant)
        statement, params, names = select_entries(schema, table, present, filters)
        name = f"auditq_read_{uuid.uuid4().hex}"
        with conn.cursor(name) as named:
            set_json_loads(orjson.loads, named)
            named.itersize = PAGE_ROWS
            named.execute(statement, params)
            for row in named:
                yield entry_from_row(names, row)
        if nested and filters.tenant is not None:
            restore = "" if previous is None or previous[0] is None else str(previous[0])
            conn.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, restore))
