"""A partitioned table's batches go straight into their month's partition (auditq.routes),
and any trouble with the route falls back to the parent without losing, doubling or
dead-lettering a row.

Which table a COPY named is observed through statement-level AFTER INSERT triggers: one on
the parent fires for a COPY into the parent, one on the month fires only for a COPY that
named the month itself."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from psycopg import sql

from auditq import AuditWriter
from auditq.binary import _occurred_span_python, encode_block, occurred_span
from auditq.hooks import row_of
from auditq.partitions import (
    FUNCTION_VERSION,
    add_months,
    function_ddl,
    install_function,
    month_start,
)
from auditq.schema import create, qualified

from .trail_support import Trail, allow_login, trail

NOW = datetime.now(UTC)
THIS_MONTH = month_start(NOW)
NEXT_MONTH = add_months(THIS_MONTH, 1)


def _part(made: Trail, month: datetime) -> str:
    return f"{made.table}_p{month:%Y%m}"


def _count_copies(made: Trail, *months: datetime) -> None:
    """A `copies` table counting the COPY statements that named each relation."""
    s = sql.Identifier(made.schema)
    with made.connect() as conn:
        conn.execute(sql.SQL("CREATE TABLE {}.copies (rel text)").format(s))
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION {s}.count_copy() RETURNS trigger LANGUAGE plpgsql "
                "SECURITY DEFINER AS $$ BEGIN INSERT INTO {s}.copies VALUES (TG_TABLE_NAME); "
                "RETURN NULL; END $$"
            ).format(s=s)
        )
        for rel in (made.table, *(_part(made, m) for m in months)):
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER count_copy AFTER INSERT ON {} "
                    "FOR EACH STATEMENT EXECUTE FUNCTION {}.count_copy()"
                ).format(qualified(made.schema, rel), s)
            )


def _copies(made: Trail) -> dict[str, int]:
    with made.connect() as conn:
        found = conn.execute(
            sql.SQL("SELECT rel, count(*) FROM {}.copies GROUP BY rel").format(
                sql.Identifier(made.schema)
            )
        ).fetchall()
    return {str(rel): int(n) for rel, n in found}


def _rows_in(made: Trail, month: datetime) -> int:
    with made.connect() as conn:
        found = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(qualified(made.schema, _part(made, month)))
        ).fetchone()
    assert found is not None
    return int(found[0])


@pytest.fixture(params=["superuser", "writer role"])
def parted(request: pytest.FixtureRequest, pg_dsn: str) -> Iterator[tuple[Trail, str]]:
    """A partitioned table, and the DSN to write it with: the test's superuser, or the
    INSERT-only writer role of `init-db --roles`."""
    with trail(pg_dsn) as made:
        roles = made.roles if request.param == "writer role" else None
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True, roles=roles)
        if roles is not None:
            allow_login(made)
        _count_copies(made, THIS_MONTH, NEXT_MONTH)
        yield made, made.dsn_as(made.roles.writer) if roles else made.dsn


def _writer(dsn: str, made: Trail, **options: Any) -> AuditWriter:
    return AuditWriter(dsn, schema=made.schema, table=made.table, **options)


def test_a_months_batch_is_copied_into_its_partition(parted: tuple[Trail, str]) -> None:
    made, dsn = parted
    writer = _writer(dsn, made, flush_interval=0.05)
    try:
        for i in range(3000):
            assert writer.log("route.now", resource_id=str(i))
        assert writer.flush(timeout=30)
    finally:
        writer.close(timeout=10)
    stats = writer.stats()
    assert (stats.written, stats.dead_lettered) == (3000, 0)
    assert _rows_in(made, THIS_MONTH) == 3000
    copies = _copies(made)
    assert copies.get(_part(made, THIS_MONTH), 0) >= 1
    assert made.table not in copies  # no COPY went through the parent


def test_a_batch_spanning_months_goes_through_the_parent(parted: tuple[Trail, str]) -> None:
    made, dsn = parted
    writer = _writer(dsn, made, flush_interval=0.05)
    try:
        for i in range(200):
            stamp = (NOW, NEXT_MONTH)[i % 2]
            assert writer.log("route.span", occurred_at=stamp, resource_id=str(i))
        assert writer.flush(timeout=30)
    finally:
        writer.close(timeout=10)
    assert (writer.stats().written, writer.stats().dead_lettered) == (200, 0)
    assert (_rows_in(made, THIS_MONTH), _rows_in(made, NEXT_MONTH)) == (100, 100)
    assert _copies(made).get(made.table, 0) >= 1


def test_a_later_chunk_in_another_month_is_retried_through_the_parent(
    parted: tuple[Trail, str],
) -> None:
    """The route is chosen from a batch's first 1,000 rows; when a later chunk falls in
    another month the partition refuses the COPY (23514, no constraint named) and the whole
    batch goes through the parent at once: written exactly once, nothing dead-lettered."""
    made, dsn = parted
    # One batch: the writer sleeps until flush() (no wake-up before 5,000 rows).
    writer = _writer(dsn, made, flush_interval=30, batch_size=5000, wake_rows=5000)
    try:
        assert writer.flush(timeout=30)  # warmed up: the routes are read
        for i in range(2000):
            stamp = NOW if i < 1000 else NEXT_MONTH
            assert writer.log("route.later", occurred_at=stamp, resource_id=str(i))
        assert writer.flush(timeout=30)
    finally:
        writer.close(timeout=10)
    stats = writer.stats()
    assert (stats.written, stats.dead_lettered, stats.pending) == (2000, 0, 0)
    assert (_rows_in(made, THIS_MONTH), _rows_in(made, NEXT_MONTH)) == (1000, 1000)
    copies = _copies(made)
    assert copies.get(made.table, 0) >= 1
    with made.connect() as conn:
        distinct = conn.execute(
            sql.SQL("SELECT count(DISTINCT id) FROM {}").format(qualified(made.schema, made.table))
        ).fetchone()
    assert distinct == (2000,)


def test_a_revoked_partition_falls_back_to_the_parent(pg_dsn: str) -> None:
    """INSERT on the month revoked while the writer runs (its routes were read before):
    the routed COPY is refused (42501), the batch goes through the parent, and the writer
    does not treat it as an outage."""
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True, roles=made.roles)
        allow_login(made)
        _count_copies(made, THIS_MONTH)
        writer = _writer(made.dsn_as(made.roles.writer), made, flush_interval=0.05)
        try:
            assert writer.log("route.before")
            assert writer.flush(timeout=30)
            assert _copies(made) == {_part(made, THIS_MONTH): 1}
            with made.connect() as conn:
                conn.execute(
                    sql.SQL("REVOKE INSERT ON {} FROM {}").format(
                        qualified(made.schema, _part(made, THIS_MONTH)),
                        sql.Identifier(made.roles.writer),
                    )
                )
            for i in range(500):
                assert writer.log("route.after", resource_id=str(i))
            assert writer.flush(timeout=30)
        finally:
            writer.close(timeout=10)
        stats = writer.stats()
        assert (stats.written, stats.dead_lettered, stats.retries) == (501, 0, 0)
        assert _rows_in(made, THIS_MONTH) == 501
        assert _copies(made).get(made.table, 0) >= 1


def test_a_new_month_is_granted_to_the_parents_inserters(pg_dsn: str) -> None:
    """The partition function gives a month it creates the parent's INSERT grants (and no
    others), so the writer role may copy into it."""
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True, roles=made.roles)
        far = datetime(2031, 7, 1, tzinfo=UTC)
        with made.connect() as conn:
            conn.execute(
                sql.SQL("SELECT {}.auditq_ensure_partition(%s, %s)").format(
                    sql.Identifier(made.schema)
                ),
                (made.table, far),
            )
            grants = conn.execute(
                "SELECT grantee::regrole::text, privilege_type "
                "FROM pg_class c, aclexplode(c.relacl) a "
                "WHERE c.oid = to_regclass(%s) AND a.grantee <> c.relowner",
                (f'"{made.schema}"."{made.table}_p203107"',),
            ).fetchall()
        assert grants == [(made.roles.writer, "INSERT")]


def test_unpartitioned_tables_are_not_routed(pg_dsn: str) -> None:
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table)
        writer = _writer(made.dsn, made, flush_interval=0.05)
        try:
            for i in range(100):
                assert writer.log("route.plain", resource_id=str(i))
            assert writer.flush(timeout=30)
        finally:
            writer.close(timeout=10)
        assert writer.stats().written == 100
        assert made.run("SELECT count(*) FROM {table}") == [(100,)]


def test_occurred_span_reads_every_tuple() -> None:
    stamps = [datetime(2026, m, 3, tzinfo=UTC) for m in (5, 2, 9)]
    kept: list[Any] = []
    bad: list[Any] = []
    data = encode_block([row_of({"action": "a", "occurred_at": s}) for s in stamps], kept, bad)
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    want = tuple(
        (s - epoch) // (datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - epoch)
        for s in (min(stamps), max(stamps))
    )
    assert occurred_span(data) == want
    assert _occurred_span_python(data) == want
    for broken in (b"", data[:-3], b"\x00\x01" + data[2:]):
        assert occurred_span(broken) is None
        assert _occurred_span_python(broken) is None


def test_an_older_partition_function_is_replaced(pg_dsn: str) -> None:
    """`install_function` (init-db, migrate, --roles) replaces a function without the
    current version's marker, so months made after an upgrade get the writer's INSERT."""
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True)
        with made.connect() as conn:
            older = function_ddl(made.schema).as_string(conn).replace(FUNCTION_VERSION, "v1")
            conn.execute(older.encode())
            install_function(conn, made.schema)
            source = conn.execute(
                "SELECT prosrc FROM pg_proc WHERE oid = %s::regprocedure",
                (f'"{made.schema}".auditq_ensure_partition(text,timestamptz)',),
            ).fetchone()
        assert source is not None and FUNCTION_VERSION in source[0]


def test_a_new_month_is_not_granted_to_a_role_the_parents_policy_binds(pg_dsn: str) -> None:
    """Under row-level security a partition (which has no policy) is granted only to the
    parent's inserters that bypass it: a role the parent's policies bind, or PUBLIC, would
    otherwise insert into the month what the parent refuses."""
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True, roles=made.roles)
        bound = made.roles.reader  # subject to row-level security
        with made.connect() as conn:
            target = qualified(made.schema, made.table)
            conn.execute(
                sql.SQL("GRANT INSERT ON {} TO {}, PUBLIC").format(target, sql.Identifier(bound))
            )
            conn.execute(
                sql.SQL("SELECT {}.auditq_ensure_partition(%s, %s)").format(
                    sql.Identifier(made.schema)
                ),
                (made.table, datetime(2031, 8, 1, tzinfo=UTC)),
            )
            grants = conn.execute(
                "SELECT CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE grantee::regrole::text END "
                "FROM pg_class c, aclexplode(c.relacl) a "
                "WHERE c.oid = to_regclass(%s) AND a.grantee <> c.relowner",
                (f'"{made.schema}"."{made.table}_p203108"',),
            ).fetchall()
        assert grants == [(made.roles.writer,)]


def test_a_partition_bounded_by_infinity_does_not_stop_the_writer(pg_dsn: str) -> None:
    """A hand-made partition up to 'infinity' (a bound Python cannot load) is left out of
    the routes; batches of the other months are still routed, and nothing waits or fails."""
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True)
        _count_copies(made, THIS_MONTH)
        with made.connect() as conn:
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ('2090-01-01') TO ('infinity')"
                ).format(
                    qualified(made.schema, f"{made.table}_far"),
                    qualified(made.schema, made.table),
                )
            )
        writer = _writer(made.dsn, made, flush_interval=0.05)
        try:
            for i in range(300):
                assert writer.log("route.infinity", resource_id=str(i))
            assert writer.flush(timeout=30)
            assert writer.log("route.far", occurred_at=datetime(2095, 1, 1, tzinfo=UTC))
            assert writer.flush(timeout=30)
        finally:
            writer.close(timeout=10)
        stats = writer.stats()
        assert (stats.written, stats.dead_lettered, stats.retries) == (301, 0, 0)
        assert _rows_in(made, THIS_MONTH) == 300
        assert _copies(made).get(_part(made, THIS_MONTH), 0) >= 1
