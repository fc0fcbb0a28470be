"""`auditq migrate`: bring an existing audit table to the current shape, in place.

Version 1 -> 2 (idempotent; each step is skipped when already done):
  * `origin text` appended (metadata only: no rewrite);
  * the outcome vocabulary CHECK dropped, a length CHECK added NOT VALID and then
    validated (the validation scans the table under SHARE UPDATE EXCLUSIVE, which lets
    writers go on);
  * append-only guards on the table and every partition;
  * the roles, when asked for.
Version 2 -> 3: the hash chain (docs/tamper-evidence.md): the nullable `chain_stream` and
`chain_pos` columns (metadata only), their index (CONCURRENTLY on a plain table; on a
partitioned one, which cannot take CONCURRENTLY, under SHARE on each partition: writers
wait for the build), and the digests, checkpoints and retention tables with their
append-only guards. Rows written before stay unchained and valid.
Each DDL statement waits at most `lock_timeout` for its lock, so a long-running query on
the table makes the migration fail with a clear message instead of queueing every writer
behind it.

`to_partitioned()` converts a plain table to monthly partitions; see its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from psycopg import sql

from . import chain_schema, guards, partitions
from .roles import RoleNames
from .roles import apply as apply_roles
from .tables import (
    OUTCOME_CHECK,
    OUTCOME_MAX_CHARS,
    SCHEMA_VERSION,
    _index_name,
    ensure_meta,
    lock,
    qualified,
    record_version,
    recorded,
    regclass_text,
    short_name,
)

LOCK_TIMEOUT: Final = "5s"
#: The CHECK that lets ATTACH skip scanning a converted table.
BOUNDARY_CHECK: Final = "auditq_before_boundary"


class MigrateError(RuntimeError):
    """Why a migration stopped; one line."""


@dataclass
class Report:
    """What a migration did (empty `steps`: nothing to do)."""

    steps: list[str] = field(default_factory=list)


def _relid(conn: psycopg.Connection[Any], schema: str, table: str) -> int:
    row = conn.execute("SELECT to_regclass(%s)::oid", (regclass_text(schema, table),)).fetchone()
    if row is None or row[0] is None:
        raise MigrateError(
            f"{schema}.{table} does not exist: create it with `auditq init-db` instead"
        )
    return int(row[0])


def _layout(conn: psycopg.Connection[Any], schema: str, table: str) -> str:
    return "partitioned" if partitions.is_partitioned(conn, schema, table) else "plain"


def _set_timeouts(conn: psycopg.Connection[Any]) -> None:
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))


def migrate(
    conn: psycopg.Connection[Any],
    schema: str,
    table: str,
    *,
    roles: RoleNames | None = None,
) -> Report:
    """Bring `schema.table` to SCHEMA_VERSION; `conn` must be in autocommit mode (the
    validation runs in a transaction of its own)."""
    report = Report()
    _set_timeouts(conn)
    target = qualified(schema, table)
    with conn.transaction():
        ensure_meta(conn, schema)
        lock(conn, f"{schema}.{table}")
        relid = _relid(conn, schema, table)
        state = recorded(conn, schema, table)
        columns = {
            str(r[0])
            for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
                "AND NOT attisdropped",
                (relid,),
            ).fetchall()
        }
        if "origin" not in columns:
            conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN origin text").format(target))
            report.steps.append("added column origin")
        vocabulary = conn.execute(
            """SELECT conname FROM pg_constraint
               WHERE conrelid = %s AND contype = 'c' AND conislocal
                 AND conkey = ARRAY[(SELECT attnum FROM pg_attribute
                                      WHERE attrelid = %s AND attname = 'outcome')]::int2[]
                 AND pg_get_constraintdef(oid) LIKE '%%''success''%%'""",
            (relid, relid),
        ).fetchall()
        for (name,) in vocabulary:
            conn.execute(
                sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(target, sql.Identifier(name))
            )
            report.steps.append(f"dropped the outcome vocabulary CHECK {name}")
        has_length = conn.execute(
            "SELECT convalidated FROM pg_constraint WHERE conrelid = %s AND conname = %s",
            (relid, OUTCOME_CHECK),
        ).fetchone()
        if has_length is None:
            conn.execute(
                sql.SQL(
                    "ALTER TABLE {} ADD CONSTRAINT {} CHECK (char_length(outcome) <= {}) NOT VALID"
                ).format(target, sql.Identifier(OUTCOME_CHECK), sql.Literal(OUTCOME_MAX_CHARS))
            )
            report.steps.append(
                f"added CHECK {OUTCOME_CHECK} (outcome at most {OUTCOME_MAX_CHARS} characters)"
            )
        missing_guards = guards.unguarded(conn, schema, table)
        if missing_guards:
            guards.install(conn, schema, table)
            report.steps.append(
                f"installed append-only guards ({len(missing_guards)} were missing)"
            )
        if partitions.is_partitioned(conn, schema, table):
            partitions.install_function(conn, schema)
        missing_chain = chain_schema.missing_pieces(conn, schema, table)
        # A plain table's index is built CONCURRENTLY below (writers go on); a partitioned
        # parent cannot take CONCURRENTLY, so its partitions are indexed here.
        plain = not partitions.is_partitioned(conn, schema, table)
        if missing_chain:
            chain_schema.create_chain_tables(conn, schema, table, index=not plain)
            report.steps.append(f"added the hash chain: {', '.join(missing_chain)}")
    if missing_chain and plain:
        _chain_index_concurrently(conn, schema, table)
    if has_length is None or not has_length[0]:
        with conn.transaction():
            conn.execute(
                sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
                    target, sql.Identifier(OUTCOME_CHECK)
                )
            )
    with conn.transaction():
        if roles is not None:
            apply_roles(conn, schema, table, roles)
            named = ", ".join(f"{name} ({kind})" for kind, name in roles.kinds())
            report.steps.append(f"roles {named} applied")
        if state is None or state[0] < SCHEMA_VERSION:
            record_version(
                conn,
                schema,
                table,
                _layout(conn, schema, table),
                f"auditq migrate from version {1 if state is None else state[0]}",
            )
            report.steps.append(f"recorded schema version {SCHEMA_VERSION}")
    return report


def _chain_index_concurrently(conn: psycopg.Connection[Any], schema: str, table: str) -> None:
    """Build the (chain_stream, chain_pos) index without blocking writers; an invalid one
    left by a failed earlier build is dropped first."""
    name = chain_schema.chain_index(table)
    valid = conn.execute(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
        (regclass_text(schema, name),),
    ).fetchone()
    if valid is not None and not valid[0]:
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY {}").format(qualified(schema, name)))
    conn.execute(chain_schema.index_sql(schema, table, concurrently=True))


def _boundary(conn: psycopg.Connection[Any], schema: str, table: str, now: datetime) -> datetime:
    """Where the converted table's range ends and monthly partitions begin: the start of
    the month after next, or later if rows already lie beyond it."""
    boundary = partitions.add_months(partitions.month_start(now), 2)
    row = conn.execute(
        sql.SQL("SELECT max(occurred_at) FROM {}").format(qualified(schema, table))
    ).fetchone()
    if row and row[0] is not None:
        latest = partitions.add_months(partitions.month_start(row[0]), 1)
        boundary = max(boundary, latest)
    return boundary


def to_partitioned(
    conn: psycopg.Connection[Any],
    schema: str,
    table: str,
    *,
    ahead: int = 3,
    now: datetime | None = None,
) -> Report:
    """Convert the plain table `schema.table` into a monthly partitioned one, in place.

    PostgreSQL cannot turn a table into a partitioned one, so the existing table becomes
    the first partition (`<table>_legacy`, FROM MINVALUE TO the boundary: the start of the
    month after next, or after its newest row) under a new partitioned parent with the old
    name; months from the boundary on are new partitions. Rows are not copied.

    Locks, in order (`conn` must be in autocommit mode):
      1. CREATE UNIQUE INDEX CONCURRENTLY on (id, occurred_at): writers go on;
      2. ADD CONSTRAINT ... CHECK (occurred_at < boundary) NOT VALID (a brief ACCESS
         EXCLUSIVE), then VALIDATE (SHARE UPDATE EXCLUSIVE: writers go on) — while this
         CHECK stands, a row dated at or after the boundary (two months ahead at least) is
         refused and dead-lettered with the reason;
      3. one short transaction under ACCESS EXCLUSIVE on the table: rename it, create the
         parent, ATTACH it (no scan: the CHECK proves the range), move grants, policies and
         guards to the parent. Writers wait for this step only (bounded by lock_timeout);
         their next COPY goes to the parent by name.
    The old table's primary key becomes (id, occurred_at), like every partition's. Views
    or foreign keys that referenced the table follow it to `<table>_legacy`: recreate
    them on the parent.
    """
    report = Report()
    report.steps.extend(migrate(conn, schema, table).steps)
    if partitions.is_partitioned(conn, schema, table):
        return report
    _set_timeouts(conn)
    target = qualified(schema, table)
    legacy = short_name(table, "_legacy")
    if conn.execute("SELECT to_regclass(%s)", (regclass_text(schema, legacy),)).fetchone() != (
        None,
    ):
        raise MigrateError(f"{schema}.{legacy} exists already: rename or drop it first")
    unique = short_name(table, "_id_occurred_key")
    valid = conn.execute(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
        (regclass_text(schema, unique),),
    ).fetchone()
    if valid is not None and not valid[0]:
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY {}").format(qualified(schema, unique)))
        valid = None
    if valid is None:
        conn.execute(
            sql.SQL("CREATE UNIQUE INDEX CONCURRENTLY {} ON {} (id, occurred_at)").format(
                sql.Identifier(unique), target
            )
        )
        report.steps.append("built the (id, occurred_at) unique index concurrently")
    boundary = _boundary(conn, schema, table, now or datetime.now(UTC))
    with conn.transaction():
        conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
                target, sql.Identifier(BOUNDARY_CHECK)
            )
        )
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK (occurred_at < {}) NOT VALID").format(
                target, sql.Identifier(BOUNDARY_CHECK), sql.Literal(boundary)
            )
        )
    with conn.transaction():
        conn.execute(
            sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
                target, sql.Identifier(BOUNDARY_CHECK)
            )
        )
    with conn.transaction():
        _swap(conn, schema, table, legacy, unique, boundary)
    report.steps.append(
        f"converted to monthly partitions: old rows in {schema}.{legacy} (up to "
        f"{boundary:%Y-%m-%d}), new months from there"
    )
    with conn.transaction():
        partitions.ensure_months(
            conn,
            schema,
            table,
            [partitions.add_months(boundary, n) for n in range(ahead + 1)],
        )
    return report


def _swap(
    conn: psycopg.Connection[Any],
    schema: str,
    table: str,
    legacy: str,
    unique: str,
    boundary: datetime,
) -> None:
    target = qualified(schema, table)
    old = qualified(schema, legacy)
    lock(conn, f"{schema}.{table}")
    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(target))
    info = conn.execute(
        """SELECT c.oid, pg_get_userbyid(c.relowner), c.relrowsecurity, c.relforcerowsecurity
           FROM pg_class c WHERE c.oid = %s::regclass""",
        (regclass_text(schema, table),),
    ).fetchone()
    assert info is not None
    relid, owner, rls, force_rls = info
    acl = conn.execute(
        """SELECT coalesce(r.rolname, ''), a.privilege_type
           FROM pg_class c, aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
           WHERE c.oid = %s AND a.grantee <> c.relowner""",
        (relid,),
    ).fetchall()
    policies = conn.execute(
        """SELECT policyname, permissive, roles::text[], cmd, qual, with_check
           FROM pg_policies WHERE schemaname = %s AND tablename = %s""",
        (schema, table),
    ).fetchall()
    # Index names are unique per schema: the old ones make way for the parent's.
    for index, suffix in (
        (f"{table}_pkey", "_legacy_pkey"),
        (_index_name(table), "_legacy_tenant_idx"),
        (chain_schema.chain_index(table), "_legacy_chain_idx"),
    ):
        if conn.execute("SELECT to_regclass(%s)", (regclass_text(schema, index),)).fetchone() != (
            None,
        ):
            conn.execute(
                sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                    qualified(schema, index), sql.Identifier(short_name(table, suffix))
                )
            )
    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(target, sql.Identifier(legacy)))
    # The parent's row guard is cloned onto the old table when it is attached: its own
    # row guard (same name) goes first; its TRUNCATE guard stays (those are not cloned).
    conn.execute(
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(guards.ROW_TRIGGER), old)
    )
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
            "PARTITION BY RANGE (occurred_at)"
        ).format(target, old)
    )
    conn.execute(
        sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
            target, sql.Identifier(BOUNDARY_CHECK)
        )
    )
    conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id, occurred_at)").format(target))
    # The parent's key attaches only to a partition index that backs a constraint: the
    # concurrently built (id, occurred_at) index becomes the old table's primary key in
    # place of the one on id (no scan: both columns are NOT NULL already).
    old_key = conn.execute(
        "SELECT conname FROM pg_constraint WHERE conrelid = %s AND contype = 'p'", (relid,)
    ).fetchone()
    conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN id SET NOT NULL").format(old))
    if old_key is not None:
        conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(old, sql.Identifier(old_key[0]))
        )
    conn.execute(
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY USING INDEX {}").format(
            old, sql.Identifier(short_name(table, "_legacy_pkey")), sql.Identifier(unique)
        )
    )
    conn.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM (MINVALUE) TO ({})").format(
            target, old, sql.Literal(boundary)
        )
    )
    conn.execute(
        sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(old, sql.Identifier(BOUNDARY_CHECK))
    )
    # Attaches the old table's matching index instead of building one.
    conn.execute(
        sql.SQL("CREATE INDEX {} ON {} (tenant_id, occurred_at)").format(
            sql.Identifier(_index_name(table)), target
        )
    )
    conn.execute(
        sql.SQL("CREATE INDEX {} ON {} USING brin (chain_stream, chain_pos)").format(
            sql.Identifier(chain_schema.chain_index(table)), target
        )
    )
    conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(target, sql.Identifier(owner)))
    for grantee, privilege in acl:
        role: sql.Composable = sql.SQL("PUBLIC") if grantee == "" else sql.Identifier(grantee)
        conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(privilege), target, role))
        conn.execute(sql.SQL("REVOKE {} ON {} FROM {}").format(sql.SQL(privilege), old, role))
    if rls:
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(target))
    if force_rls:
        conn.execute(sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(target))
    for name, permissive, roles, cmd, qual, with_check in policies:
        statement = sql.SQL("CREATE POLICY {} ON {} AS {} FOR {} TO {}").format(
            sql.Identifier(name),
            target,
            sql.SQL(permissive),
            sql.SQL(cmd),
            sql.SQL(", ").join(
                sql.SQL("PUBLIC") if r == "public" else sql.Identifier(r) for r in roles
            ),
        )
        if qual is not None:
            statement = sql.SQL("{} USING ({})").format(statement, sql.SQL(qual))
        if with_check is not None:
            statement = sql.SQL("{} WITH CHECK ({})").format(statement, sql.SQL(with_check))
        conn.execute(statement)
    record_version(
        conn,
        schema,
        table,
        "partitioned",
        f"auditq migrate --to-partitioned: old rows in {legacy} up to {boundary.isoformat()}",
    )
    partitions.install_function(conn, schema)
    guards.install(conn, schema, table)
    # The partition function runs as its owner: the table's owner must own it too.
    conn.execute(
        sql.SQL("ALTER FUNCTION {}.{}(text, timestamptz) OWNER TO {}").format(
            sql.Identifier(schema), sql.Identifier(partitions.FUNCTION), sql.Identifier(owner)
        )
    )
    for grantee, privilege in acl:
        if privilege == "INSERT" and grantee:
            conn.execute(
                sql.SQL("GRANT EXECUTE ON FUNCTION {}.{}(text, timestamptz) TO {}").format(
                    sql.Identifier(schema),
                    sql.Identifier(partitions.FUNCTION),
                    sql.Identifier(grantee),
                )
            )
