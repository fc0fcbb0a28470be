"""Is this database ready for auditq? One check for a deploy's health probe or a CI step.

`check()` connects the way the writer does and reports, one finding each, everything the
writer would otherwise discover only when its first batch fails, or only during an outage:

- the connection itself (the message with the password removed);
- USAGE on the schema, the table, each column COPY writes and its type (binary COPY needs the
  exact type), and any other column that is NOT NULL without a default;
- INSERT on the table (or on every written column);
- what the idempotent replay after a commit of unknown outcome needs: a unique index on
  `id` (`ON CONFLICT (id)`), TEMP on the database and SELECT on the table (its staging
  table is `CREATE TEMP TABLE ... (LIKE table)`). Without them an ambiguous commit cannot be
  resolved without risking duplicates.

Every finding names what to run to fix it. Nothing is created or changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from psycopg import sql

from .binary import COPY_COLUMNS
from .dsn import Dsn
from .tables import DEFAULT_SCHEMA, DEFAULT_TABLE, qualified

__all__ = ["CheckResult", "check"]

#: The type each written column must have (as `format_type` spells it).
COLUMN_TYPES: Final = {
    "id": "uuid",
    "occurred_at": "timestamp with time zone",
    "ip": "inet",
    "metadata": "jsonb",
}
TEXT: Final = "text"
DEFAULT_CONNECT_TIMEOUT: Final = 5


@dataclass(frozen=True)
class CheckResult:
    """What `check()` found: `ok` when nothing is missing; `findings` say what is, one
    line each, with the fix."""

    target: str  # "schema.table on <dsn with the password masked>"
    findings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.findings

    def lines(self) -> list[str]:
        """One line per finding, or one line saying all is well."""
        if self.ok:
            return [f"ok: {self.target} is ready for auditq"]
        return [f"missing: {finding}" for finding in self.findings]


def check(
    dsn_or_conn: str | Dsn | psycopg.Connection[Any],
    *,
    schema: str = DEFAULT_SCHEMA,
    table: str = DEFAULT_TABLE,
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
) -> CheckResult:
    """Check the database (read-only). A connection you pass is used as is and left open;
    a DSN is connected to with `connect_timeout` and closed after."""
    if isinstance(dsn_or_conn, psycopg.Connection):
        info = dsn_or_conn.info
        where = f"{schema}.{table} on {info.user}@{info.host}:{info.port}/{info.dbname}"
        return CheckResult(where, tuple(_findings(dsn_or_conn, schema, table)))
    dsn = dsn_or_conn if isinstance(dsn_or_conn, Dsn) else Dsn(dsn_or_conn)
    where = f"{schema}.{table} on {dsn}"
    try:
        conn = psycopg.connect(
            dsn.with_defaults(connect_timeout=connect_timeout).secret_value, autocommit=True
        )
    except psycopg.Error as exc:
        reason = dsn.scrub(str(exc).strip()).replace("\n", " ")
        return CheckResult(where, (f"connection: cannot connect: {reason}",))
    with conn:
        return CheckResult(where, tuple(_findings(conn, schema, table)))


def _one(conn: psycopg.Connection[Any], query: str, *params: Any) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def _findings(conn: psycopg.Connection[Any], schema: str, table: str) -> list[str]:
    found: list[str] = []
    role = str(_one(conn, "SELECT current_user"))
    database = str(_one(conn, "SELECT current_database()"))
    target = qualified(schema, table).as_string(conn)
    quoted_role = sql.Identifier(role).as_string(conn)
    if _one(conn, "SELECT oid FROM pg_namespace WHERE nspname = %s", schema) is None:
        return [f"schema {schema!r} does not exist (run `auditq init-db`)"]
    if not _one(conn, "SELECT has_schema_privilege(%s, 'USAGE')", schema):
        found.append(
            f"USAGE on schema {schema!r} for role {role!r}: GRANT USAGE ON SCHEMA "
            f"{sql.Identifier(schema).as_string(conn)} TO {quoted_role}"
        )
    oid = _one(
        conn,
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        schema,
        table,
    )
    if oid is None:
        found.append(f"table {schema}.{table} does not exist (run `auditq init-db`)")
        return found
    columns = {
        name: (kind, not_null, has_default)
        for name, kind, not_null, has_default in conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod), attnotnull, atthasdef"
            " FROM pg_attribute WHERE attrelid = %s::oid AND attnum > 0 AND NOT attisdropped",
            (oid,),
        ).fetchall()
    }
    for name in COPY_COLUMNS:
        wanted = COLUMN_TYPES.get(name, TEXT)
        if name not in columns:
            found.append(f"column {name} ({wanted}) in {schema}.{table}")
        elif columns[name][0] != wanted:
            found.append(f"column {name} must be {wanted}, is {columns[name][0]}")
    for name, (_kind, not_null, has_default) in sorted(columns.items()):
        if name not in COPY_COLUMNS and not_null and not has_default:
            found.append(f"a default for column {name}: it is NOT NULL and auditq does not set it")
    insert_ok = _one(conn, "SELECT has_table_privilege(%s::oid, 'INSERT')", oid) or all(
        _one(conn, "SELECT has_column_privilege(%s::oid, %s, 'INSERT')", oid, name)
        for name in COPY_COLUMNS
        if name in columns
    )
    if not insert_ok:
        found.append(f"INSERT on {schema}.{table}: GRANT INSERT ON {target} TO {quoted_role}")
    # What the replay after an unknown commit outcome runs (see the module docstring).
    unique_id = _one(
        conn,
        "SELECT count(*) FROM pg_index i JOIN pg_attribute a"
        " ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
        " WHERE i.indrelid = %s::oid AND i.indisunique AND i.indnkeyatts = 1 AND a.attname = 'id'"
        " AND i.indpred IS NULL",
        oid,
    )
    if not unique_id:
        found.append(f"a unique index on {schema}.{table} (id): the replay uses ON CONFLICT (id)")
    if not _one(conn, "SELECT has_database_privilege(current_database(), 'TEMP')"):
        found.append(
            f"TEMP on database {database!r} (for the replay's staging table): GRANT TEMPORARY"
            f" ON DATABASE {sql.Identifier(database).as_string(conn)} TO {quoted_role}"
        )
    if not _one(conn, "SELECT has_table_privilege(%s::oid, 'SELECT')", oid):
        found.append(
            f"SELECT on {schema}.{table} (the replay's staging table is created LIKE it):"
            f" GRANT SELECT ON {target} TO {quoted_role}"
        )
    return found
