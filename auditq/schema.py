"""The audit table's DDL, with every identifier quoted through `psycopg.sql`.

Besides the table, each schema that holds an audit table gets two small bookkeeping tables,
both append-only like the audit table: `auditq_schema_version` (which shape each table is
in, so the writer can say what to run when it is behind) and `auditq_retention_log` (each
partition `auditq retention` dropped).
"""

from __future__ import annotations

from typing import Any

import psycopg

from . import chain_schema, guards, partitions
from . import roles as role_setup
from .dsn import Dsn
from .regclass import regclass_text as regclass_text
from .roles import RoleNames
from .tables import (
    DEFAULT_AHEAD as DEFAULT_AHEAD,
)
from .tables import (
    DEFAULT_SCHEMA as DEFAULT_SCHEMA,
)
from .tables import (
    DEFAULT_TABLE as DEFAULT_TABLE,
)
from .tables import (
    OUTCOME_CHECK as OUTCOME_CHECK,
)
from .tables import (
    OUTCOME_MAX_CHARS as OUTCOME_MAX_CHARS,
)
from .tables import (
    RETENTION_TABLE as RETENTION_TABLE,
)
from .tables import (
    SCHEMA_VERSION as SCHEMA_VERSION,
)
from .tables import (
    VERSION_TABLE as VERSION_TABLE,
)
from .tables import (
    Layout as Layout,
)
from .tables import (
    SchemaError as SchemaError,
)
from .tables import (
    advisory_key as advisory_key,
)
from .tables import (
    check_version as check_version,
)
from .tables import (
    ddl as ddl,
)
from .tables import (
    ensure_meta as ensure_meta,
)
from .tables import (
    function_exists as function_exists,
)
from .tables import (
    lock as lock,
)
from .tables import (
    meta_ddl as meta_ddl,
)
from .tables import (
    qualified as qualified,
)
from .tables import (
    record_version as record_version,
)
from .tables import (
    recorded as recorded,
)
from .tables import (
    short_name as short_name,
)
from .tables import (
    table_ddl as table_ddl,
)


def create(
    conn_or_dsn: psycopg.Connection[Any] | str | Dsn,
    *,
    table: str = DEFAULT_TABLE,
    schema: str = DEFAULT_SCHEMA,
    partitioned: bool = False,
    ahead: int = DEFAULT_AHEAD,
    guarded: bool = True,
    roles: RoleNames | None = None,
) -> None:
    """Create the audit table, its index and its append-only guards; safe to run again and
    from several processes.

    `partitioned`: monthly range partitions on `occurred_at`, the current month and
    `ahead` more created now (later months are created when a row needs them).
    `guarded=False` leaves the guards out: for scratch tables a benchmark empties with
    TRUNCATE, never for audit data. `roles`: also create the owner, writer and reader
    roles and their grants and row-level security (see `auditq.roles`)."""
    if isinstance(conn_or_dsn, psycopg.Connection):
        _create(conn_or_dsn, schema, table, partitioned, ahead, guarded, roles)
        return
    dsn = conn_or_dsn if isinstance(conn_or_dsn, Dsn) else Dsn(conn_or_dsn)
    try:
        with psycopg.connect(dsn.secret_value) as conn:
            _create(conn, schema, table, partitioned, ahead, guarded, roles)
    except psycopg.Error as exc:
        raise type(exc)(dsn.scrub(str(exc))) from None


def _create(
    conn: psycopg.Connection[Any],
    schema: str,
    table: str,
    partitioned: bool,
    ahead: int,
    guarded: bool,
    roles: RoleNames | None,
) -> None:
    layout: Layout = "partitioned" if partitioned else "plain"
    with conn.transaction():
        ensure_meta(conn, schema)
        lock(conn, f"{schema}.{table}")
        existed = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (regclass_text(schema, table),)
        ).fetchone()
        exists = bool(existed and existed[0])
        if exists and partitions.is_partitioned(conn, schema, table) != partitioned:
            have = "partitioned" if not partitioned else "not partitioned"
            fix = (
                "convert it with `auditq migrate --to-partitioned`"
                if partitioned
                else "pass --partitioned"
            )
            raise SchemaError(f"{schema}.{table} exists and is {have}: {fix}")
        for statement in table_ddl(schema, table, layout)[1:]:  # the schema: ensure_meta
            conn.execute(statement)
        if recorded(conn, schema, table) is None and not exists:
            record_version(conn, schema, table, layout, "created by auditq init-db")
        if partitioned:
            partitions.install_function(conn, schema)
        # The hash chain's columns and tables (docs/tamper-evidence.md): on the parent of a
        # partitioned table, which its partitions inherit.
        chain_schema.create_chain_tables(conn, schema, table)
        if guarded:
            guards.install(conn, schema, table)
        if roles is not None:
            role_setup.apply(conn, schema, table, roles)
    if partitioned:
        with conn.transaction():
            partitions.create_ahead(conn, schema, table, ahead)
