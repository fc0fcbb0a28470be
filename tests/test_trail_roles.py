"""Roles: the INSERT-only writer (COPY and the idempotent replay under row-level security),
the tenant-scoped reader, refused rights, idempotence, and existing roles with other rights."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from auditq import AuditWriter
from auditq.cli import main
from auditq.partitions import is_partitioned, list_partitions
from auditq.roles import RoleError, RoleNames, apply
from auditq.schema import create, qualified

from .faults.proxy import COPY_DONE_MESSAGE, Proxy
from .trail_support import Trail, allow_login, refused, trail


@pytest.fixture(params=["plain", "partitioned"])
def roled(request: pytest.FixtureRequest, pg_dsn: str) -> Iterator[Trail]:
    with trail(pg_dsn) as made:
        create(
            pg_dsn,
            schema=made.schema,
            table=made.table,
            partitioned=request.param == "partitioned",
            roles=made.roles,
        )
        allow_login(made)
        yield made


def _writer(made: Trail, dsn: str | None = None, **options: Any) -> AuditWriter:
    return AuditWriter(
        dsn or made.dsn_as(made.roles.writer),
        schema=made.schema,
        table=made.table,
        flush_interval=0.05,
        **options,
    )


def test_the_writer_role_writes_through_copy_under_rls(roled: Trail) -> None:
    writer = _writer(roled)
    try:
        for i in range(300):
            assert writer.log("role.write", tenant_id=f"t{i % 3}", resource_id=str(i))
        assert writer.flush(timeout=30)
    finally:
        writer.close(timeout=10)
    stats = writer.stats()
    assert (stats.written, stats.dead_lettered) == (300, 0)
    assert roled.run("SELECT count(*) FROM {table}") == [(300,)]


def test_the_writer_role_cannot_change_or_unguard(roled: Trail) -> None:
    roled.insert(datetime.now(UTC), tenant="t1")
    table = qualified(roled.schema, roled.table)
    with roled.connect(roled.roles.writer) as conn:
        assert refused(conn, sql.SQL("UPDATE {} SET action = 'x'").format(table)) == "42501"
        assert refused(conn, sql.SQL("DELETE FROM {}").format(table)) == "42501"
        assert refused(conn, sql.SQL("TRUNCATE {}").format(table)) == "42501"
        for trigger in ("auditq_append_only", "auditq_no_truncate"):
            statement = sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(
                table, sql.Identifier(trigger)
            )
            assert refused(conn, statement) == "42501"  # must be owner
        assert refused(conn, sql.SQL("ALTER TABLE {} DISABLE TRIGGER ALL").format(table)) == "42501"
        assert refused(conn, "SET session_replication_role = replica") == "42501"
        assert refused(conn, sql.SQL("DROP TABLE {}").format(table)) == "42501"
        assert (
            refused(conn, sql.SQL("ALTER TABLE {} DISABLE ROW LEVEL SECURITY").format(table))
            == "42501"
        )
        with roled.connect() as admin:
            parts = list_partitions(admin, roled.schema, roled.table)
        for part in parts:  # partitions grant the writer INSERT only
            target = qualified(roled.schema, part.name)
            assert refused(conn, sql.SQL("TRUNCATE {}").format(target)) == "42501"
            disable = sql.SQL("ALTER TABLE {} DISABLE TRIGGER auditq_no_truncate").format(target)
            assert refused(conn, disable) == "42501"
            assert refused(conn, sql.SQL("SELECT 1 FROM {}").format(target)) == "42501"
            assert refused(conn, sql.SQL("DELETE FROM {}").format(target)) == "42501"
            assert refused(conn, sql.SQL("UPDATE {} SET action = 'x'").format(target)) == "42501"
    assert roled.run("SELECT count(*) FROM {table}") == [(1,)]


def test_the_reader_sees_only_its_tenant(roled: Trail) -> None:
    now = datetime.now(UTC)
    for tenant in ("acme", "acme", "globex", None):
        roled.insert(now, tenant=tenant)
    table = qualified(roled.schema, roled.table)
    count = sql.SQL("SELECT count(*) FROM {}").format(table)
    with roled.connect(roled.roles.reader) as conn:
        assert conn.execute(count).fetchone() == (0,)  # no tenant set: nothing
        conn.execute("SET auditq.tenant = 'acme'")
        assert conn.execute(count).fetchone() == (2,)
        conn.execute("SET auditq.tenant = 'globex'")
        assert conn.execute(count).fetchone() == (1,)
        conn.execute("SET auditq.tenant = ''")
        assert conn.execute(count).fetchone() == (0,)
        conn.execute("SET auditq.tenant = 'acme'")
        rows = []
        with conn.cursor().copy(
            sql.SQL("COPY (SELECT tenant_id FROM {}) TO STDOUT").format(table)
        ) as copy:
            rows = [bytes(row) for row in copy]
        assert b"".join(rows) == b"acme\nacme\n"
        assert (
            refused(
                conn,
                sql.SQL(
                    "INSERT INTO {} (id, occurred_at, action, tenant_id) "
                    "VALUES (gen_random_uuid(), now(), 'x', 'acme')"
                ).format(table),
            )
            == "42501"
        )
        assert refused(conn, sql.SQL("DELETE FROM {}").format(table)) == "42501"
    # The writer bypasses the policy (BYPASSRLS): COPY FROM needs that, and it reads back
    # every tenant's ids for the replay.
    with roled.connect(roled.roles.writer) as conn:
        assert conn.execute(count).fetchone() == (4,)


def test_a_role_subject_to_rls_cannot_copy_in(roled: Trail) -> None:
    """Why the writer has BYPASSRLS: PostgreSQL refuses COPY FROM under row-level security."""
    with roled.connect() as admin:
        admin.execute(
            sql.SQL("ALTER ROLE {} NOBYPASSRLS").format(sql.Identifier(roled.roles.writer))
        )
    copy_in = sql.SQL("COPY {} (id, occurred_at, action) FROM STDIN").format(
        qualified(roled.schema, roled.table)
    )
    row = ("01890000-0000-7000-8000-000000000001", datetime.now(UTC), "x")
    with (
        roled.connect(roled.roles.writer) as conn,
        conn.cursor() as cur,
        pytest.raises(psycopg.errors.FeatureNotSupported),
        cur.copy(copy_in) as copy,
    ):
        copy.write_row(row)
    with roled.connect() as admin:  # init-db --roles again restores it
        apply(admin, roled.schema, roled.table, roled.roles)
        assert admin.execute(
            "SELECT rolbypassrls FROM pg_roles WHERE rolname = %s", (roled.roles.writer,)
        ).fetchone() == (True,)


def test_the_replay_works_with_the_insert_only_role(roled: Trail) -> None:
    """A commit whose reply is lost: the writer replays the batch through a TEMP staging
    table and INSERT ... ON CONFLICT DO NOTHING, as the writer role, without duplicates."""
    with Proxy(roled.dsn_as(roled.roles.writer)) as proxy:
        writer = _writer(roled, proxy.dsn, batch_size=500, retry_backoff_max=0.5)
        try:
            assert writer.log("role.warmup")
            assert writer.flush(timeout=30)
            proxy.cut_on(COPY_DONE_MESSAGE, forward=True, times=1)
            for i in range(500):
                assert writer.log("role.replay", resource_id=str(i))
            assert writer.flush(timeout=60)
            assert proxy.triggered == 1
        finally:
            writer.close(timeout=10)
    stats = writer.stats()
    assert stats.retries >= 1
    assert (stats.written, stats.dead_lettered) == (501, 0)
    assert roled.run("SELECT count(*), count(DISTINCT id) FROM {table}") == [(501, 501)]


def test_a_duplicate_id_is_settled_by_the_insert_only_role(roled: Trail) -> None:
    """The dedupe path (COPY refused with 23505) also goes through the staging table."""
    from auditq import AuditEntry

    entry = AuditEntry(action="role.dup", tenant_id="t1")
    writer = _writer(roled)
    try:
        assert writer.write(entry)
        assert writer.flush(timeout=30)
        assert writer.write(entry)
        assert writer.log("role.after")
        assert writer.flush(timeout=30)
    finally:
        writer.close(timeout=10)
    stats = writer.stats()
    assert (stats.written, stats.dead_lettered) == (2, 1)
    assert roled.run("SELECT count(*) FROM {table}") == [(2,)]


def test_roles_are_idempotent(roled: Trail) -> None:
    with roled.connect() as conn:
        layout = ["--partitioned"] if is_partitioned(conn, roled.schema, roled.table) else []
    for _ in range(2):
        assert (
            main(
                [
                    "init-db",
                    "--dsn",
                    roled.dsn,
                    "--schema",
                    roled.schema,
                    "--table",
                    roled.table,
                    *layout,
                    "--roles",
                    "--role-prefix",
                    roled.schema,
                ]
            )
            == 0
        )
    writer = _writer(roled)
    try:
        assert writer.log("role.again")
        assert writer.flush(timeout=30)
    finally:
        writer.close(timeout=10)
    assert writer.stats().written == 1


@pytest.mark.parametrize(
    "extra", ["CREATEDB", "SUPERUSER", "member", "login-owner", "bypass-reader"]
)
def test_a_role_with_other_rights_is_refused(
    pg_dsn: str, extra: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with trail(pg_dsn) as made:
        names = made.roles
        with made.connect() as conn:
            if extra == "member":
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(names.owner)))
                conn.execute(
                    sql.SQL("CREATE ROLE {} NOLOGIN IN ROLE {}").format(
                        sql.Identifier(names.writer), sql.Identifier(names.owner)
                    )
                )
            elif extra == "login-owner":
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(names.owner)))
            elif extra == "bypass-reader":
                conn.execute(
                    sql.SQL("CREATE ROLE {} BYPASSRLS").format(sql.Identifier(names.reader))
                )
            else:
                conn.execute(
                    sql.SQL("CREATE ROLE {} " + extra).format(sql.Identifier(names.writer))  # type: ignore[operator]
                )
        status = main(
            [
                "init-db",
                "--dsn",
                made.dsn,
                "--schema",
                made.schema,
                "--table",
                made.table,
                "--roles",
                "--role-prefix",
                made.schema,
            ]
        )
        err = capsys.readouterr().err
        assert status == 2
        assert len(err.strip().splitlines()) == 1, err
        assert "auditq init-db: role h2t_" in err
        with made.connect() as conn:
            with pytest.raises(RoleError):
                apply(
                    conn,
                    made.schema,
                    made.table,
                    RoleNames(names.owner, names.writer, names.reader),
                )
            # Refused before anything changed: the table was created, but not given away.
            owner = conn.execute(
                "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = to_regclass(%s)",
                (f'"{made.schema}"."{made.table}"',),
            ).fetchone()
            assert owner is None or owner[0] != names.owner


def test_partitioned_writes_create_a_missing_month_as_the_writer(pg_dsn: str) -> None:
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True, roles=made.roles)
        allow_login(made)
        far = datetime(2033, 3, 15, 12, tzinfo=UTC)
        writer = _writer(made)
        try:
            for i in range(50):
                assert writer.log("role.future", occurred_at=far, resource_id=str(i))
                assert writer.log("role.now", resource_id=str(i))
            assert writer.flush(timeout=30)
        finally:
            writer.close(timeout=10)
        assert (writer.stats().written, writer.stats().dead_lettered) == (100, 0)
        with made.connect() as conn:
            parts = {p.name: p for p in list_partitions(conn, made.schema, made.table)}
            owner = conn.execute(
                "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = to_regclass(%s)",
                (f'"{made.schema}"."{made.table}_p203303"',),
            ).fetchone()
        assert parts[f"{made.table}_p203303"].rows == 50
        assert owner == (made.roles.owner,)  # made by the owner's function, not the writer


def test_a_month_the_writer_cannot_create_waits_and_is_not_lost(pg_dsn: str) -> None:
    """If the month cannot be created (here: EXECUTE revoked), the batch is retried with
    backoff, not dead-lettered; once the function may run again, it is written."""
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True, roles=made.roles)
        allow_login(made)
        function = sql.SQL("{}.auditq_ensure_partition(text, timestamptz)").format(
            sql.Identifier(made.schema)
        )
        writer_role = sql.Identifier(made.roles.writer)
        made.run(
            sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM {}")
            .format(function, writer_role)
            .as_string(None)
        )
        writer = _writer(made, retry_backoff_max=0.2)
        try:
            for i in range(10):
                assert writer.log(
                    "role.blocked", occurred_at=datetime(2035, 1, 2, tzinfo=UTC), resource_id=str(i)
                )
            assert not writer.flush(timeout=1.5)
            stats = writer.stats()
            assert (stats.written, stats.dead_lettered, stats.pending) == (0, 0, 10)
            assert stats.retries >= 1
            made.run(
                sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}")
                .format(function, writer_role)
                .as_string(None)
            )
            assert writer.flush(timeout=30)
        finally:
            writer.close(timeout=10)
        assert (writer.stats().written, writer.stats().dead_lettered) == (10, 0)
        assert made.run("SELECT count(*) FROM {table}") == [(10,)]


def test_two_writers_need_the_same_missing_month(pg_dsn: str) -> None:
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True, roles=made.roles)
        allow_login(made)
        month = datetime(2036, 6, 6, tzinfo=UTC)
        writers = [_writer(made), _writer(made)]
        try:
            for writer in writers:
                assert writer.log("role.first")  # both connected before the race
            for writer in writers:
                assert writer.flush(timeout=30)
            for i in range(100):
                for writer in writers:
                    assert writer.log("role.race", occurred_at=month, resource_id=str(i))
            for writer in writers:
                assert writer.flush(timeout=30)
        finally:
            for writer in writers:
                writer.close(timeout=10)
        assert [(w.stats().written, w.stats().dead_lettered) for w in writers] == [(101, 0)] * 2
        with made.connect() as conn:
            parts = {p.name: p.rows for p in list_partitions(conn, made.schema, made.table)}
        assert parts[f"{made.table}_p203606"] == 200
