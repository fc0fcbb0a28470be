"""Append-only guards: triggers that refuse UPDATE, DELETE and TRUNCATE of audit rows.

Grants decide who may try; the guards make sure nobody but the owner (who can drop them)
succeeds, even a role someone later grants UPDATE to by mistake. They are set `ENABLE
ALWAYS`, so `session_replication_role = replica` does not silence them, and they consult
no session setting: a switch any session could flip would also be the tamper path.

There is deliberately no BEFORE INSERT trigger: any row-level INSERT trigger makes COPY
insert row at a time instead of in multi-row batches.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg
from psycopg import sql

from .regclass import regclass_text

#: The trigger function, one per schema.
FUNCTION: Final = "auditq_refuse_change"
#: BEFORE UPDATE OR DELETE, FOR EACH ROW: cloned by PostgreSQL to every partition.
ROW_TRIGGER: Final = "auditq_append_only"
#: BEFORE TRUNCATE, FOR EACH STATEMENT: statement triggers are not cloned, so each
#: partition gets its own (TRUNCATE of a partition fires only that partition's triggers).
TRUNCATE_TRIGGER: Final = "auditq_no_truncate"


def function_ddl(schema: str) -> sql.Composed:
    """The trigger function that refuses the change, naming the table and the operation."""
    return sql.SQL(
        """CREATE OR REPLACE FUNCTION {}.{}() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $auditq$
BEGIN
    RAISE EXCEPTION 'auditq: %.% is append-only: % refused',
            TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'audit rows are never changed; '
                     'whole partitions are dropped by auditq retention';
END
$auditq$"""
    ).format(sql.Identifier(schema), sql.Identifier(FUNCTION))


def tree(
    conn: psycopg.Connection[Any], schema: str, table: str
) -> list[tuple[int, str, str, bool]]:
    """(oid, schema, name, is_root) of the table and everything partitioned under it, root
    first. (`pg_partition_tree` alone lists nothing for a table that is not partitioned.)"""
    rows = conn.execute(
        """SELECT c.oid, n.nspname, c.relname, c.oid = r.oid
           FROM (SELECT %s::regclass::oid AS oid) r
           JOIN pg_class c ON c.oid = r.oid
                OR c.oid IN (SELECT relid FROM pg_partition_tree(r.oid::regclass))
           JOIN pg_namespace n ON n.oid = c.relnamespace
           ORDER BY c.oid <> r.oid, c.relname""",
        (regclass_text(schema, table),),
    ).fetchall()
    return [(int(a), str(b), str(c), bool(d)) for a, b, c, d in rows]


def _triggers(conn: psycopg.Connection[Any], relid: int) -> dict[str, str]:
    rows = conn.execute(
        "SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = %s AND tgname = ANY(%s)",
        (relid, [ROW_TRIGGER, TRUNCATE_TRIGGER]),
    ).fetchall()
    return {str(name): str(enabled) for name, enabled in rows}


def install(
    conn: psycopg.Connection[Any],
    schema: str,
    table: str,
    *,
    truncate_trigger: bool = True,
) -> None:
    """Guard `schema.table` and, when it is partitioned, every partition under it.

    Idempotent: creates only the triggers that are missing and sets `ENABLE ALWAYS` only
    where it is not set, so a second run takes no lock beyond the catalog lookups.
    `truncate_trigger=False` is for Citus tables, which take no statement triggers
    (TRUNCATE is refused by grants there)."""
    function = sql.SQL("{}.{}()").format(sql.Identifier(schema), sql.Identifier(FUNCTION))
    for relid, rel_schema, rel_name, is_root in tree(conn, schema, table):
        target = sql.SQL("{}.{}").format(sql.Identifier(rel_schema), sql.Identifier(rel_name))
        present = _triggers(conn, relid)
        if is_root and ROW_TRIGGER not in present:
            # On a partitioned root this is cloned to existing and future partitions.
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER {} BEFORE UPDATE OR DELETE ON {} "
                    "FOR EACH ROW EXECUTE FUNCTION {}"
                ).format(sql.Identifier(ROW_TRIGGER), target, function)
            )
        if truncate_trigger and TRUNCATE_TRIGGER not in present:
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER {} BEFORE TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}"
                ).format(sql.Identifier(TRUNCATE_TRIGGER), target, function)
            )
        present = _triggers(conn, relid)
        for name, enabled in sorted(present.items()):
            if enabled != "A":
                conn.execute(
                    sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(
                        target, sql.Identifier(name)
                    )
                )


def unguarded(
    conn: psycopg.Connection[Any], schema: str, table: str, *, truncate_trigger: bool = True
) -> list[str]:
    """Relations of `schema.table` (itself and its partitions) missing a guard or with one
    not set to fire always, as `schema.name: what` lines; empty when all are guarded."""
    wanted = [ROW_TRIGGER, TRUNCATE_TRIGGER] if truncate_trigger else [ROW_TRIGGER]
    problems = []
    for relid, rel_schema, rel_name, _ in tree(conn, schema, table):
        present = _triggers(conn, relid)
        for name in wanted:
            enabled = present.get(name)
            if enabled is None:
                problems.append(f"{rel_schema}.{rel_name}: no {name} trigger")
            elif enabled != "A":
                problems.append(f"{rel_schema}.{rel_name}: {name} is not ENABLE ALWAYS ({enabled})")
    return problems
