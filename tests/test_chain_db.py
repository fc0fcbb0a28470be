"""The hash chain's database side: `auditq migrate` from version 2 to 3, the chain's roles
and grants, and `auditq retention` signing what it drops so that `verify` reports PURGED,
not MISSING (docs/tamper-evidence.md)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from auditq import chain_schema, guards, partitions
from auditq.chain import ChainStream
from auditq.checkpoint import keygen, make_checkpoint, write_private
from auditq.cli import main
from auditq.migrate import migrate, to_partitioned
from auditq.proofs import verify_export
from auditq.tables import (
    SCHEMA_VERSION,
    check_version,
    ensure_meta,
    lock,
    qualified,
    record_version,
    table_ddl,
)
from auditq.verify import Finding, Options, Summary, verify

from .chain_build import Chained, make_row
from .trail_support import Trail, allow_login, refused, trail

NOW = datetime.now(UTC)


def make_version_2(conn: psycopg.Connection[object], schema: str, table: str, parted: bool) -> None:
    """The table exactly as version 2's `init-db` made it (no chain), recorded as version 2."""
    layout = "partitioned" if parted else "plain"
    with conn.transaction():
        ensure_meta(conn, schema)
        lock(conn, f"{schema}.{table}")
        for statement in table_ddl(schema, table, layout)[1:]:
            conn.execute(statement)
        record_version(conn, schema, table, layout, "created by auditq init-db", version=2)
        if parted:
            partitions.install_function(conn, schema)
        guards.install(conn, schema, table)
    if parted:
        with conn.transaction():
            partitions.create_ahead(conn, schema, table, 3)


def _chain_columns(made: Trail, relation: str) -> list[tuple[str, str]]:
    return [
        (str(a), str(b))
        for a, b in made.run(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attname LIKE 'chain%%' AND NOT attisdropped "
            "ORDER BY attnum",
            f'"{made.schema}"."{relation}"',
        )
    ]


def _indexed(made: Trail, relation: str) -> bool:
    """Whether `relation` has a valid index on exactly (chain_stream, chain_pos)."""
    rows = made.run(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indrelid = %s::regclass AND "
        "(SELECT array_agg(a.attname::text ORDER BY k.n) FROM unnest(i.indkey) WITH "
        "ORDINALITY k(attnum, n) JOIN pg_attribute a ON a.attrelid = i.indrelid "
        "AND a.attnum = k.attnum) = ARRAY['chain_stream', 'chain_pos']",
        f'"{made.schema}"."{relation}"',
    )
    return rows == [(True,)]


@pytest.mark.parametrize("parted", [False, True], ids=["plain", "partitioned"])
def test_migrate_adds_the_chain_to_a_version_2_table(pg_dsn: str, parted: bool) -> None:
    with trail(pg_dsn) as made:
        with made.connect() as conn:
            make_version_2(conn, made.schema, made.table, parted)
            made.insert(NOW, tenant="t1")  # a row written before the chain: stays valid
            behind = check_version(conn, made.schema, made.table)
            assert behind is not None and "version 2" in behind and "auditq migrate" in behind
            assert chain_schema.missing_pieces(conn, made.schema, made.table) != []
            report = migrate(conn, made.schema, made.table)
            assert [s.split(":")[0] for s in report.steps] == [
                "added the hash chain",
                f"recorded schema version {SCHEMA_VERSION}",
            ], report.steps
            assert SCHEMA_VERSION == 3
            assert check_version(conn, made.schema, made.table) is None
            assert chain_schema.missing_pieces(conn, made.schema, made.table) == []
            # Idempotent: a second run does nothing and records nothing.
            assert migrate(conn, made.schema, made.table).steps == []
            listed = partitions.list_partitions(conn, made.schema, made.table) if parted else []
        assert _chain_columns(made, made.table) == [
            ("chain_stream", "uuid"),
            ("chain_pos", "bigint"),
        ]
        assert _indexed(made, made.table)
        for part in listed:  # the parent's columns and index reach every partition
            assert _chain_columns(made, part.name) == _chain_columns(made, made.table)
            assert _indexed(made, part.name), part.name
        assert len(listed) == (4 if parted else 0)
        versions = made.run(
            "SELECT version FROM {schema}.auditq_schema_version WHERE table_name = %s "
            "ORDER BY applied_at",
            made.table,
        )
        assert versions == [(2,), (3,)]
        for name in chain_schema.chain_tables(made.table):
            assert made.run("SELECT count(*) FROM {schema}." + f'"{name}"') == [(0,)]
        # The chain tables are append-only from the start, for the owner too.
        with made.connect() as conn:
            digests = chain_schema.q(made.schema, chain_schema.digests_table(made.table))
            assert refused(conn, sql.SQL("TRUNCATE {}").format(digests)) == "42501"
        # The migrated table takes chained batches and verifies clean; the old row is
        # counted as unchained, not called EXTRA (it was written before the chain began).
        chained = Chained(pg_dsn, made.schema, made.table)
        stream = ChainStream()
        chained.write(stream, [make_row(i, at_ns=int(NOW.timestamp()) * 10**9) for i in range(5)])
        summary, found = _verify(chained)
        assert [f.kind for f in found] == ["UNANCHORED"] and not summary.damaged
        assert (summary.rows, summary.unchained_rows) == (5, 1)


def test_migrate_to_partitioned_keeps_the_chain_index_on_the_parent(pg_dsn: str) -> None:
    with trail(pg_dsn) as made:
        with made.connect() as conn:
            make_version_2(conn, made.schema, made.table, False)
            made.insert(NOW)
            to_partitioned(conn, made.schema, made.table)
            assert chain_schema.missing_pieces(conn, made.schema, made.table) == []
            assert migrate(conn, made.schema, made.table).steps == []
            listed = partitions.list_partitions(conn, made.schema, made.table)
        assert _indexed(made, made.table)
        assert listed[0].name == f"{made.table}_legacy"
        for part in listed:
            assert _indexed(made, part.name), part.name


def test_migrate_repairs_a_disabled_chain_guard(pg_dsn: str) -> None:
    with trail(pg_dsn) as made, made.connect() as conn:
        make_version_2(conn, made.schema, made.table, False)
        migrate(conn, made.schema, made.table)
        digests = chain_schema.q(made.schema, chain_schema.digests_table(made.table))
        conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(digests))
        missing = chain_schema.missing_pieces(conn, made.schema, made.table)
        assert missing == [f"append-only guards on {chain_schema.digests_table(made.table)}"]
        assert migrate(conn, made.schema, made.table).steps == [
            f"added the hash chain: {missing[0]}"
        ]
        assert refused(conn, sql.SQL("TRUNCATE {}").format(digests)) == "42501"


# -- roles -----------------------------------------------------------------------------------


def test_init_db_roles_grant_the_chain(
    pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with trail(pg_dsn) as made:
        args = ["--dsn", pg_dsn, "--schema", made.schema, "--table", made.table]
        assert (
            main(["init-db", "--partitioned", *args, "--roles", "--role-prefix", made.schema]) == 0
        )
        out = capsys.readouterr().out
        assert made.roles.checkpointer and made.roles.verifier
        assert made.roles.checkpointer in out and made.roles.verifier in out
        allow_login(made)
        digests = chain_schema.q(made.schema, chain_schema.digests_table(made.table))
        checkpoints = chain_schema.q(made.schema, chain_schema.checkpoints_table(made.table))
        for name in chain_schema.chain_tables(made.table):
            owner = made.run(
                "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s::regclass",
                f'"{made.schema}"."{name}"',
            )
            assert owner == [(made.roles.owner,)]
        # The INSERT-only writer writes chained batches with their digests...
        as_writer = Chained(made.dsn_as(made.roles.writer), made.schema, made.table)
        stream = ChainStream()
        at = int(NOW.timestamp()) * 10**9
        as_writer.write(stream, [make_row(i, tenant="t1", at_ns=at) for i in range(4)])
        as_writer.write(stream, [make_row(i, tenant="t2", at_ns=at) for i in range(4, 7)])
        # ...and can change none of them.
        with made.connect(made.roles.writer) as conn:
            for statement in (
                "UPDATE {} SET version = 2",
                "DELETE FROM {}",
                "TRUNCATE {}",
            ):
                assert refused(conn, sql.SQL(statement).format(digests)) == "42501", statement
            assert refused(conn, sql.SQL("SELECT * FROM {}").format(checkpoints)) == "42501"
            assert (
                refused(conn, sql.SQL("INSERT INTO {} VALUES (1, 'x')").format(checkpoints))
                == "42501"
            )
        # The checkpointer signs, and reads nothing of the audit table.
        key = keygen("ckpt")
        with psycopg.connect(made.dsn_as(made.roles.checkpointer)) as conn:
            point = make_checkpoint(conn, made.schema, made.table, key)
        assert point.number == 1 and [h.next_pos for h in point.heads] == [8]
        with made.connect(made.roles.checkpointer) as conn:
            target = qualified(made.schema, made.table)
            assert refused(conn, sql.SQL("SELECT count(*) FROM {}").format(target)) == "42501"
            assert refused(conn, sql.SQL("DELETE FROM {}").format(checkpoints)) == "42501"
        # The verifier reads every tenant's rows and verifies clean.
        found: list[Finding] = []
        summary = verify(
            Options(
                made.dsn_as(made.roles.verifier),
                made.schema,
                made.table,
                keys=(key.verifier(),),
            ),
            found.append,
        )
        assert found == [] and summary.rows == 7 and summary.checkpoints == 1
        with made.connect(made.roles.verifier) as conn:
            forged = sql.SQL("INSERT INTO {} VALUES (1, 'x')").format(checkpoints)
            assert refused(conn, forged) == "42501"
        # The reader sees one tenant's rows, and the chain tables (its proofs).
        with made.connect(made.roles.reader) as conn:
            conn.execute("SET auditq.tenant = 't2'")
            seen = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(qualified(made.schema, made.table))
            ).fetchone()
            assert seen == (3,)
            assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(digests)).fetchone() == (
                2,
            )
        # The reader exports its tenant's rows with proofs (row-level security lets it see
        # no other), and they verify offline.
        proofs = tmp_path / "t2.jsonl"
        reader = ["--dsn", made.dsn_as(made.roles.reader), "--schema", made.schema]
        command = ["export", "--tenant", "t2", "--proofs", "-o", str(proofs), "--table"]
        assert main([*command, made.table, *reader]) == 0
        with open(proofs, "rb") as source:
            checked = verify_export(source, [key.verifier()], found.append)
        assert (checked.rows, checked.proven, found) == (3, 3, [])
        # Again: idempotent.
        assert (
            main(["init-db", "--partitioned", *args, "--roles", "--role-prefix", made.schema]) == 0
        )


def test_migrate_roles_grant_the_chain_on_a_version_2_table(pg_dsn: str) -> None:
    with trail(pg_dsn) as made:
        with made.connect() as conn:
            make_version_2(conn, made.schema, made.table, False)
        args = ["--dsn", pg_dsn, "--schema", made.schema, "--table", made.table]
        assert main(["migrate", *args, "--roles", "--role-prefix", made.schema]) == 0
        allow_login(made)
        as_writer = Chained(made.dsn_as(made.roles.writer), made.schema, made.table)
        as_writer.write(ChainStream(), [make_row(i) for i in range(3)])
        with psycopg.connect(made.dsn_as(made.roles.checkpointer)) as conn:
            assert make_checkpoint(conn, made.schema, made.table, keygen("k")).number == 1


# -- retention -------------------------------------------------------------------------------


def _verify(c: Chained, **kw: object) -> tuple[Summary, list[Finding]]:
    found: list[Finding] = []
    summary = verify(Options(dsn=c.dsn, schema=c.schema, table=c.table, **kw), found.append)  # type: ignore[arg-type]
    return summary, found


def _positions(found: list[Finding], kind: str) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for f in found:
        if f.kind == kind:
            assert f.stream and f.first_pos is not None and f.last_pos is not None
            out.setdefault(f.stream, set()).update(range(f.first_pos, f.last_pos + 1))
    return out


class Months:
    """A chained partitioned table with rows in two old months (15 and 14 months back, so
    that `--keep 14mo` drops the older one only) and the current one."""

    def __init__(self, dsn: str, tmp: Path) -> None:
        self.c = Chained(dsn, "public", f"chain_{uuid.uuid4().hex[:10]}")
        self.c.setup(partitioned=True)
        current = partitions.month_start(NOW)
        self.old = partitions.add_months(current, -15)
        self.newer = partitions.add_months(current, -14)
        with psycopg.connect(dsn) as conn:
            partitions.ensure_months(conn, self.c.schema, self.c.table, [self.old, self.newer])
        self.key = keygen("retention.example/audit")
        self.key_file = tmp / "signer.key"
        write_private(self.key_file, self.key.text())
        #: stream -> positions written into the older month
        self.in_old: dict[str, set[int]] = {}

    def at(self, month: datetime, i: int) -> int:
        return int((month + timedelta(days=3, minutes=i)).timestamp()) * 10**9

    def write(
        self, stream: ChainStream, months: list[datetime], skip: tuple[int, ...] = ()
    ) -> None:
        first = stream.sealed_pos
        rows = [make_row(i, at_ns=self.at(m, i)) for i, m in enumerate(months)]
        self.c.write(stream, rows, skip=skip)
        for i, m in enumerate(months):
            if m == self.old and i not in skip:
                self.in_old.setdefault(str(stream.id), set()).add(first + i)

    def cli(self, *args: str) -> int:
        c = self.c
        return main([*args, "--dsn", c.dsn, "--schema", c.schema, "--table", c.table])

    def partition(self, month: datetime) -> str:
        return f"{self.c.table}_p{month:%Y%m}"


@pytest.fixture
def months(pg_dsn: str, tmp_path: Path) -> Iterator[Months]:
    made = Months(pg_dsn, tmp_path)
    try:
        yield made
    finally:
        made.c.drop()


def _filled(m: Months) -> tuple[ChainStream, ChainStream]:
    one, two = ChainStream(), ChainStream()
    old, newer, now = m.old, m.newer, NOW
    # A batch whose rows interleave the two months: a stream's positions in the dropped
    # partition are several runs, and a dead-lettered (skipped) position among them.
    m.write(one, [old, newer, old, old, newer, old, newer], skip=(3,))
    m.write(one, [old, old, old])
    m.write(one, [newer, newer, now])
    m.write(two, [old, old])
    m.write(two, [now])
    return one, two


def test_retention_signs_the_chain_purge_and_verify_reports_purged(
    months: Months, capsys: pytest.CaptureFixture[str]
) -> None:
    m = months
    one, two = _filled(m)
    assert m.cli("checkpoint", "--key", str(m.key_file)) == 0
    capsys.readouterr()
    assert m.cli("retention", "--keep", "14mo", "--dry-run") == 2  # no key: told, nothing done
    err = capsys.readouterr().err
    assert "--key" in err and len(err.strip().splitlines()) == 1
    assert m.cli("retention", "--keep", "14mo", "--key", str(m.key_file), "--dry-run") == 0
    assert "8 chained in 5 position runs" in capsys.readouterr().out
    assert m.cli("retention", "--keep", "14mo", "--key", str(m.key_file)) == 0
    out = capsys.readouterr().out
    assert f"dropping public.{m.partition(m.old)}" in out
    assert "signed chain records 1" in out
    assert m.c.sql("SELECT count(*) FROM {t}") == [(15 - 8,)]
    (note,) = m.c.sql("SELECT note FROM {r}")[0]
    assert "auditq-retention/v1" in note and f"partition {m.partition(m.old)}" in note
    # The remaining rows verify clean; the dropped positions are PURGED, nothing else.
    pub = m.key.verifier()
    summary, found = _verify(m.c, keys=(pub,))
    assert {f.kind for f in found} == {"PURGED"}, found
    assert not summary.damaged and summary.signatures_checked
    assert (
        _positions(found, "PURGED")
        == m.in_old
        == {
            str(one.id): {1, 3, 6, 8, 9, 10},
            str(two.id): {1, 2},
        }
    )
    # The CLI says clean too (exit 0).
    assert m.cli("verify", "--public-key", _pub_file(m)) == 0
    # A month dropped without the command (as a superuser) is MISSING, and damage.
    m.c.sql(f'DROP TABLE "{m.c.schema}"."{m.partition(m.newer)}"')
    summary, found = _verify(m.c, keys=(pub,))
    assert summary.damaged
    assert _positions(found, "PURGED") == m.in_old
    assert _positions(found, "MISSING") == {str(one.id): {2, 5, 7, 11, 12}}
    assert {f.kind for f in found} == {"PURGED", "MISSING"}


def _pub_file(m: Months) -> str:
    path = m.key_file.with_suffix(".pub")
    path.write_text(m.key.verifier().text() + "\n")
    return str(path)


def test_a_purge_record_signed_by_another_key_or_edited_does_not_cover(months: Months) -> None:
    m = months
    _filled(m)
    assert m.cli("checkpoint", "--key", str(m.key_file)) == 0
    assert m.cli("retention", "--keep", "14mo", "--key", str(m.key_file)) == 0
    stranger = keygen("someone.else")
    summary, found = _verify(m.c, keys=(stranger.verifier(),))
    # Neither the checkpoint nor the purge verifies under a key the auditor does not hold.
    assert summary.damaged and "BAD_SIGNATURE" in {f.kind for f in found}
    assert _positions(found, "PURGED") == {}
    # An edited record (a superuser widens a range) no longer verifies: its positions are
    # MISSING again.
    m.c.sql("ALTER TABLE {r} DISABLE TRIGGER USER")
    m.c.sql("UPDATE {r} SET note = replace(note, ' 1 2 1', ' 1 3 2')")
    summary, found = _verify(m.c, keys=(m.key.verifier(),))
    assert "BAD_SIGNATURE" in {f.kind for f in found}
    assert _positions(found, "PURGED") == {} and _positions(found, "MISSING") == m.in_old


def test_retention_refuses_rows_no_checkpoint_anchors(
    months: Months, capsys: pytest.CaptureFixture[str]
) -> None:
    m = months
    one, _ = _filled(m)
    assert m.cli("checkpoint", "--key", str(m.key_file)) == 0
    m.write(one, [m.old, m.old])  # late rows for the old month, after the checkpoint
    capsys.readouterr()
    before = m.c.sql("SELECT count(*) FROM {t}")
    assert m.cli("retention", "--keep", "14mo", "--key", str(m.key_file)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no checkpoint anchors" in err and "`auditq checkpoint`" in err
    assert f"up to position {one.sealed_pos - 1}" in err
    assert m.c.sql("SELECT count(*) FROM {t}") == before
    assert m.c.sql("SELECT count(*) FROM {r}") == [(0,)]
    # Checkpoint, and it goes.
    assert m.cli("checkpoint", "--key", str(m.key_file)) == 0
    assert m.cli("retention", "--keep", "14mo", "--key", str(m.key_file)) == 0
    summary, found = _verify(m.c, keys=(m.key.verifier(),))
    assert not summary.damaged and {f.kind for f in found} == {"PURGED"}
    assert _positions(found, "PURGED") == m.in_old


def test_retention_of_unchained_rows_needs_no_key(
    months: Months, capsys: pytest.CaptureFixture[str]
) -> None:
    m = months
    m.c.sql(
        "INSERT INTO {t} (id, occurred_at, action) VALUES (gen_random_uuid(), %s, 'old')",
        m.old + timedelta(days=2),
    )
    m.write(ChainStream(), [m.newer])
    assert m.cli("retention", "--keep", "14mo") == 0
    assert "signed chain records" not in capsys.readouterr().out
    assert m.c.sql("SELECT count(*) FROM {r}") == [(0,)]
    summary, _found = _verify(m.c)
    assert not summary.damaged and summary.rows == 1


def test_retention_with_roles_signs_as_the_owner_and_the_verifier_sees_purged(
    pg_dsn: str, tmp_path: Path
) -> None:
    """The roles' grants are enough: the checkpointer signs, a login that is a member of the
    owner drops and records (it reads the checkpoints, inserts the record), the verifier
    reads it all."""
    from auditq.schema import create

    with trail(pg_dsn) as made:
        create(pg_dsn, schema=made.schema, table=made.table, partitioned=True, roles=made.roles)
        allow_login(made)
        old = partitions.add_months(partitions.month_start(NOW), -15)
        with psycopg.connect(pg_dsn) as conn:
            partitions.ensure_months(conn, made.schema, made.table, [old])
        as_writer = Chained(made.dsn_as(made.roles.writer), made.schema, made.table)
        stream = ChainStream()
        at = int((old + timedelta(days=1)).timestamp()) * 10**9
        as_writer.write(stream, [make_row(i, at_ns=at + i * 10**9) for i in range(3)])
        as_writer.write(stream, [make_row(9, at_ns=int(NOW.timestamp()) * 10**9)])
        key = keygen("owner.example/audit")
        key_file = tmp_path / "signer.key"
        write_private(key_file, key.text())
        with psycopg.connect(made.dsn_as(made.roles.checkpointer)) as conn:
            make_checkpoint(conn, made.schema, made.table, key)
        admin = f"{made.schema}_admin"
        with made.connect() as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    sql.Identifier(admin), sql.Identifier(made.roles.owner)
                )
            )
        try:
            target = ["--dsn", made.dsn_as(admin), "--schema", made.schema, "--table", made.table]
            assert main(["retention", "--keep", "14mo", "--key", str(key_file), *target]) == 0
        finally:
            with made.connect() as conn:
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(admin)))
        found: list[Finding] = []
        summary = verify(
            Options(
                made.dsn_as(made.roles.verifier), made.schema, made.table, keys=(key.verifier(),)
            ),
            found.append,
        )
        assert [(f.kind, f.first_pos, f.last_pos) for f in found] == [("PURGED", 1, 3)]
        assert not summary.damaged and summary.rows == 1
