"""The hash chain written by the real writer (issue 13, phase 2): poison rows, commits cut
in flight, restarts, forks and a SIGKILL with the spool leave a table that verifies clean
(no false alarm from replays or dead letters); then each tampering is found on it."""

from __future__ import annotations

import os
import random
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from auditq.chain import LEAF_COLUMNS_V1, Skip
from auditq.verify import Finding, Options, Summary, verify
from auditq.writer import AuditWriter, DeadLetter

from ..chain_build import Chained
from .conftest import FAST, Caller, WriterMaker
from .proxy import COMMIT_MESSAGE, Proxy
from .test_spool import dead_port_dsn, read_json_line, segments, spawn

POISON = "poison"
#: The COMMIT the chained writer pipelines after the digest's INSERT on its own connection
#: (its Parse message: an unnamed statement, then the text).
CHAINED_COMMIT = b"\x00COMMIT\x00"


@pytest.fixture
def chained(pg_dsn: str) -> Iterator[Chained]:
    made = Chained(pg_dsn, "public", f"chainw_{uuid.uuid4().hex[:10]}")
    made.setup()
    made.sql(f"ALTER TABLE {{t}} ADD CONSTRAINT no_poison CHECK (resource_id <> '{POISON}')")
    yield made
    made.drop()


def chain_writer(writers: WriterMaker, dsn: str, c: Chained, **options: Any) -> AuditWriter:
    return writers(dsn, _As(c), chain=True, **options)


class _As:
    """What `writers` needs of a table: its schema and name."""

    def __init__(self, c: Chained) -> None:
        self.schema, self.name = c.schema, c.table


def check(c: Chained) -> tuple[Summary, list[Finding]]:
    found: list[Finding] = []
    summary = verify(Options(dsn=c.dsn, schema=c.schema, table=c.table), found.append)
    return summary, [f for f in found if f.kind != "UNANCHORED"]


def assert_clean(c: Chained) -> Summary:
    summary, found = check(c)
    assert found == [] and not summary.damaged, [f.line() for f in found]
    assert summary.unchained_rows == 0
    return summary


def skips(c: Chained) -> list[int]:
    rows = c.sql("SELECT skipped_reason FROM {d}")
    return sorted(int(r) for (reasons,) in rows for r in reasons)


def stored(c: Chained) -> int:
    return int(c.sql("SELECT count(*) FROM {t}")[0][0])


def test_poison_rows_leave_recorded_gaps(chained: Chained, writers: WriterMaker) -> None:
    dead: list[DeadLetter] = []
    writer = chain_writer(writers, chained.dsn, chained, batch_size=500, on_dead_letter=dead.append)
    caller = Caller(writer)
    total = 3000
    poisoned = set(random.Random(5).sample(range(total - 1), 9)) | {total - 1}
    for i in range(total):
        caller.log("chain.poison", request_id=str(i), resource_id=POISON if i in poisoned else "ok")
    assert writer.flush(timeout=60)
    stats = writer.stats()
    assert stats.dead_lettered == len(poisoned) == len(dead)
    assert stats.written == stored(chained) == total - len(poisoned)
    # Every dead row's position is skipped in a digest, the last one's in a digest that
    # covers no row at all.
    assert skips(chained) == [Skip.DEAD_LETTER] * len(poisoned)
    assert chained.sql("SELECT count(*) FROM {d} WHERE leaves = ''")[0][0] >= 1
    summary = assert_clean(chained)
    assert summary.rows == total - len(poisoned) and summary.streams == 1


@pytest.mark.parametrize("committed", [True, False], ids=["landed", "never-arrived"])
@pytest.mark.parametrize("source", ["own", "pool"])
def test_commit_cut_in_flight_replays_into_a_clean_chain(
    proxy: Proxy, chained: Chained, writers: WriterMaker, committed: bool, source: str
) -> None:
    pool: ConnectionPool[Any] | None = None
    if source == "own":
        writer = chain_writer(writers, proxy.dsn, chained, batch_size=1000)
        proxy.cut_on(CHAINED_COMMIT, forward=committed, times=1)
    else:
        pool = ConnectionPool(proxy.dsn, min_size=1, max_size=2, open=True)
        writer = writers(pool, _As(chained), chain=True, batch_size=1000)
        proxy.cut_on(COMMIT_MESSAGE, forward=committed, times=1)
    caller = Caller(writer)
    caller.stream(5000, chunk=500, pause=0.01)
    assert writer.flush(timeout=30)
    assert proxy.triggered == 1
    stats = writer.stats()
    assert stats.retries >= 1
    assert stats.written == stored(chained) == 5000 and stats.dead_lettered == 0
    assert skips(chained) == []
    summary = assert_clean(chained)
    assert summary.rows == 5000 and summary.streams == 1
    if pool is not None:
        writer.close(timeout=5)
        pool.close()


def test_restarts_and_a_fork_each_open_a_stream(chained: Chained, writers: WriterMaker) -> None:
    first = chain_writer(writers, chained.dsn, chained)
    for i in range(300):
        first.log("chain.restart", request_id=str(i))
    first.close(timeout=10)
    second = chain_writer(writers, chained.dsn, chained)
    for i in range(300, 500):
        second.log("chain.restart", request_id=str(i))
    assert second.flush(timeout=10)
    pid = os.fork()
    if pid == 0:  # the child writes through the inherited writer: a stream of its own
        code = 1
        try:
            for i in range(500, 700):
                second.log("chain.fork", request_id=str(i))
            code = 0 if second.flush(timeout=20) else 1
            second.close(timeout=10)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for i in range(700, 800):
        second.log("chain.restart", request_id=str(i))
    assert second.flush(timeout=10)
    assert stored(chained) == 800
    summary = assert_clean(chained)
    assert summary.streams == 3 and summary.rows == 800


SPOOLING_CHILD = """
    import json, time
    from auditq import AuditWriter
    writer = AuditWriter(
        {dsn!r}, schema={schema!r}, table={table!r}, spool_dir={spool!r}, spool_after=0.1,
        spool_fsync="never", max_queue=1000, batch_size=200, flush_interval=0.05,
        retry_backoff_max=0.2, connect_timeout=1, chain=True,
    )
    accepted = [i for i in range({count}) if writer.log("spool.kill", request_id=str(i))]
    assert writer.flush(timeout=30)
    stats = writer.stats()
    print(json.dumps({{"accepted": len(accepted), "spooled": stats.spooled}}), flush=True)
    time.sleep(120)  # killed here, holding its segments
"""


@pytest.mark.parametrize("replayer_chains", [True, False], ids=["chained", "unchained"])
def test_sigkill_with_the_spool_resumes_the_dead_writers_streams(
    chained: Chained, writers: WriterMaker, tmp_path: Path, replayer_chains: bool
) -> None:
    spool = tmp_path / "spool"
    child = spawn(
        SPOOLING_CHILD.format(
            dsn=dead_port_dsn(chained.dsn),
            schema=chained.schema,
            table=chained.table,
            spool=str(spool),
            count=2000,
        )
    )
    try:
        report = read_json_line(child)
        assert report["spooled"] == report["accepted"] > 0
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    # A writer that does not chain still writes the dead writer's stamped rows with their
    # digests; one that does also writes its own rows in a stream of its own.
    writer = writers(chained.dsn, _As(chained), spool_dir=spool, chain=replayer_chains)
    live = 100 if replayer_chains else 0
    for i in range(live):
        writer.log("chain.live", request_id=f"live{i}")
    assert writer.flush(timeout=10)
    spooled = report["spooled"]
    assert _wait(lambda: writer.stats().replayed == spooled and segments(spool) == [])
    assert stored(chained) == spooled + live
    assert skips(chained) == []
    assert_clean(chained)


def test_outage_spooled_then_replayed_by_the_same_writer(
    proxy: Proxy, chained: Chained, writers: WriterMaker, tmp_path: Path
) -> None:
    writer = chain_writer(
        writers, proxy.dsn, chained, spool_dir=tmp_path / "spool", spool_after=0.2
    )
    caller = Caller(writer)
    caller.stream(500, chunk=100, pause=0.01)
    assert writer.flush(timeout=10)
    proxy.refuse(True)
    proxy.cut_all()
    caller.stream(1500, chunk=100, pause=0.01, start=500)
    assert _wait(lambda: writer.stats().spooled > 0)
    proxy.refuse(False)
    caller.stream(500, chunk=100, pause=0.01, start=2000)
    assert writer.flush(timeout=30)
    assert _wait(lambda: writer.stats().spooled == 0 and writer.stats().pending == 0)
    stats = writer.stats()
    assert stats.written == stored(chained) == 2500, stats
    summary = assert_clean(chained)
    assert summary.streams >= 2  # the rows handed to the spool keep the stream they had


def test_close_in_an_outage_leaves_no_false_alarm(
    proxy: Proxy, chained: Chained, writers: WriterMaker
) -> None:
    """Rows given up at close while the database is down are dead-lettered; their
    positions lie past the stream's last digest, so `verify` neither sees nor blames them."""
    writer = chain_writer(writers, proxy.dsn, chained, batch_size=100)
    caller = Caller(writer)
    caller.stream(300, chunk=100, pause=0.01)
    assert writer.flush(timeout=10)
    proxy.refuse(True)
    proxy.cut_all()
    caller.stream(200, chunk=100, start=300)
    writer.close(timeout=0.5)
    stats = writer.stats()
    assert stats.written == stored(chained) == 300 and stats.dead_lettered == 200, stats
    proxy.refuse(False)
    assert_clean(chained)


def _wait(predicate: Any, timeout: float = 30) -> bool:
    from ..helpers import wait_until

    return bool(wait_until(predicate, timeout=timeout))


# -- tampering with a table the writer wrote through faults --------------------------------


@pytest.fixture
def written(proxy: Proxy, chained: Chained, writers: WriterMaker) -> Chained:
    """Poison rows, a commit cut after it landed and a restart: a realistic table."""
    writer = chain_writer(writers, proxy.dsn, chained, batch_size=300)
    proxy.cut_on(CHAINED_COMMIT, forward=True, times=1)
    for i in range(900):
        writer.log("chain.tamper", request_id=str(i), resource_id=POISON if i % 250 == 7 else "ok")
    assert writer.flush(timeout=30)
    writer.close(timeout=10)
    again = AuditWriter(chained.dsn, schema=chained.schema, table=chained.table, chain=True, **FAST)
    for i in range(900, 1000):
        again.log("chain.tamper", request_id=str(i), metadata={"amount": i})
    again.close(timeout=10)
    assert stored(chained) == 1000 - 4
    assert_clean(chained)
    return chained


def _row(c: Chained, offset: int) -> tuple[str, uuid.UUID, int]:
    ident, stream, pos = c.sql(
        "SELECT id, chain_stream, chain_pos FROM {t} ORDER BY request_id::int OFFSET %s LIMIT 1",
        offset,
    )[0]
    return str(ident), stream, int(pos)


TAMPERING = {
    "metadata": (
        "UPDATE {t} SET metadata = jsonb_set(metadata, '{{amount}}', '1') WHERE id = %s",
        "MODIFIED",
    ),
    "action": (
        "UPDATE {t} SET action = overlay(action placing 'X' from 1 for 1) WHERE id = %s",
        "MODIFIED",
    ),
    "delete": ("DELETE FROM {t} WHERE id = %s", "MISSING"),
    "forge": (
        "INSERT INTO {t} (id, occurred_at, action, chain_stream, chain_pos) "
        "SELECT gen_random_uuid(), occurred_at, action, chain_stream, chain_pos FROM {t} "
        "WHERE id = %s",
        "DUPLICATE",
    ),
    "move": ("UPDATE {t} SET chain_pos = chain_pos + 1000000 WHERE id = %s", "EXTRA"),
}


@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_tampering_with_what_the_writer_wrote_is_found(written: Chained, how: str) -> None:
    statement, kind = TAMPERING[how]
    ident, stream, pos = _row(written, 950)
    written.sql(statement, ident)
    summary, found = check(written)
    assert summary.damaged
    assert kind in {f.kind for f in found}, [f.line() for f in found]
    hit = next(f for f in found if f.kind == kind)
    assert hit.stream == str(stream)
    if kind != "EXTRA":
        assert hit.first_pos == pos


def test_swapped_and_replaced_digest_are_found(written: Chained) -> None:
    a, stream, pa = _row(written, 10)
    b, _, pb = _row(written, 20)
    written.sql(
        "UPDATE {t} SET chain_pos = CASE id WHEN %s THEN %s ELSE %s END WHERE id IN (%s, %s)",
        uuid.UUID(a),
        pb,
        pa,
        uuid.UUID(a),
        uuid.UUID(b),
    )
    _, found = check(written)
    # REORDERED when both were in one batch, else each is a MODIFIED row of its batch.
    assert {(f.first_pos, f.id) for f in found} == {(pa, b), (pb, a)}, [f.line() for f in found]
    assert len({f.kind for f in found}) == 1 and found[0].kind in {"REORDERED", "MODIFIED"}
    written.sql("ALTER TABLE {d} DISABLE TRIGGER USER")
    with psycopg.connect(written.dsn, autocommit=True) as conn:
        conn.execute(
            written.compose(
                "UPDATE {d} SET hash = sha256(hash) WHERE stream = %s AND first_pos = "
                "(SELECT min(first_pos) FROM {d} WHERE stream = %s)"
            ),
            (stream, stream),
        )
    _, found = check(written)
    assert "BROKEN" in {f.kind for f in found}, [f.line() for f in found]


def test_tail_cut_behind_a_checkpoint_and_an_unchained_forgery_are_found(
    written: Chained,
) -> None:
    from auditq.checkpoint import keygen, make_checkpoint

    key = keygen("test.example/ckpt")
    with psycopg.connect(written.dsn) as conn:
        make_checkpoint(conn, written.schema, written.table, key)
    _, stream, pos = _row(written, 990)  # the second writer's stream, near its end
    written.sql("ALTER TABLE {d} DISABLE TRIGGER USER")
    written.sql("DELETE FROM {t} WHERE chain_stream = %s AND chain_pos >= %s", stream, pos)
    written.sql("DELETE FROM {d} WHERE stream = %s AND first_pos + pos_count > %s", stream, pos)
    written.sql("INSERT INTO {t} (id, occurred_at, action) VALUES (gen_random_uuid(), now(), 'x')")
    found: list[Finding] = []
    summary = verify(
        Options(
            dsn=written.dsn,
            schema=written.schema,
            table=written.table,
            keys=(key.verifier(),),
        ),
        found.append,
    )
    assert summary.damaged and summary.signatures_checked
    kinds = {f.kind for f in found}
    assert {"TRUNCATED", "EXTRA"} <= kinds, [f.line() for f in found]
    assert next(f for f in found if f.kind == "TRUNCATED").stream == str(stream)


def test_partitioned_table_routed_copies_verify_clean(pg_dsn: str, writers: WriterMaker) -> None:
    """On a partitioned table the first attempt goes straight into the month's partition
    (`auditq.routes`) with the chain's columns; a batch spanning months goes through the
    parent."""
    made = Chained(pg_dsn, "public", f"chainp_{uuid.uuid4().hex[:10]}")
    made.setup(partitioned=True)
    try:
        writer = chain_writer(writers, pg_dsn, made, batch_size=200)
        for i in range(600):
            writer.log("chain.partitioned", request_id=str(i))
        assert writer.flush(timeout=20)
        assert writer.stats().written == stored(made) == 600
        summary = assert_clean(made)
        assert summary.rows == 600
    finally:
        made.drop()


def test_a_row_whose_position_was_sealed_is_not_counted_written(chained: Chained) -> None:
    """A stream's later rows replayed first seal the earlier positions as ABANDONED; when
    the earlier rows come after (another segment of the same dead writer), the stream's
    head covers them but the table does not hold them: they are `sealed` (dead-lettered by
    the sink), never `done` (counted as written)."""
    from auditq import binary
    from auditq.chainlink import Chainer, pos_of

    from ..chain_build import encoded, make_row

    chainer = Chainer(chained.schema, chained.table, enabled=True)
    stamped, _ = chainer.stamp(b"".join(encoded(make_row(i)) for i in range(4)))
    items: list[tuple[bytes, Any]] = [(t, None) for t in binary.split_rows(stamped)]
    chainer.live = None  # a dead writer's stream: only replays continue it
    cols = ", ".join(f'"{c}"' for c in LEAF_COLUMNS_V1)
    with psycopg.connect(chained.dsn) as conn:
        plan = chainer.plan(conn, items[2:], reconcile=False)
        assert [pos_of(i[0]) for i in plan.todo] == [3, 4]
        statement = chained.compose("COPY {t} (" + cols + ") FROM STDIN (FORMAT BINARY)")
        with conn.cursor() as cur, cur.copy(statement) as copy:
            copy.write(binary.HEADER + b"".join(i[0] for i in plan.todo) + binary.TRAILER)
        record = chainer.seal(plan, plan.todo, [])
        assert record is not None
        chainer.insert(conn, record)
    chainer.committed(plan.stream, record)
    with psycopg.connect(chained.dsn) as conn:
        late = chainer.plan(conn, items[:2], reconcile=True)
        again = chainer.plan(conn, items[2:], reconcile=True)
    assert (late.todo, late.done, [pos_of(i[0]) for i in late.sealed]) == ([], [], [1, 2])
    assert (again.todo, [pos_of(i[0]) for i in again.done], again.sealed) == ([], [3, 4], [])
    assert skips(chained) == [int(Skip.ABANDONED)] * 2
    assert_clean(chained)
