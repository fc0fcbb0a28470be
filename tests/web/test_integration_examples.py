"""The integration examples run as a user would run them, against a real server: the
asyncio service (configuration, readiness check, redaction, async flush), SQLAlchemy
transaction-coupled logging, and a test suite using the `audit_events` fixture."""

from __future__ import annotations

import json
import subprocess
import sys

from ..conftest import Table
from ..helpers import ROOT
from .test_examples import _env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_asyncio_service_checks_masks_and_flushes(table: Table) -> None:
    done = _run(["examples/asyncio_service.py"], _env(table))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "flushed": True,
        "clean": True,
        "written": 50,
    }
    rows = table.query("SELECT metadata FROM {table}")
    assert len(rows) == 50
    assert all(m["password"] == "***" and m["_auditq"]["masked"] for (m,) in rows)  # noqa: S105


def test_asyncio_service_refuses_to_start_on_a_missing_table(table: Table) -> None:
    env = _env(table)
    env["AUDITQ_TABLE"] = "no_such_table"
    done = _run(["examples/asyncio_service.py"], env)
    assert done.returncode == 1
    assert "does not exist" in done.stderr


def test_asyncio_service_reads_a_dotenv_file(table: Table, tmp_path: object) -> None:
    from pathlib import Path

    env_file = Path(str(tmp_path)) / ".env"
    env_file.write_text(f"AUDITQ_TABLE={table.name}\n")
    env = _env(table)
    del env["AUDITQ_TABLE"]
    done = _run(["examples/asyncio_service.py", "--env-file", str(env_file)], env)
    assert done.returncode == 0, done.stderr
    assert table.count() == 50


def test_sqlalchemy_on_commit_writes_only_what_committed(table: Table) -> None:
    done = _run(["examples/sqlalchemy_on_commit.py"], _env(table))
    try:
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {
            "written": 1,
            "archived": ["doc-1"],
        }
        assert table.query("SELECT action, resource_id FROM {table}") == [
            ("document.archive", "doc-1")
        ]
    finally:
        import psycopg

        with psycopg.connect(table.dsn, autocommit=True) as conn:
            conn.execute(f'DROP TABLE IF EXISTS "{table.schema}".auditq_example_documents')


def test_the_audit_events_example_suite_passes() -> None:
    done = _run(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "examples/test_with_audit_events.py"],
        {**_env_without_database()},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def _env_without_database() -> dict[str, str]:
    import os

    return {
        k: v for k, v in os.environ.items() if not k.startswith("AUDITQ_") and k != "DATABASE_URL"
    } | {"PYTHONPATH": str(ROOT)}
