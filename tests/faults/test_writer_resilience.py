"""The writer against its own surprises: a spool whose disk refuses writes, a dead-letter
callback that raises SystemExit, a writer thread that ends, a spooled record the server keeps
refusing. Each loses nothing more than the plain writer would, and says so once."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from auditq import AuditWriter, DeadLetter

from ..conftest import Table, WriterFactory
from ..helpers import wait_until
from .conftest import Caller, WriterMaker, stored_numbers
from .proxy import Proxy


class Unencodable:
    """An id whose own code raises when the writer encodes it: a kind of content that is
    still a dead letter (docs/fields.md), which these tests need."""

    def __repr__(self) -> str:
        raise RuntimeError("no text for this value")

    __str__ = __repr__


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a 64 KiB tmpfs, with the spool's directory made and the rest filled."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: the disk is full
    finally:
        os.close(fd)


def test_a_spool_on_a_full_disk_keeps_entries_in_memory_like_no_spool(
    proxy: Proxy,
    table: Table,
    writers: WriterMaker,
    full_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spool_dir = full_disk / "spool"
    writer = writers(
        proxy.dsn,
        table,
        batch_size=500,
        max_queue=20_000,
        spool_dir=spool_dir,
        spool_after=0.2,
        warn_interval=60,
        retry_backoff_max=0.2,
    )
    caller = Caller(writer)
    before = caller.stream(500, chunk=250)
    assert writer.flush(timeout=10)
    fill(full_disk)
    caplog.set_level(logging.WARNING, logger="auditq")
    proxy.refuse(True)  # an outage longer than spool_after, with a spool that cannot write
    during = caller.stream(8_000, chunk=500, pause=0.15, start=500)
    mid = writer.stats()
    assert mid.dead_lettered == 0, mid  # before the fix: thousands, "the spool refused them"
    proxy.refuse(False)
    assert writer.flush(timeout=30)
    stats = writer.stats()
    assert stats.dead_lettered == stats.dropped_overflow == stats.spooled == 0, stats
    assert stats.written == stats.accepted == 8_500
    assert before + during == list(range(8_500))
    assert stored_numbers(table) == list(range(8_500))
    refusals = [r for r in caplog.records if "spool refused" in r.getMessage()]
    assert 1 <= len(refusals) <= 2, [r.getMessage() for r in refusals]  # not one per batch
    assert not [r for r in caplog.records if r.exc_info]  # no traceback per refused append


def test_a_dead_letter_file_on_a_full_disk_reports_once(
    table: Table, make_writer: WriterFactory, full_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = make_writer(spool_dir=full_disk / "spool", warn_interval=60)
    fill(full_disk)
    caplog.set_level(logging.ERROR, logger="auditq")
    for n in range(200):
        assert writer.log("bad", id=Unencodable(), request_id=str(n))  # dead on the writer
        if n % 50 == 49:
            assert writer.flush(timeout=10)
    writer.close(timeout=10)
    assert writer.stats().dead_lettered == 200
    lines = [r.getMessage() for r in caplog.records if "dead-letter file" in r.getMessage()]
    assert 1 <= len(lines) <= 2, lines
    assert not [r for r in caplog.records if r.exc_info]


def test_a_dead_letter_callback_raising_systemexit_does_not_stop_the_writer(
    table: Table, make_writer: WriterFactory
) -> None:
    seen: list[DeadLetter] = []

    def handler(letter: DeadLetter) -> None:
        seen.append(letter)
        raise SystemExit("a callback that exits")

    writer = make_writer(on_dead_letter=handler)
    assert writer.log("bad", id=Unencodable())
    assert writer.flush(timeout=10)
    assert len(seen) == 1
    for n in range(100):
        assert writer.log("after", request_id=str(n))
    assert writer.flush(timeout=10)  # before the fix: the thread was gone, this timed out
    assert writer.stats().written == 100 == table.count()


def test_a_writer_thread_that_ends_is_restarted_by_the_next_call(
    table: Table, make_writer: WriterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    writer: AuditWriter = make_writer()
    assert writer.log("first")
    assert writer.flush(timeout=10)
    first = writer._thread
    assert first is not None
    step = writer._step
    writer._step = lambda: False  # type: ignore[method-assign]  # the loop ends, unasked
    writer._wake.set()
    first.join(timeout=10)
    assert not first.is_alive()
    writer._step = step  # type: ignore[method-assign]
    assert any("stopped unexpectedly" in r.getMessage() for r in caplog.records)
    assert writer.log("second")  # starts a new thread
    assert writer.flush(timeout=10)
    assert writer._thread is not None and writer._thread is not first
    assert table.count() == 2


def test_rejections_are_reported_per_reason_with_an_example_action(
    make_writer: WriterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    writer = make_writer(warn_interval=60)
    caplog.set_level(logging.WARNING, logger="auditq")
    assert not writer.log("")
    assert not writer.log("")
    assert not writer.log("billing.export", colour="red")  # type: ignore[call-arg]
    assert not writer.write({"action": "user.login", "user": 1})
    writer.close(timeout=5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected")]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("rejected 4 invalid entries")
    assert "2 x action must be a non-empty string" in line
    assert "e.g. action 'billing.export'" in line and "e.g. action 'user.login'" in line


def test_without_spool_or_callback_each_dead_letter_is_logged_as_json(
    make_writer: WriterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    caplog.set_level(logging.ERROR, logger="auditq.dead_letters")
    writer = make_writer()
    assert writer.log("bad.tenant", id=Unencodable(), metadata={"k": [1, 2]})
    assert writer.flush(timeout=10)
    records = [r for r in caplog.records if r.name == "auditq.dead_letters"]
    assert len(records) == 1
    letter = json.loads(records[0].getMessage())
    assert letter["entry"]["action"] == "bad.tenant"
    assert letter["entry"]["metadata"] == {"k": [1, 2]}  # an object, not JSON text
    assert "own code failed" in letter["reason"]


def test_many_dead_letters_at_once_are_logged_a_hundred_lines_a_record(
    make_writer: WriterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # close()'s leftovers (up to max_queue of them) logged a record each took seconds past
    # its timeout; in records of LETTERS_PER_RECORD JSON lines every letter is still there.
    import json

    from auditq.ledger import LETTERS_PER_RECORD

    caplog.set_level(logging.ERROR, logger="auditq.dead_letters")
    writer = make_writer(
        "postgresql://auditq@127.0.0.1:9/nowhere", wake_rows=10**6, flush_interval=3600
    )
    for n in range(250):
        assert writer.log("never.written", request_id=str(n))
    assert writer.close(timeout=0.5) is False
    records = [r for r in caplog.records if r.name == "auditq.dead_letters"]
    lines = [line for r in records for line in r.getMessage().split("\n")]
    assert sorted(int(json.loads(line)["entry"]["request_id"]) for line in lines) == list(
        range(250)
    )
    assert len(records) == 3 and max(r.getMessage().count("\n") + 1 for r in records) == (
        LETTERS_PER_RECORD
    )
    assert writer.stats().dead_lettered == 250


def test_the_dead_letter_file_keeps_metadata_as_an_object(
    make_writer: WriterFactory, tmp_path: Path
) -> None:
    import json

    writer = make_writer(spool_dir=tmp_path)
    assert writer.log("bad.tenant", id=Unencodable(), metadata={"k": {"n": 1}})
    assert writer.flush(timeout=10)
    lines = (tmp_path / "dead-letters.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["entry"]["metadata"] == {"k": {"n": 1}}


def test_flush_from_many_threads_while_one_writer_restarts(
    table: Table, make_writer: WriterFactory
) -> None:
    """Guard for the restart: concurrent first calls start exactly one thread."""
    writer = make_writer()
    barrier = threading.Barrier(4)

    def burst(offset: int) -> None:
        barrier.wait()
        for n in range(250):
            writer.log("burst", request_id=str(offset + n))

    threads = [threading.Thread(target=burst, args=(k * 250,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writer.flush(timeout=10)
    assert wait_until(lambda: table.count() == 1000, timeout=10)
    auditq_threads = [t for t in threading.enumerate() if t.name == f"auditq[{writer.name}]"]
    assert len(auditq_threads) == 1


def test_a_spooled_record_the_server_keeps_refusing_is_isolated(
    proxy: Proxy, table: Table, writers: WriterMaker, tmp_path: Path
) -> None:
    letters: list[DeadLetter] = []
    writer = writers(
        proxy.dsn,
        table,
        batch_size=100,
        spool_dir=tmp_path,
        spool_after=0.1,
        retry_backoff_max=0.2,
        on_dead_letter=letters.append,
    )
    proxy.refuse(True)
    for n in range(300):
        assert writer.log("poison" if n == 150 else "ok", request_id=str(n))
    assert writer.flush(timeout=20)
    assert writer.stats().spooled == 300
    # The server now answers every try of that one row with a connection-class error, which
    # alone would be retried as an outage, forever, and hold up every later record.
    table.execute(
        """CREATE FUNCTION {table}_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.action = 'poison' THEN
                RAISE EXCEPTION 'simulated protocol trouble' USING ERRCODE = '08P01';
            END IF;
            RETURN NEW;
        END $$""".replace("{table}_poison", f"{table.schema}.p_{table.name}")
    )
    table.execute(
        f"CREATE TRIGGER poison BEFORE INSERT ON {{table}} FOR EACH ROW "
        f"EXECUTE FUNCTION {table.schema}.p_{table.name}()"
    )
    proxy.refuse(False)
    assert wait_until(lambda: writer.stats().spooled == 0, timeout=30), writer.stats()
    for n in range(300, 400):
        assert writer.log("after", request_id=str(n))
    assert writer.flush(timeout=10)
    stats = writer.stats()
    assert stats.written == 399 and stats.dead_lettered == 1, stats
    assert [letter.entry["request_id"] for letter in letters] == ["150"]
    assert "gave up" in letters[0].reason
    assert stored_numbers(table) == [n for n in range(400) if n != 150]


def test_a_refused_login_is_one_clear_error_and_entries_wait_for_the_fix(
    table: Table, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing role (or wrong password) is configuration, not an outage: one error line
    with the fix, no warning per retry, entries kept and written once the role exists."""
    import uuid

    import psycopg
    from psycopg.conninfo import make_conninfo

    role = f"aq_login_{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.INFO, logger="auditq")
    writer = AuditWriter(
        make_conninfo(table.dsn, user=role),
        schema=table.schema,
        table=table.name,
        retry_backoff_max=0.1,
    )
    try:
        for n in range(10):
            assert writer.log("waits.for.login", request_id=str(n))
        assert not writer.flush(timeout=2)
        stats = writer.stats()
        assert stats.pending == 10 and stats.dead_lettered == 0, stats
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "check the user in the DSN" in errors[0], errors
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
        with psycopg.connect(table.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
        try:
            assert writer.flush(timeout=15)
            assert writer.stats().written == 10 == table.count()
        finally:
            writer.close(timeout=5)
            with psycopg.connect(table.dsn, autocommit=True) as conn:
                conn.execute(f'DROP ROLE "{role}"')
    finally:
        writer.close(timeout=1)
