"""auditq.readiness and `auditq check`: each finding against a real server, and a
least-privilege role that the check passes really can write."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import conninfo, sql

from auditq import AuditWriter
from auditq.cli import main
from auditq.readiness import check

from .conftest import Table


def _admin(dsn: str, statement: sql.Composable | str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture
def role(table: Table) -> Iterator[tuple[str, str]]:
    """A login role with nothing granted yet, and a DSN for it; dropped after."""
    name = f"auditq_h6_{uuid.uuid4().hex[:10]}"
    ident = sql.Identifier(name)
    _admin(table.dsn, sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw-h6'").format(ident))
    params = conninfo.conninfo_to_dict(table.dsn)
    params.update(user=name, password="pw-h6")  # noqa: S106 - a throwaway test role
    try:
        yield name, conninfo.make_conninfo(**params)
    finally:
        with psycopg.connect(table.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
            conn.execute(sql.SQL("DROP ROLE {}").format(ident))


def test_ready_table_passes_and_cli_exits_0(
    table: Table, capsys: pytest.CaptureFixture[str]
) -> None:
    result = check(table.dsn, schema=table.schema, table=table.name)
    assert result.ok, result.findings
    code = main(["check", "--dsn", table.dsn, "--schema", table.schema, "--table", table.name])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(out) == 1 and out[0].startswith("ok: ")


def test_missing_table_and_schema(table: Table, capsys: pytest.CaptureFixture[str]) -> None:
    result = check(table.dsn, schema=table.schema, table="no_such_table")
    assert result.findings == (
        f"table {table.schema}.no_such_table does not exist (run `auditq init-db`)",
    )
    assert check(table.dsn, schema="no_such_schema_h6", table="t").findings == (
        "schema 'no_such_schema_h6' does not exist (run `auditq init-db`)",
    )
    code = main(["check", "--dsn", table.dsn, "--schema", table.schema, "--table", "nope"])
    assert code == 1
    assert capsys.readouterr().out.startswith("missing: table ")


def test_wrong_columns_are_named(table: Table) -> None:
    table.execute("ALTER TABLE {table} ALTER COLUMN ip TYPE text")
    table.execute("ALTER TABLE {table} DROP COLUMN request_id")
    table.execute("ALTER TABLE {table} ADD COLUMN source text NOT NULL")
    with psycopg.connect(table.dsn) as conn:  # a connection you pass is used as is
        result = check(conn, schema=table.schema, table=table.name)
        assert not conn.closed
    assert set(result.findings) == {
        "column request_id (text) in " + f"{table.schema}.{table.name}",
        "column ip must be inet, is text",
        "a default for column source: it is NOT NULL and auditq does not set it",
    }


def test_connection_failure_is_one_line_without_the_password() -> None:
    result = check("postgresql://someone:hunter2-h6@127.0.0.1:1/db", connect_timeout=2)
    assert len(result.findings) == 1
    assert result.findings[0].startswith("connection: cannot connect")
    assert "hunter2-h6" not in " ".join(result.lines()) + result.target


def test_least_privilege_role_findings_then_a_real_write(
    table: Table, role: tuple[str, str]
) -> None:
    name, dsn = role
    ident, target = (
        sql.Identifier(name),
        sql.SQL("{}.{}").format(sql.Identifier(table.schema), sql.Identifier(table.name)),
    )
    database = conninfo.conninfo_to_dict(table.dsn).get("dbname") or "postgres"
    db = sql.Identifier(str(database))
    # TEMP is granted to PUBLIC by default: take it away for this test (superusers, which
    # the other tests use, are not affected), and give it back after.
    _admin(table.dsn, sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC").format(db))
    try:
        bare = check(dsn, schema=table.schema, table=table.name)
        assert any(f.startswith(f"USAGE on schema {table.schema!r}") for f in bare.findings)
        assert any(f.startswith(f"INSERT on {table.schema}.{table.name}") for f in bare.findings)

        _admin(
            table.dsn,
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(table.schema), ident),
        )
        _admin(table.dsn, sql.SQL("GRANT INSERT ON {} TO {}").format(target, ident))
        insert_only = check(dsn, schema=table.schema, table=table.name)
        assert [f.split(" (")[0].split(":")[0] for f in insert_only.findings] == [
            f"TEMP on database {database!r}",
            f"SELECT on {table.schema}.{table.name}",
        ]
        # What those findings are about: the replay's staging table cannot be made.
        with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                sql.SQL("CREATE TEMP TABLE h6_staging (LIKE {} INCLUDING DEFAULTS)").format(target)
            )
        _admin(table.dsn, sql.SQL("GRANT TEMPORARY ON DATABASE {} TO {}").format(db, ident))
        _admin(table.dsn, sql.SQL("GRANT SELECT ON {} TO {}").format(target, ident))
        assert check(dsn, schema=table.schema, table=table.name).ok
    finally:
        _admin(table.dsn, sql.SQL("GRANT TEMPORARY ON DATABASE {} TO PUBLIC").format(db))
        _admin(table.dsn, sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM {}").format(db, ident))
    with AuditWriter(dsn, schema=table.schema, table=table.name) as writer:
        assert writer.log("readiness.ok")
        assert writer.flush(10)
    assert table.query("SELECT action FROM {table}") == [("readiness.ok",)]


def test_cli_without_a_database_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AUDITQ_DSN", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["check"]) == 1
    assert capsys.readouterr().out.startswith("missing: a database")


def test_the_writer_checks_its_own_table(table: Table) -> None:
    from psycopg_pool import ConnectionPool

    from auditq import AuditWriter

    writer = AuditWriter(table.dsn, schema=table.schema, table=table.name)
    try:
        assert writer.check().ok
    finally:
        writer.close(timeout=1)
    missing = AuditWriter(table.dsn, schema=table.schema, table=f"{table.name}_gone")
    try:
        result = missing.check()
        assert not result.ok and any("does not exist" in f for f in result.findings)
    finally:
        missing.close(timeout=1)
    with ConnectionPool(table.dsn, min_size=1, max_size=1, open=True) as pool:
        pooled = AuditWriter(pool=pool, schema=table.schema, table=table.name)
        assert pooled.check().ok
        pooled.close(timeout=1)
