"""Bad options: every command refuses them with one line on stderr and exit status 2, and
changes nothing in the database."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from auditq.cli import main
from auditq.schema import create

from .trail_support import Trail, trail


@pytest.fixture
def made(pg_dsn: str) -> Iterator[Trail]:
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table)
        made.insert(datetime(2020, 1, 1, tzinfo=UTC))
        yield made


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse refusals
        status = int(exc.code or 0)
    captured = capsys.readouterr()
    assert status == 2, (argv, captured)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, (argv, captured.err)
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["init-db", "--no-such-option"], "unrecognized arguments"),
        (["init-db", "--ahead", "x"], "invalid int value"),
        (["init-db", "--ahead", "-3"], "--ahead -3"),
        (["init-db", "--ahead", "500"], "--ahead 500"),
        (["init-db", "--role-prefix", "x"], "need --roles"),
        (["init-db", "--roles", "--role-prefix", "Bad-Name"], "is not valid"),
        (["init-db", "--roles", "--writer-role", "a", "--reader-role", "a"], "all be different"),
        (["migrate", "--roles", "--to-partitioned"], "separately"),
        (["migrate", "--bogus"], "unrecognized arguments"),
        (["partitions", "--create-ahead", "-1"], "--create-ahead -1"),
        (["retention"], "--keep"),
        (["retention", "--keep", "13"], "does not parse"),
        (["retention", "--keep", "13m"], "'mo'"),
        (["retention", "--keep", "0d"], "keeps nothing"),
        (["retention", "--keep", "1y", "--dryrun"], "unrecognized arguments"),
        (["bench", "--entries", "many"], "is not a whole number"),
        (["spool"], "required"),
        (["nope"], "invalid choice"),
    ],
)
def test_bad_options_one_line_status_2(
    made: Trail, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    target = ["--dsn", made.dsn, "--schema", made.schema, "--table", made.table]
    if argv[0] in ("init-db", "migrate", "partitions", "retention"):
        argv = [*argv, *target]
    line = _refused(capsys, argv)
    assert says in line, line
    assert made.run("SELECT count(*) FROM {table}") == [(1,)]


def test_commands_refused_by_the_database_state(
    made: Trail, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--dsn", made.dsn, "--schema", made.schema, "--table", made.table]
    assert "not a partitioned table" in _refused(capsys, ["partitions", *target])
    assert "not partitioned" in _refused(capsys, ["retention", "--keep", "1mo", *target])
    assert "migrate --to-partitioned" in _refused(capsys, ["init-db", "--partitioned", *target])
    assert made.run("SELECT count(*) FROM {table}") == [(1,)]


def test_no_database_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AUDITQ_DSN", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for command in (["init-db"], ["migrate"], ["partitions"], ["retention", "--keep", "1y"]):
        assert "no database" in _refused(capsys, command)


def test_the_installed_command_prints_one_line() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "auditq.cli",
            "retention",
            "--keep",
            "soon",
            "--dsn",
            "postgresql://x@/y",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "does not parse" in done.stderr


def test_init_db_needs_no_create_on_the_database_when_the_schema_exists(pg_dsn: str) -> None:
    """A least-privilege role that may create tables in an existing schema, but not schemas
    in the database, can run init-db (CREATE SCHEMA IF NOT EXISTS alone would refuse it)."""
    import uuid

    import psycopg
    from psycopg import conninfo, sql

    role = f"aq_ddl_{uuid.uuid4().hex[:8]}"
    schema = f"aq_s_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        dbname = conn.info.dbname
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(
                sql.Identifier(schema), sql.Identifier(role)
            )
        )
        conn.execute(
            sql.SQL("REVOKE CREATE ON DATABASE {} FROM PUBLIC, {}").format(
                sql.Identifier(dbname), sql.Identifier(role)
            )
        )
    try:
        dsn = conninfo.make_conninfo(pg_dsn, user=role)
        assert main(["init-db", "--dsn", dsn, "--schema", schema, "--table", "audit_logs"]) == 0
        with psycopg.connect(dsn, autocommit=True) as conn:
            found = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".audit_logs',)
            ).fetchone()
        assert found == (True,)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
