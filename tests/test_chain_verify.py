"""Tamper with chained rows as a superuser; `verify` names each damage exactly."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from auditq.chain import ChainError, ChainStream
from auditq.checkpoint import (
    PurgedRange,
    keygen,
    make_checkpoint,
    purged_ranges,
    record_retention,
)
from auditq.cli import main
from auditq.verify import Finding, Options, Summary, verify

from .chain_build import Chained, make_row


@pytest.fixture
def chained(pg_dsn: str) -> Iterator[Chained]:
    made = Chained(pg_dsn, "public", f"chain_{uuid.uuid4().hex[:10]}")
    made.setup()
    yield made
    made.drop()


def run(c: Chained, unanchored: bool = False, **kw: object) -> tuple[Summary, list[Finding]]:
    """verify's findings (UNANCHORED only when asked: without a checkpoint every stream is)."""
    found: list[Finding] = []
    summary = verify(Options(dsn=c.dsn, schema=c.schema, table=c.table, **kw), found.append)  # type: ignore[arg-type]
    return summary, [f for f in found if unanchored or f.kind != "UNANCHORED"]


def kinds(found: list[Finding]) -> list[str]:
    return sorted(f.kind for f in found)


def filled(c: Chained, batches: int = 3, size: int = 5) -> ChainStream:
    stream = ChainStream()
    for b in range(batches):
        c.write(stream, [make_row(b * size + i) for i in range(size)])
    return stream


def pos_id(c: Chained, stream: ChainStream, pos: int) -> str:
    return str(
        c.sql("SELECT id FROM {t} WHERE chain_stream = %s AND chain_pos = %s", stream.id, pos)[0][0]
    )


def test_untouched_table_verifies_clean_with_skips_and_two_streams(chained: Chained) -> None:
    one = filled(chained)
    two = ChainStream()
    chained.write(
        two,
        [
            make_row(i, metadata={"b": [1, 2.5, None, True], "a": {"z": "é", "y": -0.0}})
            for i in range(7)
        ],
        skip=[2, 6],
    )
    chained.write(two, [make_row(100)], skip=[0])
    summary, found = run(chained, unanchored=True)
    assert sorted((f.kind, f.first_pos, f.last_pos) for f in found) == [
        ("UNANCHORED", 1, 8),
        ("UNANCHORED", 1, 15),
    ]
    assert summary.rows == 15 + 5 and summary.digests == 5 and summary.streams == 2
    assert not summary.damaged
    assert one.sealed_pos == 16


def test_metadata_edit_is_modified_with_its_id(chained: Chained) -> None:
    stream = filled(chained)
    ident = pos_id(chained, stream, 7)
    chained.sql(
        "UPDATE {t} SET metadata = jsonb_set(metadata, '{{k}}', '\"w\"') WHERE id = %s", ident
    )
    summary, found = run(chained)
    assert [(f.kind, f.stream, f.first_pos, f.id) for f in found] == [
        ("MODIFIED", str(stream.id), 7, ident)
    ]
    assert summary.damaged


def test_one_byte_of_action_is_modified(chained: Chained) -> None:
    stream = filled(chained)
    ident = pos_id(chained, stream, 3)
    chained.sql(
        "UPDATE {t} SET action = overlay(action placing 'X' from 1 for 1) WHERE id = %s", ident
    )
    _, found = run(chained)
    assert [(f.kind, f.first_pos, f.id) for f in found] == [("MODIFIED", 3, ident)]


def test_deleted_row_is_missing_exactly(chained: Chained) -> None:
    stream = filled(chained)
    chained.sql("DELETE FROM {t} WHERE chain_stream = %s AND chain_pos IN (4, 5, 6, 9)", stream.id)
    _, found = run(chained)
    assert [(f.kind, f.first_pos, f.last_pos) for f in found] == [
        ("MISSING", 4, 6),
        ("MISSING", 9, 9),
    ]


_COLUMNS = (
    "occurred_at, action, tenant_id, actor_id, actor_type, resource_type, resource_id, "
    "outcome, ip, user_agent, request_id, metadata, origin, chain_stream"
)
_COPY_OF_ROW_2 = (
    "INSERT INTO {{t}} (id, "
    + _COLUMNS
    + ", chain_pos) SELECT gen_random_uuid(), "
    + _COLUMNS
    + ", {} FROM {{t}} WHERE chain_stream = %s AND chain_pos = 2 LIMIT 1"
)


def test_forged_rows_are_extra_or_duplicate(chained: Chained) -> None:
    stream = filled(chained)
    genuine = pos_id(chained, stream, 2)
    # a copy of row 2 under a new id at the same position, one past the last digest, and an
    # unchained row written after chaining began
    chained.sql(_COPY_OF_ROW_2.format("chain_pos"), stream.id)
    chained.sql(_COPY_OF_ROW_2.format("16"), stream.id)
    chained.sql("INSERT INTO {t} (id, occurred_at, action) VALUES (gen_random_uuid(), now(), 'x')")
    summary, found = run(chained)
    assert kinds(found) == ["DUPLICATE", "EXTRA", "EXTRA"], [f.line() for f in found]
    dup = next(f for f in found if f.kind == "DUPLICATE")
    assert dup.first_pos == 2 and dup.id != genuine
    assert {f.first_pos for f in found if f.kind == "EXTRA"} == {16, None}
    assert summary.unchained_rows == 1
    summary, found = run(chained, allow_unchained=True)
    assert kinds(found) == ["DUPLICATE", "EXTRA"] and summary.unchained_rows == 1


def test_swapped_positions_are_reordered(chained: Chained) -> None:
    stream = filled(chained)
    a, b = pos_id(chained, stream, 6), pos_id(chained, stream, 8)
    chained.sql(
        "UPDATE {t} SET chain_pos = CASE chain_pos WHEN 6 THEN 8 ELSE 6 END "
        "WHERE chain_stream = %s AND chain_pos IN (6, 8)",
        stream.id,
    )
    _, found = run(chained)
    assert sorted((f.kind, f.first_pos, f.id, f.detail) for f in found) == [
        ("REORDERED", 6, b, "belongs at position 8"),
        ("REORDERED", 8, a, "belongs at position 6"),
    ]


def _forge_batch(c: Chained, stream: ChainStream, first: int, count: int) -> None:
    """Recompute a batch's digest from the rows as they are now (what a tamperer who read
    this code would do after editing a row)."""
    from auditq import binary, chain
    from auditq.chain_schema import q

    cols = sql.SQL(", ").join(map(sql.Identifier, chain.LEAF_COLUMNS_V1))
    statement = sql.SQL(
        "COPY (SELECT {} FROM {} WHERE chain_stream = {} AND chain_pos >= {} AND chain_pos < {} "
        "ORDER BY chain_pos) TO STDOUT (FORMAT binary)"
    ).format(
        cols,
        q(c.schema, c.table),
        sql.Literal(stream.id),
        sql.Literal(first),
        sql.Literal(first + count),
    )
    with psycopg.connect(c.dsn) as conn, conn.cursor() as cur, cur.copy(statement) as copy:
        raw = b"".join(bytes(x) for x in copy)
    leaves = chain.leaves_of(b"".join(binary.split_rows(raw[19:-2])))
    root = chain.root(leaves)
    (prev,) = c.sql(
        "SELECT prev_hash FROM {d} WHERE stream = %s AND first_pos = %s", stream.id, first
    )[0]
    digest = chain.digest_hash(stream.id, first, count, (), root, bytes(prev))
    c.sql("ALTER TABLE {d} DISABLE TRIGGER USER")
    c.sql(
        "UPDATE {d} SET leaves = %s, root = %s, hash = %s WHERE stream = %s AND first_pos = %s",
        leaves,
        root,
        digest,
        stream.id,
        first,
    )


def test_replaced_digest_breaks_the_next_link(chained: Chained) -> None:
    stream = filled(chained)
    chained.sql("UPDATE {t} SET actor_id = 'mallory' WHERE id = %s", pos_id(chained, stream, 7))
    _forge_batch(chained, stream, 6, 5)
    _, found = run(chained)
    assert [(f.kind, f.first_pos, f.last_pos, f.detail) for f in found] == [
        ("BROKEN", 11, 15, "digest does not link to the previous one")
    ]


def test_replaced_last_digest_is_caught_by_the_checkpoint(chained: Chained) -> None:
    stream = filled(chained)
    key = keygen("k")
    with psycopg.connect(chained.dsn) as conn:
        make_checkpoint(conn, chained.schema, chained.table, key)
    chained.sql("UPDATE {t} SET actor_id = 'mallory' WHERE id = %s", pos_id(chained, stream, 12))
    _forge_batch(chained, stream, 11, 5)
    _, found = run(chained, keys=(key.verifier(),))
    assert [(f.kind, f.first_pos, f.checkpoint) for f in found] == [("BROKEN", 11, 1)]
    assert found[0].detail == "digest differs from the one the checkpoint signed"


def test_tail_cut_is_caught_only_behind_a_checkpoint(chained: Chained, tmp_path: Path) -> None:
    stream = filled(chained)
    key = keygen("test.example/ckpt")
    with psycopg.connect(chained.dsn) as conn:
        make_checkpoint(conn, chained.schema, chained.table, key, directory=tmp_path)
    chained.write(stream, [make_row(50 + i) for i in range(4)])  # 16..19, after the checkpoint
    summary, found = run(chained, unanchored=True, keys=(key.verifier(),))
    assert [(f.kind, f.first_pos, f.last_pos) for f in found] == [("UNANCHORED", 16, 19)]
    assert not summary.damaged and summary.signatures_checked
    # cut positions 11..19 (rows and digests): the checkpoint covered up to 15
    chained.sql("ALTER TABLE {d} DISABLE TRIGGER USER")
    chained.sql("DELETE FROM {t} WHERE chain_stream = %s AND chain_pos >= 11", stream.id)
    chained.sql("DELETE FROM {d} WHERE stream = %s AND first_pos >= 11", stream.id)
    _, found = run(chained, keys=(key.verifier(),))
    assert [(f.kind, f.first_pos, f.last_pos, f.checkpoint) for f in found] == [
        ("TRUNCATED", 11, 15, 1)
    ]
    # and when the checkpoint is deleted too, only the copy outside the database sees it
    chained.sql("ALTER TABLE {c} DISABLE TRIGGER USER")
    chained.sql("DELETE FROM {c}")
    _, found = run(chained, unanchored=True, keys=(key.verifier(),))
    assert kinds(found) == ["UNANCHORED"]
    _, found = run(chained, keys=(key.verifier(),), external=tmp_path)
    assert kinds(found) == ["TRUNCATED", "TRUNCATED"]


def test_corrupt_checkpoint_signature(chained: Chained) -> None:
    filled(chained)
    key = keygen("k1")
    with psycopg.connect(chained.dsn) as conn:
        make_checkpoint(conn, chained.schema, chained.table, key)
    chained.sql("ALTER TABLE {c} DISABLE TRIGGER USER")
    chained.sql("UPDATE {c} SET note = replace(note, 'time 20', 'time 19')")
    _, found = run(chained, keys=(key.verifier(),))
    assert ("BAD_SIGNATURE", 1) in {(f.kind, f.checkpoint) for f in found}
    other = keygen("k1")
    _, found = run(chained, keys=(other.verifier(),))
    assert "BAD_SIGNATURE" in kinds(found)


def test_time_range_drop_is_missing_unless_a_retention_record_covers_it(chained: Chained) -> None:
    stream = filled(chained)
    chained.sql("DELETE FROM {t} WHERE chain_stream = %s AND chain_pos BETWEEN 1 AND 5", stream.id)
    _, found = run(chained)
    assert [(f.kind, f.first_pos, f.last_pos) for f in found] == [("MISSING", 1, 5)]
    key = keygen("retention")
    with psycopg.connect(chained.dsn) as conn:
        record_retention(
            conn, chained.schema, chained.table, key, [PurgedRange(stream.id, 1, 6, 5)], "13 months"
        )
    summary, found = run(chained, keys=(key.verifier(),))
    assert [(f.kind, f.first_pos, f.last_pos) for f in found] == [("PURGED", 1, 5)]
    assert not summary.damaged


def test_since_checkpoint_and_tenant_and_jobs(chained: Chained) -> None:
    stream = filled(chained)
    key = keygen("k")
    with psycopg.connect(chained.dsn) as conn:
        make_checkpoint(conn, chained.schema, chained.table, key)
    chained.write(stream, [make_row(90 + i, tenant="t2") for i in range(3)])
    ident = pos_id(chained, stream, 2)
    chained.sql("UPDATE {t} SET actor_id = 'x' WHERE id = %s", ident)
    summary, found = run(chained, since_checkpoint=1)
    assert found == [] and summary.rows == 3
    chained.sql("DELETE FROM {t} WHERE chain_stream = %s AND chain_pos = 17", stream.id)
    _, found = run(chained, since_checkpoint=1)
    assert [(f.kind, f.first_pos) for f in found] == [("MISSING", 17)]
    _, found = run(chained, since_time=datetime.now(UTC) - timedelta(hours=1))
    assert kinds(found) == ["MISSING", "MODIFIED"]
    _, found = run(chained, since_time=datetime.now(UTC) + timedelta(hours=1))
    assert found == []
    _, found = run(chained, tenant="t1")
    assert [(f.kind, f.id) for f in found] == [("MODIFIED", ident)]
    _, found = run(chained, tenant="t2")
    assert kinds(found) == ["MISSING"]
    other = ChainStream()
    chained.write(other, [make_row(i) for i in range(4)])
    summary, found = run(chained, unanchored=True, jobs=2)
    assert sorted((f.kind, f.first_pos, f.last_pos) for f in found) == [
        ("MISSING", 17, 17),
        ("MODIFIED", 2, 2),
        ("UNANCHORED", 1, 4),
        ("UNANCHORED", 16, 18),
    ]
    assert summary.streams == 2


def test_cli_keygen_checkpoint_verify(
    chained: Chained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = filled(chained)
    target = ["--dsn", chained.dsn, "--table", chained.table]
    assert main(["keygen", "ops/ckpt", "--out", str(tmp_path)]) == 0
    private = tmp_path / "ops_ckpt.key"
    assert private.stat().st_mode & 0o777 == 0o600
    assert main(["keygen", "ops/ckpt", "--out", str(tmp_path)]) == 2
    assert (
        main(
            ["checkpoint", *target, "--key", str(private), "--checkpoint-dir", str(tmp_path / "cp")]
        )
        == 0
    )
    pub = ["--public-key", str(tmp_path / "ops_ckpt.pub")]
    capsys.readouterr()
    assert main(["verify", *target, *pub, "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[-1]["kind"] == "SUMMARY" and lines[-1]["clean"] is True and lines[-1]["rows"] == 15
    chained.sql("DELETE FROM {t} WHERE chain_stream = %s AND chain_pos = 3", stream.id)
    assert main(["verify", *target, *pub, "--json", "--checkpoint-dir", str(tmp_path / "cp")]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"kind": "MISSING", "stream": str(stream.id), "first_pos": 3, "last_pos": 3}
    assert lines[-1]["findings"] == {"MISSING": 1}
    assert main(["verify", *target, "--jobs", "0"]) == 2
    assert main(["verify", *target, "--since", "yesterday"]) == 2
    assert main(["verify", *target, "--since", "7"]) == 2  # no such checkpoint
    assert main(["verify", *target, "--public-key", str(tmp_path / "nope.pub")]) == 2
    assert main(["verify", "--dsn", chained.dsn, "--table", "not_chained_here"]) == 2


def test_resume_stream_continues_a_dead_writers_chain(chained: Chained) -> None:
    from auditq.chain_schema import resume_stream

    stream = filled(chained, batches=2)
    with psycopg.connect(chained.dsn) as conn:
        again = resume_stream(conn, chained.schema, chained.table, stream.id)
        fresh = resume_stream(conn, chained.schema, chained.table, uuid.uuid4())
    assert (again.sealed_pos, again.head_hash) == (stream.sealed_pos, stream.head_hash)
    assert fresh.sealed_pos == 1
    chained.write(again, [make_row(70 + i) for i in range(3)], skip=[1])
    summary, found = run(chained)
    assert found == [] and summary.rows == 12 and summary.digests == 3


def test_edited_digest_field_and_deleted_checkpoint_are_broken(chained: Chained) -> None:
    stream = filled(chained)
    key = keygen("k")
    with psycopg.connect(chained.dsn) as conn:
        for _ in range(3):
            make_checkpoint(conn, chained.schema, chained.table, key)
    chained.sql("ALTER TABLE {d} DISABLE TRIGGER USER")
    chained.sql("ALTER TABLE {c} DISABLE TRIGGER USER")
    chained.sql("UPDATE {d} SET pos_count = 4 WHERE stream = %s AND first_pos = 11", stream.id)
    chained.sql("DELETE FROM {c} WHERE checkpoint_no = 2")
    _, found = run(chained, keys=(key.verifier(),))
    got = {(f.kind, f.first_pos, f.checkpoint, f.detail) for f in found}
    assert ("BROKEN", 11, None, "digest hash does not match its fields") in got
    assert ("BROKEN", None, 3, "does not link to checkpoint 1") in got
    # the last digest now ends at 14: the signed head (16) is behind it, so position 15 is
    # cut, and its row is outside every digest
    assert ("TRUNCATED", 15, 3, "positions the checkpoint signed are gone") in got
    assert "EXTRA" in {f.kind for f in found}


def test_checkpointer_refuses_heads_that_do_not_extend_the_last_checkpoint(
    chained: Chained, tmp_path: Path
) -> None:
    from auditq.checkpoint import Inconsistent

    stream = filled(chained)
    key = keygen("k")
    with psycopg.connect(chained.dsn) as conn:
        make_checkpoint(conn, chained.schema, chained.table, key)
        chained.write(stream, [make_row(40)])
        make_checkpoint(conn, chained.schema, chained.table, key)  # 16 -> 17 links: signed
    chained.sql("ALTER TABLE {d} DISABLE TRIGGER USER")
    chained.sql("DELETE FROM {d} WHERE stream = %s AND first_pos = 16", stream.id)
    with psycopg.connect(chained.dsn) as conn, pytest.raises(Inconsistent, match="behind"):
        make_checkpoint(conn, chained.schema, chained.table, key)
    (tmp_path / "k.key").write_text(key.text())
    (tmp_path / "k.key").chmod(0o600)
    target = ["--dsn", chained.dsn, "--table", chained.table]
    assert main(["checkpoint", *target, "--key", str(tmp_path / "k.key")]) == 1
    (tmp_path / "k.key").chmod(0o644)
    assert main(["checkpoint", *target, "--key", str(tmp_path / "k.key")]) == 2


def test_key_files_round_trip_and_refuse_damage(tmp_path: Path) -> None:
    from auditq.checkpoint import KeyFileError, SignerKey, VerifierKey, note_signed_by, sign_note

    key = keygen("audit.example/2026")
    assert SignerKey.parse(key.text()) == key
    public = VerifierKey.parse(key.verifier().text())
    note = sign_note("hello\n", key)
    assert note_signed_by(note, public)
    assert not note_signed_by(note.replace("hello", "hallo"), public)
    assert not note_signed_by(note, keygen("audit.example/2026").verifier())
    text = key.verifier().text()
    with pytest.raises(KeyFileError):
        VerifierKey.parse(text.replace(text.split("+")[1], "00000000"))
    with pytest.raises(KeyFileError):
        keygen("has space")


def test_forged_stream_is_extra(chained: Chained) -> None:
    filled(chained)
    forged = ChainStream()
    chained.sql(
        "INSERT INTO {t} (id, occurred_at, action, chain_stream, chain_pos) "
        "VALUES (gen_random_uuid(), now(), 'x', %s, 1)",
        forged.id,
    )
    _, found = run(chained)
    assert [(f.kind, f.stream, f.first_pos, f.detail) for f in found] == [
        ("EXTRA", str(forged.id), 1, "its stream has no digest")
    ]


def test_chain_tables_refuse_changes_even_in_replica_mode(chained: Chained) -> None:
    filled(chained, batches=1)
    with psycopg.connect(chained.dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        for statement in ("UPDATE {d} SET version = 2", "DELETE FROM {d}", "TRUNCATE {d}"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(chained.compose(statement))


def test_roles_checkpoint_and_verify_with_their_grants_only(chained: Chained) -> None:
    from auditq.chain_schema import grant_statements

    suffix = uuid.uuid4().hex[:8]
    signer, auditor = f"auditq_ckpt_{suffix}", f"auditq_audit_{suffix}"
    filled(chained)
    key = keygen("k")
    with psycopg.connect(chained.dsn, autocommit=True) as conn:
        for role in (signer, auditor):
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        for statement in grant_statements(
            chained.schema, chained.table, checkpointer=signer, verifier=auditor
        ):
            conn.execute(statement)
    try:
        base = psycopg.conninfo.conninfo_to_dict(chained.dsn)
        as_signer = psycopg.conninfo.make_conninfo(**{**base, "user": signer})
        as_auditor = psycopg.conninfo.make_conninfo(**{**base, "user": auditor})
        with psycopg.connect(as_signer) as conn:
            make_checkpoint(conn, chained.schema, chained.table, key)
        with (
            psycopg.connect(as_signer, autocommit=True) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(chained.compose("SELECT count(*) FROM {t}"))
        found: list[Finding] = []
        summary = verify(
            Options(as_auditor, chained.schema, chained.table, keys=(key.verifier(),)),
            found.append,
        )
        assert found == [] and summary.rows == 15 and summary.checkpoints == 1
    finally:
        with psycopg.connect(chained.dsn, autocommit=True) as conn:
            for role in (signer, auditor):
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_dropped_partition_is_missing_until_a_retention_record_covers_it(pg_dsn: str) -> None:
    from auditq.partitions import ensure_months

    c = Chained(pg_dsn, "public", f"chain_{uuid.uuid4().hex[:10]}")
    c.setup(partitioned=True)
    try:
        january, february = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
        with psycopg.connect(c.dsn) as conn:
            ensure_months(conn, c.schema, c.table, [january, february])
        stream = ChainStream()
        ns = [
            int((m + timedelta(days=d)).timestamp()) * 10**9
            for m in (january, february)
            for d in (1, 2, 3)
        ]
        c.write(stream, [make_row(i, at_ns=t) for i, t in enumerate(ns)])
        summary, found = run(c)
        assert found == [] and summary.rows == 6
        (part,) = c.sql(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass AND pg_get_expr(c.relpartbound, c.oid) "
            "LIKE '%%2026-01-01%%'",
            f'"{c.schema}"."{c.table}"',
        )[0]
        with psycopg.connect(c.dsn) as conn:
            ranges = purged_ranges(conn, c.schema, part)
        assert ranges == [PurgedRange(stream.id, 1, 4, 3)]
        c.sql(f'DROP TABLE "{c.schema}"."{part}"')
        _, found = run(c)
        assert [(f.kind, f.first_pos, f.last_pos) for f in found] == [("MISSING", 1, 3)]
        key = keygen("retention")
        with psycopg.connect(c.dsn) as conn:
            record_retention(conn, c.schema, c.table, key, ranges, "keep 1 month")
        summary, found = run(c, keys=(key.verifier(),))
        assert [(f.kind, f.first_pos, f.last_pos) for f in found] == [("PURGED", 1, 3)]
        assert not summary.damaged
    finally:
        c.drop()


def test_poison_row_split_keeps_the_chain(chained: Chained) -> None:
    """What phase 2's sink does when a batch of 8 holds two rows the server refuses: the
    halves commit left to right, each refused row is skipped, a refused last row gets a
    digest of its own; the table verifies clean and the gaps are recorded, not missing."""
    from auditq import binary
    from auditq.chain import LEAF_COLUMNS_V1, Skip
    from auditq.chain_schema import insert_digest, q

    from .chain_build import encoded

    stream = ChainStream()
    stamped, leaves, first = stream.stamp(b"".join(encoded(make_row(i)) for i in range(8)))
    tuples = binary.split_rows(stamped)
    cols = sql.SQL(", ").join(map(sql.Identifier, LEAF_COLUMNS_V1))
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        q(chained.schema, chained.table), cols
    )

    def commit(indexes: list[int], end_pos: int) -> None:
        record = stream.seal_through(
            b"".join(leaves[i * 32 : i * 32 + 32] for i in indexes), end_pos
        )
        with psycopg.connect(chained.dsn) as conn, conn.transaction():
            if indexes:
                with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                    copy.write(
                        binary.HEADER + b"".join(tuples[i] for i in indexes) + binary.TRAILER
                    )
            insert_digest(conn, chained.schema, chained.table, record)
        stream.committed(record)

    commit([0, 1, 2], first + 3)  # rows 0-2
    stream.skip(first + 3, Skip.DEAD_LETTER)  # row 3 refused
    commit([4, 5, 6], first + 7)  # rows 4-6, the digest also covers the skipped 3
    stream.skip(first + 7, Skip.DEAD_LETTER)  # the last row refused: a digest of its own
    commit([], first + 8)
    with pytest.raises(ChainError):
        stream.skip(first + 7, Skip.DEAD_LETTER)  # sealed already
    summary, found = run(chained)
    assert found == [] and summary.rows == 6 and summary.digests == 3
    skips = chained.sql("SELECT skipped_pos FROM {d} ORDER BY first_pos")
    assert [list(s[0]) for s in skips] == [[], [4], [8]]


def test_stored_digest_tells_a_replay_what_committed(chained: Chained) -> None:
    from auditq.chain_schema import stored_digest

    stream = ChainStream()
    record = chained.write(stream, [make_row(i) for i in range(3)])
    other = ChainStream(stream.id).seal(b"\x01" * 32, 1, 1)
    later = stream.seal(b"\x02" * 32, stream.sealed_pos, 1)
    with psycopg.connect(chained.dsn) as conn:
        assert stored_digest(conn, chained.schema, chained.table, record) is True
        assert stored_digest(conn, chained.schema, chained.table, other) is False
        assert stored_digest(conn, chained.schema, chained.table, later) is None
