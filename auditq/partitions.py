"""Monthly range partitions on `occurred_at`: creating them, on demand too, and listing them.

A row whose month has no partition fails the whole COPY (SQLSTATE 23514, "no partition of
relation ... found for row"). auditq answers that by creating the month, through
`<schema>.auditq_ensure_partition(table, ts)`: a SECURITY DEFINER function owned by the
table's owner, which the writer role may execute but which can do nothing except add the
month holding `ts` to a table registered as partitioned. The alternative, a DEFAULT
partition, was rejected: each later CREATE/ATTACH of a month scans the default under an
ACCESS EXCLUSIVE lock, DETACH CONCURRENTLY is refused while it exists, and moving its rows
out needs DELETE, which the append-only guards forbid.

The month is created as a table of its own and then ATTACHed: ATTACH takes SHARE UPDATE
EXCLUSIVE on the parent, which does not wait for (or block) the other writers' COPYs,
where CREATE TABLE ... PARTITION OF would take ACCESS EXCLUSIVE.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg import sql

from .tables import VERSION_TABLE, function_exists, qualified, regclass_text

FUNCTION: Final = "auditq_ensure_partition"
#: Where a binary COPY tuple (auditq.binary) holds `occurred_at`, microseconds since
#: 2000-01-01 UTC: after the field count (2 bytes), the id's length and 16 bytes, and
#: the timestamp's length (see `binary._HEAD`).
OCCURRED_AT_OFFSET: Final = 26
_MICROS: Final = struct.Struct(">q")
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)


def function_ddl(schema: str) -> sql.Composed:
    """The on-demand partition function of `schema` (one per schema, for its tables)."""
    s = sql.Identifier(schema)
    return sql.SQL(
        """CREATE OR REPLACE FUNCTION {s}.{fn}(tbl text, ts timestamptz) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' SET datestyle = 'ISO, YMD'
AS $auditq$
-- {marker} (grants INSERT on a new month)
DECLARE
    sch  constant text := {schema};
    lo   timestamptz := date_trunc('month', ts);
    hi   timestamptz := date_trunc('month', ts) + interval '1 month';
    lay  text;
    base text;
    part text;
    who  text;
BEGIN
    SELECT v.layout INTO lay FROM {s}.{versions} v
        WHERE v.table_name = tbl ORDER BY v.applied_at DESC, v.version DESC LIMIT 1;
    IF lay IS NULL OR lay NOT LIKE '%partitioned' THEN
        RAISE EXCEPTION 'auditq: %.% is not a partitioned auditq table', sch, tbl
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    base := CASE WHEN octet_length(tbl) <= 48 THEN tbl
                 ELSE left(tbl, 36) || '_' || left(md5(tbl), 8) END;
    part := base || '_p' || to_char(lo, 'YYYYMM');
    PERFORM pg_advisory_xact_lock(hashtext('auditq_partition:' || sch || '.' || tbl));
    IF to_regclass(format('%I.%I', sch, part)) IS NOT NULL THEN
        RETURN part;
    END IF;
    BEGIN
        EXECUTE format('CREATE TABLE %I.%I (LIKE %I.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                       sch, part, sch, tbl);
        EXECUTE format('ALTER TABLE %I.%I ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
                       sch, tbl, sch, part, lo, hi);
    EXCEPTION WHEN invalid_object_definition THEN
        -- Another partition already holds this month (a wider one, from a conversion of
        -- an unpartitioned table): nothing to create. The subtransaction is rolled back.
        RETURN NULL;
    END;
    IF lay NOT LIKE 'distributed%' THEN
        EXECUTE format('CREATE TRIGGER auditq_no_truncate BEFORE TRUNCATE ON %I.%I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION %I.auditq_refuse_change()',
                       sch, part, sch);
        EXECUTE format('ALTER TABLE %I.%I ENABLE ALWAYS TRIGGER auditq_no_truncate', sch, part);
    END IF;
    -- Whoever may INSERT into the parent may INSERT into the month directly (auditq.routes
    -- copies a batch straight into its month): nothing more, and no SELECT, which would
    -- let a reader past the parent's row-level security. When the parent has row-level
    -- security, only roles that bypass it (never PUBLIC): a partition has no policy, so a
    -- grant to anyone else would let them insert what the parent's policies refuse.
    FOR who IN SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                    ELSE a.grantee::regrole::text END
               FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
               LEFT JOIN pg_roles r ON r.oid = a.grantee
               WHERE c.oid = format('%I.%I', sch, tbl)::regclass
                 AND a.privilege_type = 'INSERT' AND a.grantee <> c.relowner
                 AND (NOT c.relrowsecurity OR coalesce(r.rolbypassrls, false)) LOOP
        EXECUTE format('GRANT INSERT ON %I.%I TO %s', sch, part, who);
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_trigger
               WHERE tgrelid = format('%I.%I', sch, part)::regclass
                 AND tgname = 'auditq_append_only' AND tgenabled <> 'A') THEN
        EXECUTE format('ALTER TABLE %I.%I ENABLE ALWAYS TRIGGER auditq_append_only', sch, part);
    END IF;
    RETURN part;
END
$auditq$"""
    ).format(
        s=s,
        fn=sql.Identifier(FUNCTION),
        schema=sql.Literal(schema),
        versions=sql.Identifier(VERSION_TABLE),
        marker=sql.SQL(FUNCTION_VERSION),
    )


#: Marks the function's current text: an older one is replaced (owner and grants kept).
FUNCTION_VERSION: Final = "auditq partition function, version 3"


def install_function(conn: psycopg.Connection[object], schema: str) -> None:
    """Create the function if missing, or replace an older version of it; nobody but its
    owner may execute it until granted."""
    if function_exists(conn, schema, f"{FUNCTION}(text,timestamptz)"):
        current = conn.execute(
            "SELECT 1 FROM pg_proc WHERE oid = %s::regprocedure AND position(%s in prosrc) > 0",
            (f"{regclass_text(schema, FUNCTION)}(text,timestamptz)", FUNCTION_VERSION),
        ).fetchone()
        if current is None:
            conn.execute(function_ddl(schema))  # CREATE OR REPLACE keeps owner and grants
        return
    conn.execute(function_ddl(schema))
    conn.execute(
        sql.SQL("REVOKE ALL ON FUNCTION {}.{}(text, timestamptz) FROM PUBLIC").format(
            sql.Identifier(schema), sql.Identifier(FUNCTION)
        )
    )


def ensure_partition_sql(schema: str, table: str) -> sql.Composed:
    """`SELECT <schema>.auditq_ensure_partition('<table>', %s)`: run it with a timestamptz
    (any instant of the month wanted) to create that month if it is missing. Returns the
    partition's name, or NULL when a wider partition already holds the month."""
    return sql.SQL("SELECT {}.{}({}, %s)").format(
        sql.Identifier(schema), sql.Identifier(FUNCTION), sql.Literal(table)
    )


def month_start(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def add_months(moment: datetime, months: int) -> datetime:
    """The first instant of the month `months` after `moment`'s month (UTC)."""
    index = moment.year * 12 + moment.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def months_of(rows: Iterable[bytes]) -> list[datetime]:
    """The distinct months (their first instant, UTC) of encoded COPY tuples' occurred_at."""
    seen: set[datetime] = set()
    for data in rows:
        (micros,) = _MICROS.unpack_from(data, OCCURRED_AT_OFFSET)
        seen.add(month_start(_PG_EPOCH + timedelta(microseconds=micros)))
    return sorted(seen)


def ensure_months(
    conn: psycopg.Connection[Any], schema: str, table: str, months: Iterable[datetime]
) -> None:
    """Create the partitions for `months` (in their own transaction)."""
    statement = ensure_partition_sql(schema, table)
    with conn.transaction():
        for month in months:
            conn.execute(statement, (month,))


def create_ahead(
    conn: psycopg.Connection[Any],
    schema: str,
    table: str,
    ahead: int,
    now: datetime | None = None,
) -> None:
    """The current month and `ahead` months after it."""
    start = month_start(now or datetime.now(UTC))
    ensure_months(conn, schema, table, [add_months(start, n) for n in range(ahead + 1)])


@dataclass(frozen=True)
class Partition:
    name: str
    range_from: datetime | None  # None: MINVALUE (a converted table's old rows)
    range_to: datetime | None  # None: MAXVALUE
    rows: int
    estimated: bool
    total_bytes: int


def is_partitioned(conn: psycopg.Connection[Any], schema: str, table: str) -> bool:
    row = conn.execute(
        "SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass(%s)",
        (regclass_text(schema, table),),
    ).fetchone()
    return bool(row and row[0])


def list_partitions(
    conn: psycopg.Connection[Any], schema: str, table: str, *, exact: bool = True
) -> list[Partition]:
    """The table's partitions, oldest first, with row counts (exact, or the planner's
    estimate) and sizes (table, indexes and TOAST)."""
    found = conn.execute(
        """SELECT n.nspname, c.relname, c.reltuples, pg_total_relation_size(c.oid),
                  pg_get_expr(c.relpartbound, c.oid)
           FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE i.inhparent = to_regclass(%s)""",
        (regclass_text(schema, table),),
    ).fetchall()
    result = []
    for part_schema, name, reltuples, size, bound in found:
        lo, hi = _parse_bound(conn, str(bound))
        if exact:
            counted = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(qualified(part_schema, name))
            ).fetchone()
            rows, estimated = (int(counted[0]) if counted else 0), False
        else:
            rows, estimated = max(0, int(reltuples)), True
        result.append(Partition(str(name), lo, hi, rows, estimated, int(size)))
    result.sort(key=lambda p: (p.range_from is not None, p.range_from or _PG_EPOCH))
    return result


def _parse_bound(
    conn: psycopg.Connection[Any], bound: str
) -> tuple[datetime | None, datetime | None]:
    """`FOR VALUES FROM ('...') TO ('...')` -> the two instants (None for MINVALUE/MAXVALUE)."""
    if not bound.startswith("FOR VALUES FROM ("):
        return None, None  # DEFAULT
    inner = bound[len("FOR VALUES FROM (") :]
    lo_text, _, rest = inner.partition(") TO (")
    hi_text = rest.rstrip(")")

    def value(text: str) -> datetime | None:
        if text.upper() in ("MINVALUE", "MAXVALUE"):
            return None
        row = conn.execute("SELECT %s::timestamptz", (text.strip("'"),)).fetchone()
        assert row is not None
        stamp: datetime = row[0]
        return stamp.astimezone(UTC)

    return value(lo_text), value(hi_text)
