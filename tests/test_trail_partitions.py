"""Monthly partitions: created ahead, a missing month created when a batch needs it (not a
poison row), the `partitions` listing, and retention by dropping whole partitions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from psycopg import sql

from auditq import AuditWriter
from auditq.binary import encode_chunk
from auditq.cli import main
from auditq.entry import COLUMNS
from auditq.partitions import (
    add_months,
    ensure_partition_sql,
    list_partitions,
    month_start,
    months_of,
)
from auditq.retention import Keep, RetentionError, parse_keep
from auditq.schema import RETENTION_TABLE, create, qualified

from .trail_support import Trail, allow_login, trail, unique_name

NOW = datetime.now(UTC)


@pytest.fixture
def parted(pg_dsn: str) -> Iterator[Trail]:
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True)
        yield made


def _cli(made: Trail, *args: str) -> int:
    try:
        return main([*args, "--dsn", made.dsn, "--schema", made.schema, "--table", made.table])
    except SystemExit as exc:  # argparse's own refusals
        return int(exc.code or 0)


def test_init_creates_this_month_and_three_ahead(parted: Trail) -> None:
    with parted.connect() as conn:
        parts = list_partitions(conn, parted.schema, parted.table)
        key = conn.execute(
            "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = to_regclass(%s) AND i.indisprimary",
            (f'"{parted.schema}"."{parted.table}"',),
        ).fetchone()
    start = month_start(NOW)
    assert [p.range_from for p in parts] == [add_months(start, n) for n in range(4)]
    assert [p.range_to for p in parts] == [add_months(start, n) for n in range(1, 5)]
    assert key == (["id", "occurred_at"],)


def test_occurred_at_offset_matches_the_encoder() -> None:
    stamps = [
        datetime(2029, 2, 28, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2029, 3, 1, tzinfo=UTC),
    ]
    rows = []
    for stamp in stamps:
        values: dict[str, object] = dict.fromkeys(COLUMNS)
        values.update(action="x", occurred_at=stamp)
        rows.append(tuple(values[c] for c in COLUMNS))
    items: list[tuple[bytes, object]] = []
    bad: list[object] = []
    encode_chunk(rows, items, bad)  # type: ignore[arg-type]
    assert not bad
    assert months_of(item[0] for item in items) == [
        datetime(2029, 2, 1, tzinfo=UTC),
        datetime(2029, 3, 1, tzinfo=UTC),
    ]


def test_a_batch_for_missing_months_is_written_whole(parted: Trail) -> None:
    """23514 "no partition" fails the whole COPY: the writer creates the months and
    retries; nothing is dead-lettered as a bad row."""
    writer = AuditWriter(parted.dsn, schema=parted.schema, table=parted.table, flush_interval=0.05)
    past, future = datetime(2019, 6, 30, 23, 0, tzinfo=UTC), datetime(2034, 1, 1, 0, 0, tzinfo=UTC)
    try:
        for i in range(200):
            stamp = (past, future, NOW)[i % 3]
            assert writer.log("part.write", occurred_at=stamp, resource_id=str(i))
        assert writer.flush(timeout=30)
    finally:
        writer.close(timeout=10)
    stats = writer.stats()
    assert (stats.written, stats.dead_lettered) == (200, 0)
    with parted.connect() as conn:
        parts = {p.name: p.rows for p in list_partitions(conn, parted.schema, parted.table)}
    assert parts[f"{parted.table}_p201906"] == 67
    assert parts[f"{parted.table}_p203401"] == 67
    assert parts[f"{parted.table}_p{NOW:%Y%m}"] == 66


def test_the_month_function_is_idempotent_and_refuses_other_tables(parted: Trail) -> None:
    call = ensure_partition_sql(parted.schema, parted.table)
    with parted.connect() as conn:
        first = conn.execute(call, (datetime(2030, 5, 9, tzinfo=UTC),)).fetchone()
        again = conn.execute(call, (datetime(2030, 5, 31, 23, tzinfo=UTC),)).fetchone()
        assert first == again == (f"{parted.table}_p203005",)
        conn.execute(sql.SQL("CREATE TABLE {} (id int)").format(qualified(parted.schema, "other")))
        other = ensure_partition_sql(parted.schema, "other")
        with pytest.raises(Exception, match="not a partitioned auditq table"):
            conn.execute(other, (NOW,))


def test_partitions_command_lists_rows_and_sizes(
    parted: Trail, capsys: pytest.CaptureFixture[str]
) -> None:
    parted.insert(NOW)
    parted.insert(NOW)
    assert _cli(parted, "partitions", "--json") == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(listed) == 4
    assert listed[0]["partition"] == f"{parted.table}_p{NOW:%Y%m}"
    assert listed[0]["rows"] == 2 and not listed[0]["estimated"]
    assert all(p["bytes"] > 0 for p in listed)
    assert _cli(parted, "partitions", "--create-ahead", "6") == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 7
    assert "rows" in out


def _old_months(made: Trail, months: int) -> None:
    """Partitions and rows for each of the last `months` months (as the superuser)."""
    call = ensure_partition_sql(made.schema, made.table)
    with made.connect() as conn:
        for back in range(1, months + 1):
            month = add_months(month_start(NOW), -back)
            conn.execute(call, (month,))
    for back in range(1, months + 1):
        made.insert(add_months(month_start(NOW), -back) + timedelta(days=3))


def test_retention_drops_old_partitions_and_records_each(
    parted: Trail, capsys: pytest.CaptureFixture[str]
) -> None:
    _old_months(parted, 16)
    parted.insert(NOW)
    before = parted.run("SELECT count(*) FROM {table}")[0][0]
    assert before == 17
    assert _cli(parted, "retention", "--keep", "13mo", "--dry-run") == 0
    out = capsys.readouterr().out
    cutoff = Keep("13mo", 13, 0).cutoff(datetime.now(UTC))
    expected = [
        f"{parted.table}_p{add_months(month_start(NOW), -back):%Y%m}"
        for back in range(16, 0, -1)
        if add_months(month_start(NOW), -back + 1) <= cutoff
    ]
    assert len(expected) in (3, 4)
    assert [line.split()[4].split(".")[1] for line in out.splitlines()] == expected
    assert parted.run("SELECT count(*) FROM {table}") == [(before,)]  # dry run: nothing gone
    assert _cli(parted, "retention", "--keep", "13mo") == 0
    assert parted.run("SELECT count(*) FROM {table}") == [(before - len(expected),)]
    log = parted.run(
        "SELECT partition_name, row_count, keep, dropped_by, range_to <= %s "
        f"FROM {{schema}}.{RETENTION_TABLE} ORDER BY range_from",
        cutoff,
    )
    assert [(name, count, keep, ok) for name, count, keep, _, ok in log] == [
        (name, 1, "13mo", True) for name in expected
    ]
    with parted.connect() as conn:
        left = [p.name for p in list_partitions(conn, parted.schema, parted.table)]
    assert not set(expected) & set(left)
    # Again: nothing more to drop.
    assert _cli(parted, "retention", "--keep", "13mo") == 0
    assert "nothing older" in capsys.readouterr().out


def test_retention_is_for_the_owner_only(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True, roles=made.roles)
        allow_login(made)
        _old_months(made, 15)
        for role in (made.roles.writer, made.roles.reader):
            status = main(
                [
                    "retention",
                    "--keep",
                    "1y",
                    "--dsn",
                    made.dsn_as(role),
                    "--schema",
                    made.schema,
                    "--table",
                    made.table,
                ]
            )
            err = capsys.readouterr().err
            assert status == 2, err
            assert "must run as the owner" in err and len(err.strip().splitlines()) == 1
        assert made.run("SELECT count(*) FROM {table}") == [(15,)]
        # A login that is a member of the owner role may, and the record names both.
        admin = unique_name("h2t_admin")
        with made.connect() as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    sql.Identifier(admin), sql.Identifier(made.roles.owner)
                )
            )
        try:
            status = main(
                [
                    "retention",
                    "--keep",
                    "1y",
                    "--dsn",
                    made.dsn_as(admin),
                    "--schema",
                    made.schema,
                    "--table",
                    made.table,
                ]
            )
            assert status == 0, capsys.readouterr().err
            who = made.run(
                f"SELECT DISTINCT dropped_by, session_user_name FROM {{schema}}.{RETENTION_TABLE}"
            )
            assert who == [(made.roles.owner, admin)]
        finally:
            with made.connect() as conn:
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(admin)))


def test_retention_refuses_a_plain_table_and_bad_periods(
    pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table)
        made.insert(NOW - timedelta(days=900))
        assert _cli(made, "retention", "--keep", "1mo") == 2
        err = capsys.readouterr().err
        assert "not partitioned" in err and len(err.strip().splitlines()) == 1
        for bad in ("13", "13m", "0mo", "-1y", "mo", "13 months", "1y 2mo"):
            assert _cli(made, "retention", "--keep", bad) == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and "--keep" in err, (bad, err)
        assert made.run("SELECT count(*) FROM {table}") == [(1,)]


@pytest.mark.parametrize(
    "text, months, days",
    [
        ("13mo", 13, 0),
        ("1y", 12, 0),
        ("1y6mo", 18, 0),
        ("400d", 0, 400),
        ("2w", 0, 14),
        ("1Y2MO3D", 14, 3),
    ],
)
def test_keep_parses(text: str, months: int, days: int) -> None:
    keep = parse_keep(text)
    assert (keep.months, keep.days) == (months, days)


def test_keep_cutoff_is_calendar_months() -> None:
    assert Keep("13mo", 13, 0).cutoff(datetime(2026, 3, 31, 12, tzinfo=UTC)) == datetime(
        2025, 2, 28, 12, tzinfo=UTC
    )
    with pytest.raises(RetentionError):
        parse_keep("0d")
