"""Schema versions and migrations: a table made by the first `init-db` is brought to the
current shape in place (idempotently), the writer's version check says what to run, and a
plain table is converted to monthly partitions with its rows, grants and guards."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from psycopg import sql

from auditq import AuditWriter, guards
from auditq.chain_schema import create_chain_tables
from auditq.cli import main
from auditq.migrate import MigrateError, migrate, to_partitioned
from auditq.partitions import add_months, is_partitioned, list_partitions, month_start
from auditq.retention import parse_keep, plan
from auditq.schema import SCHEMA_VERSION, check_version, create, qualified

from .trail_support import Trail, allow_login, refused, trail

#: The table exactly as the first auditq's `init-db` made it (schema version 1).
VERSION_1 = """CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE {table} (
    id            uuid        PRIMARY KEY,
    occurred_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    action        text        NOT NULL CHECK (action <> ''),
    tenant_id     text,
    actor_id      text,
    actor_type    text,
    resource_type text,
    resource_id   text,
    outcome       text        CHECK (outcome IN ('success', 'failure', 'unknown')),
    ip            inet,
    user_agent    text,
    request_id    text,
    metadata      jsonb       CHECK (metadata IS NULL OR jsonb_typeof(metadata) = 'object')
)"""

NOW = datetime.now(UTC)


@pytest.fixture
def old(pg_dsn: str) -> Iterator[Trail]:
    """A version-1 table with rows over the last 14 months."""
    with trail(pg_dsn) as made:
        with made.connect() as conn:
            for statement in VERSION_1.split(";"):
                conn.execute(
                    sql.SQL(statement).format(  # type: ignore[arg-type]
                        schema=sql.Identifier(made.schema),
                        table=qualified(made.schema, made.table),
                    )
                )
            conn.execute(
                sql.SQL("CREATE INDEX {} ON {} (tenant_id, occurred_at)").format(
                    sql.Identifier(f"{made.table}_tenant_occurred_idx"),
                    qualified(made.schema, made.table),
                )
            )
        for back in range(14):
            made.insert(NOW - timedelta(days=30 * back), tenant=f"t{back % 2}")
        yield made


def _columns(made: Trail) -> list[str]:
    return [
        str(row[0])
        for row in made.run(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum",
            f'"{made.schema}"."{made.table}"',
        )
    ]


def test_migrate_brings_version_1_to_the_current_shape(old: Trail) -> None:
    with old.connect() as conn:
        behind = check_version(conn, old.schema, old.table)
        assert behind is not None and "auditq migrate" in behind and "\n" not in behind
        # Version 1 refuses an outcome outside its vocabulary.
        denied = sql.SQL(
            "INSERT INTO {} (id, occurred_at, action, outcome) "
            "VALUES (gen_random_uuid(), now(), 'login', 'denied')"
        ).format(qualified(old.schema, old.table))
        assert refused(conn, denied) == "23514"
        report = migrate(conn, old.schema, old.table)
        assert len(report.steps) == 6, report.steps  # version 2's four, the chain, the version
        assert check_version(conn, old.schema, old.table) is None
        conn.execute(denied)  # free text now
        too_long = sql.SQL(
            "INSERT INTO {} (id, occurred_at, action, outcome) "
            "VALUES (gen_random_uuid(), now(), 'login', repeat('x', 65))"
        ).format(qualified(old.schema, old.table))
        assert refused(conn, too_long) == "23514"
        assert guards.unguarded(conn, old.schema, old.table) == []
        assert (
            refused(conn, sql.SQL("DELETE FROM {}").format(qualified(old.schema, old.table)))
            == "42501"
        )
        # Idempotent: a second run finds nothing to do and records nothing.
        assert migrate(conn, old.schema, old.table).steps == []
    assert _columns(old)[-3:] == ["origin", "chain_stream", "chain_pos"]
    assert old.run("SELECT count(*) FROM {table}") == [(15,)]
    versions = old.run(
        "SELECT version, layout FROM {schema}.auditq_schema_version WHERE table_name = %s",
        old.table,
    )
    assert versions == [(SCHEMA_VERSION, "plain")]


def test_a_migrated_table_matches_a_new_one(old: Trail, pg_dsn: str) -> None:
    with old.connect() as conn:
        migrate(conn, old.schema, old.table)
    fresh = Trail(old.dsn, old.schema, "fresh", old.roles)
    create(pg_dsn, schema=old.schema, table="fresh")
    with old.connect() as conn:  # a no-op once init-db adds the chain itself
        create_chain_tables(conn, old.schema, "fresh")
    assert _columns(old) == _columns(fresh)
    checks = (
        "SELECT conname LIKE '%%outcome%%', pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype = 'c' ORDER BY 2"
    )
    assert old.run(checks, f'"{old.schema}"."{old.table}"') == fresh.run(
        checks, f'"{old.schema}"."fresh"'
    )


def test_the_cli_migrates_with_roles(old: Trail) -> None:
    args = ["--dsn", old.dsn, "--schema", old.schema, "--table", old.table]
    assert main(["migrate", *args, "--roles", "--role-prefix", old.schema]) == 0
    assert main(["migrate", *args, "--roles", "--role-prefix", old.schema]) == 0
    allow_login(old)
    writer = AuditWriter(old.dsn_as(old.roles.writer), schema=old.schema, table=old.table)
    try:
        with old.connect(old.roles.writer) as conn:
            assert check_version(conn, old.schema, old.table) is None
        assert writer.log("after.migrate", tenant_id="t1")
        assert writer.flush(timeout=30)
    finally:
        writer.close(timeout=10)
    assert writer.stats().written == 1
    with old.connect(old.roles.writer) as conn:
        assert (
            refused(conn, sql.SQL("DELETE FROM {}").format(qualified(old.schema, old.table)))
            == "42501"
        )


def test_to_partitioned_keeps_every_row_and_takes_new_months(old: Trail) -> None:
    with old.connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(old.roles.reader)))
        conn.execute(
            sql.SQL("GRANT SELECT ON {} TO {}").format(
                qualified(old.schema, old.table), sql.Identifier(old.roles.reader)
            )
        )
        before = conn.execute(
            sql.SQL("SELECT count(*), sum(hashtext(id::text)) FROM {}").format(
                qualified(old.schema, old.table)
            )
        ).fetchone()
        report = to_partitioned(conn, old.schema, old.table)
        assert any("converted" in step for step in report.steps)
        assert is_partitioned(conn, old.schema, old.table)
        parts = list_partitions(conn, old.schema, old.table)
        assert parts[0].name == f"{old.table}_legacy" and parts[0].range_from is None
        assert parts[0].rows == 14
        boundary = add_months(month_start(NOW), 2)
        assert parts[0].range_to == boundary
        assert [p.range_from for p in parts[1:]] == [add_months(boundary, n) for n in range(4)]
        after = conn.execute(
            sql.SQL("SELECT count(*), sum(hashtext(id::text)) FROM {}").format(
                qualified(old.schema, old.table)
            )
        ).fetchone()
        assert after == before
        assert guards.unguarded(conn, old.schema, old.table) == []
        legacy = qualified(old.schema, f"{old.table}_legacy")
        assert refused(conn, sql.SQL("DELETE FROM {}").format(legacy)) == "42501"
        assert refused(conn, sql.SQL("TRUNCATE {}").format(legacy)) == "42501"
        grants = conn.execute(
            "SELECT has_table_privilege(%s, %s::regclass, 'SELECT'), "
            "has_table_privilege(%s, %s::regclass, 'SELECT')",
            (
                old.roles.reader,
                f'"{old.schema}"."{old.table}"',
                old.roles.reader,
                f'"{old.schema}"."{old.table}_legacy"',
            ),
        ).fetchone()
        assert grants == (True, False)  # moved to the parent, none left on the partition
        assert check_version(conn, old.schema, old.table) is None
        assert to_partitioned(conn, old.schema, old.table).steps == []  # idempotent
    writer = AuditWriter(old.dsn, schema=old.schema, table=old.table, flush_interval=0.05)
    try:
        assert writer.log("after.convert")  # lands in the old table's range
        assert writer.log("later", occurred_at=add_months(boundary, 9))  # a month not made yet
        assert writer.flush(timeout=30)
    finally:
        writer.close(timeout=10)
    assert (writer.stats().written, writer.stats().dead_lettered) == (2, 0)
    assert old.run("SELECT count(*) FROM {table}") == [(16,)]


def test_migrate_refuses_a_missing_table(pg_dsn: str) -> None:
    with trail(pg_dsn) as made, made.connect() as conn:
        with pytest.raises(MigrateError, match="does not exist"):
            migrate(conn, made.schema, made.table)
        assert check_version(conn, made.schema, made.table) == (
            f"audit table {made.schema}.{made.table} does not exist: run "
            f"`auditq init-db --schema {made.schema} --table {made.table}`"
        )


def test_check_version_lines(pg_dsn: str) -> None:
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True)
        with made.connect() as conn:
            assert check_version(conn, made.schema, made.table) is None
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.auditq_schema_version (table_name, version, layout) "
                    "VALUES (%s, %s, 'partitioned')"
                ).format(sql.Identifier(made.schema)),
                (made.table, SCHEMA_VERSION + 1),
            )
            line = check_version(conn, made.schema, made.table)
            assert line is not None and "upgrade auditq" in line and "\n" not in line
            # It never raises, and leaves the connection usable: in a transaction too.
            conn.autocommit = False
            conn.execute("SELECT 1")
            assert check_version(conn, made.schema, "missing") is not None
            assert conn.execute("SELECT 2").fetchone() == (2,)
            conn.rollback()


def test_the_cli_converts_and_retention_sees_the_old_table_as_one_partition(
    old: Trail, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--dsn", old.dsn, "--schema", old.schema, "--table", old.table]
    assert main(["migrate", "--to-partitioned", *args]) == 0
    assert "converted to monthly partitions" in capsys.readouterr().out
    assert main(["migrate", "--to-partitioned", *args]) == 0
    assert "already up to date" in capsys.readouterr().out
    with old.connect() as conn:
        legacy = f"{old.table}_legacy"
        assert [p.name for p in plan(conn, old.schema, old.table, parse_keep("13mo"))] == []
        later = add_months(month_start(NOW), 2 + 13)
        doomed = plan(conn, old.schema, old.table, parse_keep("13mo"), now=later)
        assert [p.name for p in doomed] == [legacy]


def test_a_writer_on_a_version_1_table_says_what_to_run_and_keeps_its_entries(
    old: Trail, caplog: pytest.LogCaptureFixture
) -> None:
    """The version-1 table has no `origin` column: COPY fails until it is migrated. The
    writer says once, at start, what to run, retains what it accepts, and writes it all
    once the table is migrated."""
    import logging

    from auditq import AuditWriter
    from auditq.migrate import migrate

    caplog.set_level(logging.WARNING, logger="auditq")
    writer = AuditWriter(
        old.dsn, schema=old.schema, table=old.table, retry_backoff_max=0.2, flush_interval=0.1
    )
    try:
        for n in range(50):
            assert writer.log("while.behind", request_id=str(n))
        assert not writer.flush(timeout=1.0)  # retained, not lost
        lines = [r.getMessage() for r in caplog.records if "auditq migrate" in r.getMessage()]
        assert lines and "schema version 1" in lines[0], lines
        stats = writer.stats()
        assert stats.pending == 50 and stats.dead_lettered == 0, stats
        with old.connect() as conn:
            migrate(conn, old.schema, old.table)
        assert writer.flush(timeout=20)
        assert writer.stats().written == 50
    finally:
        writer.close(timeout=5)
