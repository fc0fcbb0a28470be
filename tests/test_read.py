"""`auditq.read()` and `auditq tail`: typed, tenant-scoped, streamed reads from a real server."""

from __future__ import annotations

import ipaddress
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.pq import TransactionStatus

import auditq
from auditq.cli import main
from auditq.filters import FilterError, Filters
from auditq.reader import StoredEntry, read
from auditq.schema import qualified
from auditq.tail import Follower, format_entry, printable

from .conftest import Table, WriterFactory
from .helpers import ROOT

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def insert(table: Table, rows: list[dict[str, Any]]) -> list[uuid.UUID]:
    """Insert rows directly (the reads under test must not depend on the writer)."""
    ids = []
    with psycopg.connect(table.dsn, autocommit=True) as conn:
        for row in rows:
            values = {"id": uuid.uuid4(), "occurred_at": T0, "action": "login", **row}
            if isinstance(values.get("metadata"), dict):
                values["metadata"] = psycopg.types.json.Jsonb(values["metadata"])
            names = list(values)
            conn.execute(
                sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                    qualified(table.schema, table.name),
                    sql.SQL(", ").join(map(sql.Identifier, names)),
                    sql.SQL(", ").join(sql.Placeholder() * len(names)),
                ),
                list(values.values()),
            )
            ids.append(values["id"])
    return ids


@pytest.fixture
def reader_role(table: Table) -> Iterator[str]:
    yield from make_reader_role(table)


def make_reader_role(table: Table) -> Iterator[str]:
    """A role (unique, dropped after) that may only SELECT, under row-level security keyed
    on `auditq.tenant` as the audit trail's policy is."""
    role = f"auditq_reader_{uuid.uuid4().hex[:10]}"
    target = qualified(table.schema, table.name)
    with psycopg.connect(table.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(table.schema), sql.Identifier(role)
            )
        )
        conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(target, sql.Identifier(role)))
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(target))
        conn.execute(
            sql.SQL(
                "CREATE POLICY tenant_scope ON {} FOR SELECT TO {} "
                "USING (tenant_id = current_setting('auditq.tenant', true))"
            ).format(target, sql.Identifier(role))
        )
    yield role
    with psycopg.connect(table.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def as_role(dsn: str, role: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    return conn


def _read(table: Table, **filters: Any) -> list[StoredEntry]:
    return list(read(table.dsn, schema=table.schema, table=table.name, **filters))


# --- read() -------------------------------------------------------------------------------


def test_read_returns_typed_entries_written_by_the_writer(
    table: Table, make_writer: WriterFactory
) -> None:
    writer = make_writer(flush_interval=60)
    occurred = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    for i in range(3):
        assert writer.log(
            "doc.shared",
            occurred_at=occurred + timedelta(seconds=i),
            tenant_id="acme",
            actor_id=f"user-{i}",
            actor_type="human",
            resource_type="doc",
            resource_id="42",
            outcome="success",
            ip="2001:db8::1",
            user_agent="ua",
            request_id="req",
            metadata={"i": i, "nested": {"ü": "a\\b"}},
        )
    assert writer.log("doc.shared", occurred_at=occurred, tenant_id="other")
    assert writer.flush(timeout=30)

    entries = list(auditq.read(table.dsn, tenant="acme", schema=table.schema, table=table.name))

    assert [e.actor_id for e in entries] == ["user-0", "user-1", "user-2"]
    first = entries[0]
    assert isinstance(first, auditq.AuditEntry)
    assert isinstance(first.id, uuid.UUID)
    assert first.occurred_at == occurred and first.occurred_at.tzinfo is not None
    assert first.ip == ipaddress.ip_address("2001:db8::1")
    assert first.metadata == {"i": 0, "nested": {"ü": "a\\b"}}
    assert first.outcome == auditq.Outcome.SUCCESS
    assert isinstance(first.recorded_at, datetime)
    assert {e.tenant_id for e in entries} == {"acme"}


def test_filters_compose(table: Table) -> None:
    now = datetime.now(UTC)
    insert(
        table,
        [
            {"tenant_id": "a", "occurred_at": now - timedelta(days=3), "actor_id": "old"},
            {"tenant_id": "a", "occurred_at": now - timedelta(hours=2), "actor_id": "x"},
            {"tenant_id": "a", "occurred_at": now - timedelta(hours=1), "actor_id": "y"},
            {"tenant_id": "a", "occurred_at": now - timedelta(minutes=1), "action": "logout"},
            {"tenant_id": "b", "occurred_at": now - timedelta(hours=1), "actor_id": "y"},
        ],
    )
    assert [e.actor_id for e in _read(table, tenant="a", since="1d", action="login")] == ["x", "y"]
    assert [e.actor_id for e in _read(table, tenant="a", since=timedelta(days=1), actor="y")] == [
        "y"
    ]
    until = now - timedelta(minutes=90)
    assert [e.actor_id for e in _read(table, tenant="a", until=until)] == ["old", "x"]
    assert [e.actor_id for e in _read(table, tenant="a", until=until.isoformat())] == ["old", "x"]
    assert [e.actor_id for e in _read(table, tenant="a", limit=2)] == ["old", "x"]
    assert len(_read(table)) == 5
    assert sorted(e.tenant_id or "" for e in _read(table, actor="y")) == ["a", "b"]


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"tenant": ""}, "tenant is empty"),
        ({"tenant": "a\nb"}, "control"),
        ({"tenant": " a"}, "whitespace"),
        ({"tenant": "x" * 257}, "longer than"),
        ({"limit": 0}, "at least 1"),
        ({"since": "yesterday"}, "neither an ISO 8601"),
        ({"since": datetime(2026, 1, 1)}, "timezone-aware"),
        ({"since": "2026-02-01", "until": "2026-01-01"}, "not before"),
        ({"action": ""}, "non-empty"),
    ],
)
def test_bad_filters_raise_at_the_call(table: Table, filters: dict[str, Any], message: str) -> None:
    with pytest.raises(FilterError, match=message):
        read("postgresql://nobody@127.0.0.1:1/none", **filters)  # never connects


def test_relative_and_iso_times_parse() -> None:
    f = Filters.checked(since="1d12h", until="2026-01-31T12:00Z")
    assert f.since == timedelta(hours=36)
    assert f.until == datetime(2026, 1, 31, 12, tzinfo=UTC)
    assert Filters.checked(since="2026-01-31").since == datetime(2026, 1, 31, tzinfo=UTC)


def test_read_uses_a_server_side_cursor_and_leaves_the_connection_clean(table: Table) -> None:
    insert(table, [{"tenant_id": "a", "actor_id": str(i)} for i in range(5)])
    with psycopg.connect(table.dsn, autocommit=True) as conn:
        entries = read(conn, tenant="a", schema=table.schema, table=table.name)
        next(entries)
        cursors = conn.execute("SELECT name FROM pg_cursors").fetchall()
        assert any(name.startswith("auditq_read_") for (name,) in cursors)
        entries.close()  # abandoned half way
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert conn.execute("SELECT count(*) FROM pg_cursors").fetchone() == (0,)
        # The tenant setting was transaction-local: nothing of it is left on the session.
        assert conn.execute("SELECT current_setting('auditq.tenant', true)").fetchone() in {
            (None,),
            ("",),
        }


def test_read_inside_a_callers_transaction_restores_its_tenant_setting(table: Table) -> None:
    insert(table, [{"tenant_id": "a"}])
    with psycopg.connect(table.dsn) as conn:
        conn.execute("SELECT set_config('auditq.tenant', 'mine', true)")
        assert len(list(read(conn, tenant="a", schema=table.schema, table=table.name))) == 1
        setting = conn.execute("SELECT current_setting('auditq.tenant')").fetchone()
        assert setting == ("mine",)


def test_rls_reader_sees_its_tenant_through_the_session_setting(
    table: Table, reader_role: str
) -> None:
    insert(table, [{"tenant_id": "a", "actor_id": "1"}, {"tenant_id": "b", "actor_id": "2"}])
    with as_role(table.dsn, reader_role) as conn:
        opts = {"schema": table.schema, "table": table.name}
        # Only the setting lets the policy show anything: with it, a's row; without, nothing.
        assert [e.actor_id for e in read(conn, tenant="a", **opts)] == ["1"]
        assert [e.actor_id for e in read(conn, tenant="b", **opts)] == ["2"]
        assert list(read(conn, **opts)) == []


def test_explicit_tenant_filter_holds_under_a_loose_policy(table: Table, reader_role: str) -> None:
    # A policy that lets any scoped session see every row: the tenant_id condition still holds.
    with psycopg.connect(table.dsn, autocommit=True) as conn:
        target = qualified(table.schema, table.name)
        conn.execute(sql.SQL("DROP POLICY tenant_scope ON {}").format(target))
        conn.execute(
            sql.SQL(
                "CREATE POLICY loose ON {} FOR SELECT TO {} "
                "USING (current_setting('auditq.tenant', true) <> '')"
            ).format(target, sql.Identifier(reader_role))
        )
    insert(table, [{"tenant_id": "a", "actor_id": "1"}, {"tenant_id": "b", "actor_id": "2"}])
    with as_role(table.dsn, reader_role) as conn:
        got = list(read(conn, tenant="a", schema=table.schema, table=table.name))
        assert [e.actor_id for e in got] == ["1"]


def test_stored_rows_that_break_todays_input_rules_are_still_read(table: Table) -> None:
    long_action = "a" * 5000
    insert(table, [{"tenant_id": "a", "outcome": "denied", "action": long_action}])
    (entry,) = _read(table, tenant="a")
    assert entry.outcome == "denied"
    assert entry.action == long_action


def test_origin_is_read(table: Table) -> None:
    insert(table, [{"tenant_id": "a"}])
    assert _read(table)[0].origin is None
    insert(table, [{"tenant_id": "a", "origin": "api@host-1", "occurred_at": T0 + timedelta(1)}])
    assert [e.origin for e in _read(table)] == [None, "api@host-1"]


def test_missing_table_and_secret_dsn(table: Table) -> None:
    from auditq.filters import NoTable

    with pytest.raises(NoTable):
        list(read(table.dsn, schema=table.schema, table="no_such_table"))
    with pytest.raises(psycopg.OperationalError) as caught:
        list(read("postgresql://u:sekrit-pw@127.0.0.1:1/none?connect_timeout=2"))
    assert "sekrit-pw" not in str(caught.value)


# --- tail ---------------------------------------------------------------------------------


def tail_args(table: Table, *extra: str) -> list[str]:
    return ["tail", "--dsn", table.dsn, "--schema", table.schema, "--table", table.name, *extra]


def test_tail_prints_the_latest_n_oldest_first_and_escapes_control_characters(
    table: Table, capsys: pytest.CaptureFixture[str]
) -> None:
    insert(
        table,
        [
            {"tenant_id": "a", "occurred_at": T0 + timedelta(seconds=i), "actor_id": f"u{i}"}
            for i in range(5)
        ]
        + [
            {
                "tenant_id": "a",
                "occurred_at": T0 + timedelta(seconds=9),
                "resource_id": "evil\x1b[2J\u202e",
                "metadata": {"k": "\x9b"},
            },
            {"tenant_id": "b", "occurred_at": T0 + timedelta(seconds=10)},
        ],
    )
    assert main(tail_args(table, "--tenant", "a", "-n", "3")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("2026-01-01T00:00:03.000Z  login  -  actor=u3")
    assert "actor=u4" in lines[1]
    assert "\x1b" not in lines[2] and "\u202e" not in lines[2] and "\x9b" not in lines[2]
    assert "resource=evil\\x1b[2J\\u202e" in lines[2]
    assert main(tail_args(table, "-n", "1")) == 0
    assert capsys.readouterr().out.split("  ")[1] == "b"  # the tenant shows when unfiltered


def test_printable_leaves_ordinary_text_alone() -> None:
    assert printable("ünïcode 日本 🎉 tab\there") == "ünïcode 日本 🎉 tab\\there"
    assert printable("a\u2028b\x85c") == "a\\u2028b\\x85c"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tenant", ""], "tenant is empty"),
        (["-n", "x"], "-n must be a whole number"),
        (["-n", "-1"], "-n must be at least 0"),
        (["--since", "7 days"], "neither an ISO 8601"),
        (["--interval", "0"], "more than 0 seconds"),
    ],
)
def test_tail_refuses_bad_options_in_one_line(
    table: Table, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(tail_args(table, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("auditq tail: ") and message in err


def test_follower_finds_late_commits_and_replayed_rows_once(table: Table) -> None:
    target = qualified(table.schema, table.name)
    with psycopg.connect(table.dsn) as conn:
        follower = Follower(conn, Filters(tenant="a"), schema=table.schema, table=table.name)
        insert(table, [{"tenant_id": "a", "actor_id": "before"}])
        follower.start()
        assert list(follower.poll()) == []
        with psycopg.connect(table.dsn) as late:
            # A writer transaction that starts now (its recorded_at) but commits later.
            late.execute(
                sql.SQL(
                    "INSERT INTO {} (id, occurred_at, action, tenant_id, actor_id) "
                    "VALUES (%s, now(), 'login', 'a', 'late')"
                ).format(target),
                (uuid.uuid4(),),
            )
            insert(table, [{"tenant_id": "a", "actor_id": "on-time"}])
            # A spooled entry replayed now: occurred hours ago, recorded now.
            insert(table, [{"tenant_id": "a", "actor_id": "replayed", "occurred_at": T0}])
            insert(table, [{"tenant_id": "b", "actor_id": "other-tenant"}])
            assert {e.actor_id for e in follower.poll()} == {"on-time", "replayed"}
            late.commit()
        assert [e.actor_id for e in follower.poll()] == ["late"]
        assert list(follower.poll()) == []


def _reader(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def test_tail_follow_prints_new_entries_and_ends_cleanly_on_ctrl_c(table: Table) -> None:
    insert(table, [{"tenant_id": "a", "actor_id": "first", "occurred_at": T0}])
    env = {k: v for k, v in os.environ.items() if k not in {"AUDITQ_DSN", "DATABASE_URL"}}
    env["PYTHONPATH"] = str(ROOT)
    args = tail_args(table, "--tenant", "a", "--follow", "--interval", "0.1", "-n", "1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "auditq.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    try:
        assert "actor=first" in lines.get(timeout=30)
        insert(table, [{"tenant_id": "a", "actor_id": "second"}])
        insert(table, [{"tenant_id": "b", "actor_id": "not-mine"}])
        insert(table, [{"tenant_id": "a", "actor_id": "third"}])
        assert "actor=second" in lines.get(timeout=30)
        assert "actor=third" in lines.get(timeout=30)
        # The server drops the tail's connection (as in a restart): it reconnects and goes on.
        with psycopg.connect(table.dsn, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'auditq tail' AND datname = current_database() "
                "AND pid <> pg_backend_pid()"
            ).fetchall()
        assert ended
        insert(table, [{"tenant_id": "a", "actor_id": "after-reconnect"}])
        assert "actor=after-reconnect" in lines.get(timeout=60)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 0
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "Traceback" not in err and "reconnected" in err
    assert lines.empty()


def test_format_entry_shows_set_fields() -> None:
    entry = StoredEntry.model_construct(
        id=uuid.uuid4(),
        occurred_at=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        action="doc.read",
        tenant_id="t",
        actor_type="user",
        actor_id="42",
        resource_type=None,
        resource_id="r1",
        outcome="denied",
        ip=ipaddress.ip_address("10.0.0.1"),
        request_id=None,
        origin="api@h",
        metadata=None,
    )
    assert format_entry(entry) == (
        "2026-01-02T03:04:05.678Z  t  doc.read  denied  actor=user:42  resource=r1  "
        "ip=10.0.0.1  origin=api@h"
    )
