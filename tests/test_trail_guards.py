"""Append-only guards: UPDATE, DELETE and TRUNCATE are refused on the table, on each
partition and on the bookkeeping tables, even for a superuser and with
session_replication_role = replica; no BEFORE INSERT trigger exists."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from psycopg import sql

from auditq import guards
from auditq.partitions import list_partitions
from auditq.schema import RETENTION_TABLE, VERSION_TABLE, create, qualified

from .trail_support import Trail, refused, trail

NOW = datetime.now(UTC)


@pytest.fixture(params=["plain", "partitioned"])
def guarded(request: pytest.FixtureRequest, pg_dsn: str) -> Iterator[Trail]:
    with trail(pg_dsn) as made:
        create(
            pg_dsn, schema=made.schema, table=made.table, partitioned=request.param == "partitioned"
        )
        made.insert(NOW, tenant="t1")
        made.insert(NOW, tenant="t2")
        with made.connect() as conn:
            months = [p.range_from for p in list_partitions(conn, made.schema, made.table)]
        for month in months:  # a row in every partition: row triggers fire per row
            if month is not None and month > NOW:
                made.insert(month, tenant="t3")
        made.expected = made.run("SELECT count(*) FROM {table}")[0][0]  # type: ignore[attr-defined]
        yield made


def _targets(made: Trail) -> list[sql.Composable]:
    """The table and, when partitioned, each of its partitions."""
    with made.connect() as conn:
        found = guards.tree(conn, made.schema, made.table)
    assert found
    return [qualified(schema, name) for _, schema, name, _ in found]


def test_update_delete_truncate_refused_everywhere(guarded: Trail) -> None:
    targets = _targets(guarded)
    with guarded.connect() as conn:  # a superuser: grants do not stop it, the guards do
        for target in targets:
            for statement in (
                sql.SQL("UPDATE {} SET action = 'changed'").format(target),
                sql.SQL("DELETE FROM {}").format(target),
                sql.SQL("TRUNCATE {}").format(target),
            ):
                assert refused(conn, statement) == "42501", statement.as_string(conn)
    expected = guarded.expected  # type: ignore[attr-defined]
    assert expected >= 2
    assert guarded.run("SELECT count(*), min(action), max(action) FROM {table}") == [
        (expected, "test.insert", "test.insert")
    ]


def test_replica_mode_does_not_silence_the_guards(guarded: Trail) -> None:
    with guarded.connect() as conn:
        conn.execute("SET session_replication_role = replica")
        for target in _targets(guarded):
            assert refused(conn, sql.SQL("DELETE FROM {}").format(target)) == "42501"
            assert refused(conn, sql.SQL("TRUNCATE {}").format(target)) == "42501"
    assert guarded.run("SELECT count(*) FROM {table}") == [(guarded.expected,)]  # type: ignore[attr-defined]


def test_every_guard_fires_always_and_no_insert_trigger(guarded: Trail) -> None:
    with guarded.connect() as conn:
        assert guards.unguarded(conn, guarded.schema, guarded.table) == []
        relids = [relid for relid, _, _, _ in guards.tree(conn, guarded.schema, guarded.table)]
    rows = guarded.run(
        "SELECT c.relname, g.tgname, g.tgenabled, g.tgtype FROM pg_trigger g "
        "JOIN pg_class c ON c.oid = g.tgrelid "
        "WHERE g.tgrelid = ANY(%s) AND NOT g.tgisinternal",
        relids,
    )
    # Both guards on the root; on each partition, the cloned row guard and its own TRUNCATE one.
    assert len(rows) == 2 * len(relids)
    assert {enabled for _, _, enabled, _ in rows} == {"A"}
    insert_bit = 1 << 2  # TRIGGER_TYPE_INSERT
    assert not [name for _, name, _, tgtype in rows if tgtype & insert_bit]


def test_a_month_created_later_is_guarded_too(pg_dsn: str) -> None:
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True)
        made.run(
            "SELECT {schema}.auditq_ensure_partition(%s, %s)",
            made.table,
            datetime(2031, 7, 4, tzinfo=UTC),
        )
        made.insert(datetime(2031, 7, 4, tzinfo=UTC))
        with made.connect() as conn:
            assert guards.unguarded(conn, made.schema, made.table) == []
            part = qualified(made.schema, f"{made.table}_p203107")
            assert refused(conn, sql.SQL("TRUNCATE {}").format(part)) == "42501"
            assert refused(conn, sql.SQL("DELETE FROM {}").format(part)) == "42501"


def test_bookkeeping_tables_are_append_only(guarded: Trail) -> None:
    with guarded.connect() as conn:
        for name in (VERSION_TABLE, RETENTION_TABLE):
            target = qualified(guarded.schema, name)
            assert refused(conn, sql.SQL("TRUNCATE {}").format(target)) == "42501"
        versions = qualified(guarded.schema, VERSION_TABLE)
        assert refused(conn, sql.SQL("DELETE FROM {}").format(versions)) == "42501"
        assert refused(conn, sql.SQL("UPDATE {} SET version = 99").format(versions)) == "42501"


def test_unguarded_create_is_only_for_scratch_tables(pg_dsn: str) -> None:
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, guarded=False)
        made.insert(NOW)
        with made.connect() as conn:
            assert len(guards.unguarded(conn, made.schema, made.table)) == 2
        made.run("TRUNCATE {table}")
        assert made.run("SELECT count(*) FROM {table}") == [(0,)]
