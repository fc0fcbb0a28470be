"""`init-db --distributed`: the Citus DDL, checked on vanilla PostgreSQL by running it against
stand-ins for the Citus functions and reading the catalog it leaves."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from psycopg import sql

from auditq import AuditWriter
from auditq.chain_schema import checkpoints_table, digests_table, retention_table
from auditq.cli import main
from auditq.distributed import script
from auditq.partitions import ensure_partition_sql, list_partitions
from auditq.roles import RoleNames
from auditq.schema import qualified

from .trail_support import Trail, trail

#: What the script calls in Citus, recorded instead of done.
STAND_INS = """
CREATE TABLE {schema}.citus_calls (fn text, args text[]);
CREATE FUNCTION {schema}.qualified_name(rel regclass) RETURNS text
LANGUAGE sql AS $$ SELECT n.nspname || '.' || c.relname FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel $$;
CREATE FUNCTION {schema}.create_distributed_table(rel regclass, col text) RETURNS void
LANGUAGE sql AS $$ INSERT INTO {schema}.citus_calls
    VALUES ('distributed', ARRAY[{schema}.qualified_name(rel), col]) $$;
CREATE FUNCTION {schema}.create_reference_table(rel regclass) RETURNS void
LANGUAGE sql AS $$ INSERT INTO {schema}.citus_calls
    VALUES ('reference', ARRAY[{schema}.qualified_name(rel)]) $$;
CREATE FUNCTION {schema}.create_time_partitions(table_name regclass, partition_interval interval,
    end_at timestamptz) RETURNS boolean
LANGUAGE sql AS $$ INSERT INTO {schema}.citus_calls VALUES ('time_partitions',
    ARRAY[{schema}.qualified_name(table_name), partition_interval::text]) RETURNING true $$;
"""


@pytest.fixture(params=[False, True], ids=["plain", "partitioned"])
def distributed(request: pytest.FixtureRequest, pg_dsn: str) -> Iterator[Trail]:
    with trail(pg_dsn) as made:
        with made.connect() as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(made.schema)))
            conn.execute(sql.SQL(STAND_INS).format(schema=sql.Identifier(made.schema)))  # type: ignore[arg-type]
            conn.execute(
                sql.SQL("SET search_path = {}, public").format(sql.Identifier(made.schema))
            )
            conn.execute(script(made.schema, made.table, partitioned=request.param))  # type: ignore[arg-type]
        made.partitioned = request.param  # type: ignore[attr-defined]
        yield made


def test_citus_is_asked_to_distribute_by_tenant(distributed: Trail) -> None:
    calls = distributed.run("SELECT fn, args FROM {schema}.citus_calls ORDER BY fn")
    target = f"{distributed.schema}.{distributed.table}"
    assert ("distributed", [target, "tenant_id"]) in calls
    assert {fn for fn, _ in calls} >= {"distributed", "reference"}
    if distributed.partitioned:  # type: ignore[attr-defined]
        assert ("time_partitions", [target, "1 mon"]) in calls


def test_tenant_id_is_not_null_and_in_every_unique_key(distributed: Trail) -> None:
    regclass = f'"{distributed.schema}"."{distributed.table}"'
    assert distributed.run(
        "SELECT attnotnull FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attname = 'tenant_id'",
        regclass,
    ) == [(True,)]
    keys = distributed.run(
        "SELECT i.indexrelid::regclass::text, "
        "  bool_or(a.attname = 'tenant_id') FROM pg_index i "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = %s::regclass AND i.indisunique GROUP BY 1",
        regclass,
    )
    assert keys and all(has_tenant for _, has_tenant in keys), keys
    expected = (
        ["tenant_id", "id", "occurred_at"] if distributed.partitioned else ["tenant_id", "id"]
    )  # type: ignore[attr-defined]
    assert distributed.run(
        "SELECT array_agg(a.attname::text ORDER BY k.n) FROM pg_index i, "
        "unnest(i.indkey) WITH ORDINALITY k(attnum, n) "
        "JOIN pg_attribute a ON a.attnum = k.attnum "
        "WHERE i.indrelid = %s::regclass AND a.attrelid = i.indrelid AND i.indisprimary",
        regclass,
    ) == [(expected,)]


def test_row_guards_only_and_truncate_refused_by_grants(distributed: Trail) -> None:
    regclass = f'"{distributed.schema}"."{distributed.table}"'
    triggers = distributed.run(
        "SELECT tgname, tgtype, tgenabled FROM pg_trigger WHERE tgrelid = %s::regclass "
        "AND NOT tgisinternal",
        regclass,
    )
    row_bit = 1  # TRIGGER_TYPE_ROW
    assert triggers == [("auditq_append_only", triggers[0][1], "A")]
    assert triggers[0][1] & row_bit
    statement_triggers = distributed.run(
        "SELECT c.relname::text FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND g.tgtype & 1 = 0 AND NOT g.tgisinternal ORDER BY 1",
        distributed.schema,
    )
    # Only the chain's own tables, which stay ordinary tables on the coordinator, have
    # statement (TRUNCATE) triggers; no distributed or reference table has one.
    chain_tables = sorted(
        (
            digests_table(distributed.table),
            checkpoints_table(distributed.table),
            retention_table(distributed.table),
        )
    )
    assert [row[0] for row in statement_triggers] == chain_tables
    assert distributed.run(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = %s "
        "AND table_name = %s AND column_name IN ('chain_stream', 'chain_pos')",
        distributed.schema,
        distributed.table,
    ) == [(2,)]
    truncaters = distributed.run(
        "SELECT a.grantee FROM pg_class c, aclexplode(coalesce(c.relacl, "
        "acldefault('r', c.relowner))) a "
        "WHERE c.oid = %s::regclass AND a.privilege_type = 'TRUNCATE' AND a.grantee <> c.relowner",
        regclass,
    )
    assert truncaters == []
    now = datetime.now(UTC)
    with distributed.connect() as conn:
        if distributed.partitioned:  # type: ignore[attr-defined]
            conn.execute(ensure_partition_sql(distributed.schema, distributed.table), (now,))
    distributed.insert(now, tenant="t1")
    with distributed.connect() as conn, pytest.raises(Exception, match="append-only"):
        conn.execute(
            sql.SQL("DELETE FROM {}").format(qualified(distributed.schema, distributed.table))
        )


def test_the_writer_needs_nothing_else(distributed: Trail) -> None:
    """Client-made ids, no sequences; a month created on demand gets no statement trigger."""
    writer = AuditWriter(
        distributed.dsn, schema=distributed.schema, table=distributed.table, flush_interval=0.05
    )
    try:
        for i in range(20):
            assert writer.log("citus.write", tenant_id=f"t{i % 4}")
        assert writer.flush(timeout=30)
    finally:
        writer.close(timeout=10)
    assert (writer.stats().written, writer.stats().dead_lettered) == (20, 0)
    assert distributed.run(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind = 'S'",
        distributed.schema,
    ) == [(0,)]
    if distributed.partitioned:  # type: ignore[attr-defined]
        # The create_time_partitions stand-in made no month: this one was made on demand.
        with distributed.connect() as conn:
            parts = list_partitions(conn, distributed.schema, distributed.table)
        assert [p.rows for p in parts] == [20]
        assert distributed.run(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND tgtype & 1 = 0",
            f'"{distributed.schema}"."{parts[0].name}"',
        ) == [(0,)]


def test_the_cli_prints_or_writes_the_script(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init-db", "--distributed"]) == 0
    out = capsys.readouterr().out
    assert "SELECT create_distributed_table('\"public\".\"audit_logs\"', 'tenant_id');" in out
    assert "tenant_id     text NOT NULL" in out
    # Statement triggers guard only the chain's coordinator tables, never the audit table.
    assert all(
        "_digests" in line or "_checkpoints" in line or "_retention" in line
        for line in out.splitlines()
        if "FOR EACH STATEMENT" in line
    )
    path = tmp_path / "citus.sql"
    assert (
        main(["init-db", "--distributed", "--partitioned", "--roles", "--output", str(path)]) == 0
    )
    text = path.read_text()
    assert "create_time_partitions" in text and "GRANT INSERT, SELECT" in text
    capsys.readouterr()
    assert main(["init-db", "--output", str(path)]) == 2
    assert capsys.readouterr().err == "auditq init-db: --output goes with --distributed\n"


def test_roles_lines_grant_no_truncate() -> None:
    text = script("s", "t", roles=RoleNames("o", "w", "r"))
    granted = [line for line in text.splitlines() if line.startswith("GRANT")]
    assert granted and not [line for line in granted if "TRUNCATE" in line or "UPDATE" in line]
