"""`auditq init-db --distributed`: the DDL that distributes the audit table over a Citus
cluster by tenant, as a script to review and run on the coordinator.

What Citus needs, and why each line is there:
  * `tenant_id NOT NULL`: Citus refuses to route a row whose distribution column is NULL
    (events without a tenant need a sentinel tenant, e.g. "system").
  * every unique key includes tenant_id: Citus enforces uniqueness only then, so the
    primary key is (tenant_id, id) — (tenant_id, id, occurred_at) when also partitioned.
    The writer's idempotent replay uses `ON CONFLICT DO NOTHING` without a target, so it
    needs no change.
  * row guards only: Citus distributes row triggers when `citus.enable_unsafe_triggers`
    is on, but statement triggers are not supported on distributed tables, and Citus
    installs a TRUNCATE trigger of its own. TRUNCATE is therefore refused by grants:
    nobody but the owner holds it.
  * no sequences: ids are UUIDv7 made by the client, so the writer needs nothing else.
  * the hash chain's columns go on the distributed table; its digests, checkpoints and
    retention records are ordinary tables on the coordinator (a chained writer inserts a
    digest in the same transaction as its COPY). Chaining on a Citus cluster is untested
    here: only vanilla PostgreSQL is at hand.
The script is plain text (no connection needed); tests run it on vanilla PostgreSQL
against stand-ins for the two Citus functions and check the resulting catalog.
"""

from __future__ import annotations

from psycopg import sql

from . import guards
from .chain_schema import chain_ddl
from .partitions import FUNCTION as PARTITION_FUNCTION
from .partitions import function_ddl as partition_function_ddl
from .roles import RoleNames
from .tables import (
    RETENTION_TABLE,
    SCHEMA_VERSION,
    VERSION_TABLE,
    Layout,
    meta_ddl,
    qualified,
    table_ddl,
)


def _text(statement: sql.Composable) -> str:
    return statement.as_string(None).strip() + ";"


def script(
    schema: str,
    table: str,
    *,
    partitioned: bool = False,
    ahead: int = 3,
    roles: RoleNames | None = None,
) -> str:
    """The whole script, one statement per paragraph."""
    layout: Layout = "distributed-partitioned" if partitioned else "distributed"
    target = qualified(schema, table)
    s = sql.Identifier(schema)
    row_trigger = sql.Identifier(guards.ROW_TRIGGER)
    out: list[str] = [
        f"-- auditq init-db --distributed{' --partitioned' if partitioned else ''}: "
        "run on the Citus coordinator (psql -v ON_ERROR_STOP=1 -f ...).",
        "BEGIN;",
    ]
    out.append(_text(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s)))
    out.append(_text(guards.function_ddl(schema)))
    for statement in meta_ddl(schema):
        out.append(_text(statement))
    for statement in table_ddl(schema, table, layout)[1:]:
        out.append(_text(statement))
    out.append(
        "-- The hash chain (schema version 3): two columns and an index on the audit table;"
        "\n-- its digests, checkpoints and retention records stay on the coordinator."
    )
    for statement in chain_ddl(schema, table):
        out.append(_text(statement))
    out.append(
        "-- The bookkeeping tables are small and read with the audit table: reference tables."
    )
    for meta in (VERSION_TABLE, RETENTION_TABLE):
        out.append(
            _text(
                sql.SQL("SELECT create_reference_table({})").format(
                    sql.Literal(qualified(schema, meta).as_string(None))
                )
            )
        )
    out.append(
        _text(
            sql.SQL("SELECT create_distributed_table({}, 'tenant_id')").format(
                sql.Literal(target.as_string(None))
            )
        )
    )
    out.append("-- Row guards on distributed tables need Citus's trigger support.")
    out.append("SET LOCAL citus.enable_unsafe_triggers = on;")
    for meta in (VERSION_TABLE, RETENTION_TABLE, table):
        relation = qualified(schema, meta)
        out.append(
            _text(
                sql.SQL(
                    "CREATE TRIGGER {} BEFORE UPDATE OR DELETE ON {} "
                    "FOR EACH ROW EXECUTE FUNCTION {}.{}()"
                ).format(row_trigger, relation, s, sql.Identifier(guards.FUNCTION))
            )
        )
        out.append(
            _text(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(relation, row_trigger))
        )
        out.append(
            _text(
                sql.SQL(
                    "REVOKE UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON {} FROM PUBLIC"
                ).format(relation)
            )
        )
    if partitioned:
        out.append(_text(partition_function_ddl(schema)))
        out.append(
            _text(
                sql.SQL("REVOKE ALL ON FUNCTION {}.{}(text, timestamptz) FROM PUBLIC").format(
                    s, sql.Identifier(PARTITION_FUNCTION)
                )
            )
        )
        out.append(
            _text(
                sql.SQL(
                    "SELECT create_time_partitions(table_name := {}, "
                    "partition_interval := '1 month', end_at := date_trunc('month', now()) "
                    "+ {}::interval)"
                ).format(sql.Literal(target.as_string(None)), sql.Literal(f"{ahead + 1} months"))
            )
        )
    out.append(
        _text(
            sql.SQL(
                "INSERT INTO {} (table_name, version, layout, note) VALUES ({}, {}, {}, {})"
            ).format(
                qualified(schema, VERSION_TABLE),
                sql.Literal(table),
                sql.Literal(SCHEMA_VERSION),
                sql.Literal(layout),
                sql.Literal("created by auditq init-db --distributed"),
            )
        )
    )
    if roles is not None:
        out.extend(_role_lines(schema, table, roles, partitioned))
    out.append("COMMIT;")
    out.append(
        "-- Check on every shard that the guards fire always (tgenabled = 'A'):\n"
        "-- SELECT * FROM run_command_on_shards("
        + sql.Literal(target.as_string(None)).as_string(None)
        + ", $$SELECT tgenabled FROM pg_trigger WHERE tgrelid = '%s'::regclass "
        "AND tgname = 'auditq_append_only'$$);"
    )
    return "\n\n".join(out) + "\n"


def _role_lines(schema: str, table: str, roles: RoleNames, partitioned: bool) -> list[str]:
    owner, writer, reader = (sql.Identifier(n) for n in (roles.owner, roles.writer, roles.reader))
    s = sql.Identifier(schema)
    target = qualified(schema, table)
    lines = [
        "-- Roles: create them first if they do not exist (see docs/audit-trail.md):",
        _text(sql.SQL("-- CREATE ROLE {} NOLOGIN").format(owner)),
        _text(sql.SQL("-- CREATE ROLE {} NOLOGIN BYPASSRLS").format(writer)),
        _text(sql.SQL("-- CREATE ROLE {} NOLOGIN").format(reader)),
    ]
    for relation in (target, qualified(schema, VERSION_TABLE), qualified(schema, RETENTION_TABLE)):
        lines.append(_text(sql.SQL("ALTER TABLE {} OWNER TO {}").format(relation, owner)))
        lines.append(_text(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(relation)))
    lines.append(
        _text(
            sql.SQL("ALTER FUNCTION {}.{}() OWNER TO {}").format(
                s, sql.Identifier(guards.FUNCTION), owner
            )
        )
    )
    lines.append(_text(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}, {}").format(s, writer, reader)))
    lines.append(_text(sql.SQL("GRANT INSERT, SELECT ON {} TO {}").format(target, writer)))
    lines.append(_text(sql.SQL("GRANT SELECT ON {} TO {}").format(target, reader)))
    lines.append(
        _text(
            sql.SQL("GRANT SELECT ON {} TO {}, {}").format(
                qualified(schema, VERSION_TABLE), writer, reader
            )
        )
    )
    if partitioned:
        function = sql.SQL("{}.auditq_ensure_partition(text, timestamptz)").format(s)
        lines.append(_text(sql.SQL("ALTER FUNCTION {} OWNER TO {}").format(function, owner)))
        lines.append(_text(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(function, writer)))
    lines.append(_text(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(target)))
    lines.append(
        _text(
            sql.SQL(
                "CREATE POLICY auditq_tenant_read ON {} AS PERMISSIVE FOR SELECT TO {} "
                "USING (tenant_id = nullif(current_setting('auditq.tenant', true), ''))"
            ).format(target, reader)
        )
    )
    lines.append(
        "-- Citus forwards the auditq.tenant setting to the workers only with\n"
        "-- citus.propagate_set_commands = 'local' and SET LOCAL inside a transaction."
    )
    return lines
