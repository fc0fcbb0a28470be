"""`auditq export`: COPY-streamed JSON Lines and CSV, tenant-scoped, private files, flat memory."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from auditq.cli import main
from auditq.export import Format, export
from auditq.filters import Filters
from auditq.reader import read
from auditq.schema import qualified

from .conftest import Table
from .helpers import ROOT
from .test_read import T0, as_role, insert, make_reader_role

TRICKY = [
    'back\\slash "quoted" \\n not a newline',
    "real\nnewline and\r\ncarriage return\tand tab",
    "unicode ü 日本語 🎉 \u2028 \u202e",
    "controls \x01 \x02 \x1b[31m \x7f",
    "csv, commas; \"and\" 'quotes'",
    "ends with a backslash \\",
]


@pytest.fixture
def reader_role(table: Table) -> Iterator[str]:
    yield from make_reader_role(table)


def export_args(table: Table, *extra: str) -> list[str]:
    return ["export", "--dsn", table.dsn, "--schema", table.schema, "--table", table.name, *extra]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"AUDITQ_DSN", "DATABASE_URL"}}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _tricky_rows(table: Table) -> list[uuid.UUID]:
    rows = [
        {
            "tenant_id": "acme",
            "occurred_at": T0 + timedelta(seconds=i),
            "actor_id": text,
            "user_agent": text,
            "resource_id": f"r{i}",
            "ip": "2001:db8::1",
            "metadata": {"text": text, "nested": {"list": [text, i, None, True]}},
        }
        for i, text in enumerate(TRICKY)
    ]
    ids = insert(table, rows)
    insert(table, [{"tenant_id": "other", "actor_id": "not exported"}])
    return ids


def test_jsonl_is_one_valid_object_per_line_whatever_the_values(
    table: Table, tmp_path: Path
) -> None:
    ids = _tricky_rows(table)
    out = tmp_path / "acme.jsonl"
    assert main(export_args(table, "--tenant", "acme", "--format", "jsonl", "-o", str(out))) == 0
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a newline, no blank lines inside
    objects = [json.loads(line) for line in lines[:-1]]
    assert [uuid.UUID(o["id"]) for o in objects] == ids
    assert [o["actor_id"] for o in objects] == TRICKY
    assert [o["user_agent"] for o in objects] == TRICKY
    assert [o["metadata"]["nested"]["list"][0] for o in objects] == TRICKY
    first = objects[0]
    assert first["tenant_id"] == "acme" and first["ip"] == "2001:db8::1"
    assert first["occurred_at"] == "2026-01-01T00:00:00+00:00"
    assert list(first) == [
        "id",
        "occurred_at",
        "recorded_at",
        "action",
        "tenant_id",
        "actor_id",
        "actor_type",
        "resource_type",
        "resource_id",
        "outcome",
        "ip",
        "user_agent",
        "request_id",
        "metadata",
        "origin",
        "chain_stream",
        "chain_pos",
    ]


def test_csv_round_trips_through_a_csv_reader(
    table: Table, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    ids = _tricky_rows(table)
    # stdout, as a pipe would receive it (the export writes to file descriptor 1).
    assert main(export_args(table, "--tenant", "acme", "--format", "csv")) == 0
    data = capfdbinary.readouterr().out.decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(data, newline="")))
    assert [uuid.UUID(r["id"]) for r in rows] == ids
    assert [r["user_agent"] for r in rows] == TRICKY
    assert [json.loads(r["metadata"])["text"] for r in rows] == TRICKY
    assert rows[0]["occurred_at"] == "2026-01-01 00:00:00+00"
    assert rows[0]["outcome"] == ""  # NULL


# Any text PostgreSQL can store: no NUL, no lone surrogates.
_STORABLE = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(texts=st.lists(_STORABLE, min_size=1, max_size=8))
def test_any_storable_text_survives_both_formats(table: Table, texts: list[str]) -> None:
    tenant = uuid.uuid4().hex  # each example its own tenant: the table is shared
    ids = insert(
        table,
        [
            {
                "tenant_id": tenant,
                "occurred_at": T0 + timedelta(seconds=i),
                "user_agent": text,
                "metadata": {text: [text]},
            }
            for i, text in enumerate(texts)
        ],
    )
    outputs = {}
    for fmt in Format:
        buffer = io.BytesIO()
        with psycopg.connect(table.dsn) as conn:
            written = export(
                conn,
                Filters.checked(tenant=tenant),
                fmt,
                buffer,
                schema=table.schema,
                table=table.name,
            )
        assert written == len(texts)
        outputs[fmt] = buffer.getvalue().decode("utf-8")
    objects = [json.loads(line) for line in outputs[Format.JSONL].split("\n")[:-1]]
    assert [uuid.UUID(o["id"]) for o in objects] == ids
    assert [o["user_agent"] for o in objects] == texts
    assert [o["metadata"] for o in objects] == [{t: [t]} for t in texts]
    rows = list(csv.DictReader(io.StringIO(outputs[Format.CSV], newline="")))
    assert [r["user_agent"] for r in rows] == texts
    assert [json.loads(r["metadata"]) for r in rows] == [{t: [t]} for t in texts]


def test_filters_select_what_read_selects(table: Table, tmp_path: Path) -> None:
    insert(
        table,
        [
            {
                "tenant_id": "a",
                "occurred_at": T0 + timedelta(hours=i),
                "action": "login" if i % 2 else "logout",
                "actor_id": f"u{i % 3}",
            }
            for i in range(30)
        ],
    )
    opts = {"since": "2026-01-01T03:00Z", "until": "2026-01-02T02:00Z", "action": "login"}
    out = tmp_path / "x.jsonl"
    cli = [f"--{k}={v}" for k, v in opts.items()]
    assert main(export_args(table, "--tenant", "a", "--actor", "u1", *cli, "-o", str(out))) == 0
    exported = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    expected = [
        str(e.id)
        for e in read(
            table.dsn, schema=table.schema, table=table.name, tenant="a", actor="u1", **opts
        )
    ]
    assert exported == expected and 2 <= len(expected) < 30
    assert main(export_args(table, "--tenant", "a", "--limit", "4", "-o", str(out))) == 0
    assert len(out.read_text().splitlines()) == 4
    # Durations count back from the database's clock: all of them are within 100000 days.
    args = ["--tenant", "a", "--since", "100000d", "--until", "0s", "-o", str(out)]
    assert main(export_args(table, *args)) == 0
    assert len(out.read_text().splitlines()) == 30


def test_output_file_is_private_and_replaced_only_when_complete(
    table: Table, tmp_path: Path
) -> None:
    insert(table, [{"tenant_id": "a"}])
    out = tmp_path / "export.jsonl"
    out.write_text("previous export\n")
    out.chmod(0o644)
    assert main(export_args(table, "--tenant", "a", "-o", str(out))) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert len(out.read_text().splitlines()) == 1
    # A failing export (the table vanished) leaves the last good file and no temporary.
    before = out.read_bytes()
    args = ["export", "--dsn", table.dsn, "--schema", table.schema, "--table", "gone"]
    assert main([*args, "--tenant", "a", "-o", str(out)]) == 1
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.jsonl"]


def test_export_under_row_level_security(table: Table, reader_role: str, tmp_path: Path) -> None:
    # The policy shows rows only when auditq.tenant is set: the export sets it.
    insert(table, [{"tenant_id": "a", "actor_id": "1"}, {"tenant_id": "b", "actor_id": "2"}])
    buffer = io.BytesIO()
    with as_role(table.dsn, reader_role) as conn:
        written = export(
            conn,
            Filters.checked(tenant="b"),
            Format.JSONL,
            buffer,
            schema=table.schema,
            table=table.name,
        )
    assert written == 1
    assert [json.loads(line)["actor_id"] for line in buffer.getvalue().splitlines()] == ["2"]


def test_origin_is_exported(table: Table, tmp_path: Path) -> None:
    insert(table, [{"tenant_id": "a", "origin": "api@host-1"}])
    out = tmp_path / "o.csv"
    assert main(export_args(table, "--tenant", "a", "--format", "csv", "-o", str(out))) == 0
    (row,) = csv.DictReader(out.open(newline=""))
    assert row["origin"] == "api@host-1"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--tenant is required"),
        (["--tenant", ""], "tenant is empty"),
        (["--tenant", "a\tb"], "control characters"),
        (["--tenant", "a", "--since", "last week"], "neither an ISO 8601"),
        (["--tenant", "a", "--until", "2026-02-30"], "neither an ISO 8601"),
        (["--tenant", "a", "--since", "7d", "--until", "8d"], "not before"),
        (["--tenant", "a", "--format", "xml"], "--format must be jsonl or csv"),
        (["--tenant", "a", "--limit", "0"], "--limit must be at least 1"),
        (["--tenant", "a", "--limit", "-5"], "--limit must be at least 1"),
        (["--tenant", "a", "--limit", "ten"], "--limit must be a whole number"),
        (["--tenant", "a", "--output", "/"], "is a directory"),
        (["--tenant", "a", "--output", "/no/such/dir/x.jsonl"], "no directory"),
    ],
)
def test_bad_options_are_refused_in_one_line_with_status_2(
    table: Table, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(export_args(table, *extra)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("auditq export: ")
    assert message in captured.err


def test_progress_bar_on_a_terminal_only(table: Table, tmp_path: Path) -> None:
    insert(table, [{"tenant_id": "a"} for _ in range(3)])
    command = [sys.executable, "-m", "auditq.cli", *export_args(table, "--tenant", "a")]
    piped = subprocess.run(command, capture_output=True, env=cli_env(), cwd=ROOT, timeout=60)
    assert piped.returncode == 0 and piped.stderr == b""
    assert len(piped.stdout.splitlines()) == 3

    main_fd, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [*command, "-o", str(tmp_path / "x.jsonl")],
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            env=cli_env(),
            cwd=ROOT,
            timeout=60,
        )
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main_fd)
    assert done.returncode == 0
    assert b"100%" in shown and b"3/3 rows" in shown


def _fill(table: Table, rows: int) -> None:
    """`rows` realistic entries for tenant `big`, made by the server in one statement."""
    statement = sql.SQL(
        """INSERT INTO {} (id, occurred_at, action, tenant_id, actor_id, actor_type,
               resource_type, resource_id, outcome, ip, user_agent, request_id, metadata)
           SELECT gen_random_uuid(), %s::timestamptz + g * interval '1 ms', 'document.read',
               'big', 'user-' || (g %% 1000), 'human', 'document', 'doc-' || g, 'success',
               '10.1.2.3', 'Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0', 'req-' || g,
               jsonb_build_object('n', g, 'path', '/api/v1/documents/' || g)
           FROM generate_series(1, %s) g"""
    ).format(qualified(table.schema, table.name))
    with psycopg.connect(table.dsn, autocommit=True) as conn:
        conn.execute(statement, (T0, rows))
        conn.execute(sql.SQL("ANALYZE {}").format(qualified(table.schema, table.name)))


def _export_peak_rss(table: Table) -> tuple[int, int]:
    """(lines on stdout, the export process's peak RSS in KiB), read as the process exits."""
    command = [sys.executable, "-m", "auditq.cli", *export_args(table, "--tenant", "big")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, env=cli_env(), cwd=ROOT)
    assert proc.stdout is not None
    lines = 0
    while chunk := proc.stdout.read(1 << 20):
        lines += chunk.count(b"\n")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0
    return lines, usage.ru_maxrss


@pytest.mark.timeout(900)
def test_memory_stays_flat_from_100k_to_1m_rows(table: Table) -> None:
    _fill(table, 100_000)
    small_lines, small_rss = _export_peak_rss(table)
    _fill(table, 900_000)
    big_lines, big_rss = _export_peak_rss(table)
    assert (small_lines, big_lines) == (100_000, 1_000_000)
    # Holding the rows would cost hundreds of MiB for 900k more (each line is ~430 bytes).
    assert big_rss - small_rss < 16 * 1024, (small_rss, big_rss)


def test_failures_exit_1_without_the_dsn_secret(capsys: pytest.CaptureFixture[str]) -> None:
    dsn = "postgresql://auditor:sekrit-pw@127.0.0.1:1/none?connect_timeout=2"
    for command in (["export", "--tenant", "a"], ["tail"]):
        assert main([*command, "--dsn", dsn]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"auditq {command[0]}: failed") and "sekrit-pw" not in err
