"""The disk spool against a real server: long outages, the size bound, SIGKILL, two live
writers on one spool, close() during an outage, and the operator commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from psycopg.conninfo import conninfo_to_dict

from auditq import AuditWriter, WriterStats
from auditq.cli import main
from auditq.spool import DEAD_LETTER_FILE, SEGMENT_SUFFIX, Spool, SpoolTarget, spool_target
from auditq.writer import DeadLetter

from ..conftest import Table
from ..helpers import ROOT, wait_until
from ..pgserver import EmbeddedServer
from ..test_spool_unit import rows
from .conftest import Caller, WriterMaker, start_server, stop_server, stored_numbers
from .proxy import Proxy

AUDITQ = str(Path(sys.executable).with_name("auditq"))


def balanced(stats: WriterStats) -> bool:
    return stats.accepted == stats.written + stats.dead_lettered + stats.spooled + stats.pending


class Sampler:
    """Takes stats() snapshots from another thread while a test runs; each must balance."""

    def __init__(self, writer: AuditWriter) -> None:
        self.writer = writer
        self.snapshots: list[WriterStats] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.snapshots.append(self.writer.stats())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        unbalanced = [s for s in self.snapshots if not balanced(s)]
        assert not unbalanced, unbalanced[:3]


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"seg-*{SEGMENT_SUFFIX}"))


def dead_port_dsn(like: str | None = None) -> str:
    """A DSN nothing listens on: every connection is refused at once. With `like`, it names
    the same database (a spool segment names its database, and only a writer on that
    database replays it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dbname = conninfo_to_dict(like).get("dbname", "postgres") if like else "nowhere"
    return f"postgresql://postgres@127.0.0.1:{port}/{dbname}"


def target_of(table: Table) -> SpoolTarget:
    """What a writer on `table` names in its segments' headers."""
    return spool_target(table.schema, table.name, table.dsn)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AUDITQ_DSN", "DATABASE_URL")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def spawn(source: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(source)],
        cwd=ROOT,
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_json_line(child: subprocess.Popen[str]) -> Any:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        child.wait(10)
        assert child.stderr is not None
        raise AssertionError(f"child said nothing (rc={child.returncode}): {child.stderr.read()}")
    return json.loads(line)


# -- an outage longer than the queue -------------------------------------------------------


def test_outage_longer_than_the_queue_spools_and_replays(
    proxy: Proxy, table: Table, writers: WriterMaker, tmp_path: Path
) -> None:
    writer = writers(
        proxy.dsn, table, batch_size=250, max_queue=2000, spool_dir=tmp_path, spool_after=0.3
    )
    caller = Caller(writer)
    with Sampler(writer) as sampler:
        before = caller.stream(1000, chunk=250)
        assert writer.flush(timeout=10)

        proxy.refuse(True)  # the server is gone
        # 20k entries over ~2 s: ten times what the queue holds.
        during = caller.stream(20_000, chunk=500, pause=0.05, start=1000)
        assert writer.flush(timeout=10)  # spooled counts as durable
        mid = writer.stats()
        assert balanced(mid) and mid.pending == 0
        assert mid.spooled > 15_000, mid
        assert mid.written == 1000
        # One segment: a failing probe claims (and so seals) nothing.
        assert len(segments(tmp_path)) == 1

        proxy.refuse(False)  # back: the spool drains with no further log() call
        assert wait_until(lambda: writer.stats().spooled == 0, timeout=20)
        after = caller.stream(1000, chunk=250, start=21_000)
        assert writer.flush(timeout=10)

    stats = writer.stats()
    print(f"\n[spool outage] {len(sampler.snapshots)} snapshots, peak spooled {mid.spooled}")
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
    assert stats.pending == stats.spooled == 0
    assert stats.written == stats.accepted == caller.calls == 22_000
    assert before + during + after == list(range(22_000))  # nothing refused, nothing dropped
    assert table.count() == stats.written == table.distinct_ids()
    assert stored_numbers(table) == list(range(22_000))
    assert segments(tmp_path) == []
    caller.check_latency("outage > queue, with spool")


def test_server_stopped_with_a_spool(
    own_server: EmbeddedServer, own_table: Table, writers: WriterMaker, tmp_path: Path
) -> None:
    """The same with a real immediate-mode stop, logging on while the server comes back:
    the spool is replayed in the order it was written."""
    writer = writers(
        own_server.dsn,
        own_table,
        batch_size=200,
        max_queue=1000,
        spool_dir=tmp_path,
        spool_after=0.2,
    )
    caller = Caller(writer)
    caller.stream(500)
    assert writer.flush(timeout=10)
    stop_server(own_server)
    with Sampler(writer):
        caller.stream(6000, chunk=500, pause=0.05, start=500)
        assert writer.flush(timeout=10)
        assert writer.stats().spooled > 4000
        start_server(own_server)
        caller.stream(2000, chunk=200, pause=0.02, start=6500)
        assert writer.flush(timeout=20)
        assert wait_until(lambda: writer.stats().spooled == 0, timeout=20)
    stats = writer.stats()
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == stats.pending == 0
    assert stats.written == stats.accepted == 8500
    assert own_table.count() == own_table.distinct_ids() == 8500
    assert stored_numbers(own_table) == list(range(8500))
    # The spool was replayed in the order it was spooled: one transaction per record,
    # so the transaction ids of the outage's rows never go down.
    xids = dict(own_table.query("SELECT request_id::int, xmin::text::bigint FROM {table}"))
    outage = [xids[n] for n in range(500, 6500)]
    assert outage == sorted(outage) and len(set(outage)) > 10
    caller.check_latency("server stopped, with spool")


# -- the size bound and the dead-letter file -----------------------------------------------


def test_spool_max_bytes_dead_letters_the_rest(
    proxy: Proxy,
    table: Table,
    writers: WriterMaker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    letters: list[DeadLetter] = []
    writer = writers(
        proxy.dsn,
        table,
        batch_size=100,
        max_queue=1000,
        spool_dir=tmp_path,
        spool_after=0.1,
        spool_max_bytes=64 * 1024,
        on_dead_letter=letters.append,
    )
    caller = Caller(writer)
    proxy.refuse(True)
    accepted = caller.stream(3000, chunk=100, pause=0.02)
    assert writer.flush(timeout=10)

    stats = writer.stats()
    assert balanced(stats) and stats.pending == 0
    assert stats.dead_lettered > 0 and stats.spooled > 0
    assert stats.spooled + stats.dead_lettered == 3000 == len(accepted)
    spooled_bytes = sum(p.stat().st_size for p in segments(tmp_path))
    assert spooled_bytes <= 64 * 1024
    assert len(letters) == stats.dead_lettered
    assert all("spool_max_bytes=65536" in d.reason for d in letters)
    # One line per dead letter in the JSONL, each with the entry and the reason, oldest
    # first, as many as the file's own bound (the same spool_max_bytes) allows.
    letter_file = tmp_path / DEAD_LETTER_FILE
    assert letter_file.stat().st_size <= 64 * 1024
    lines = [orjson.loads(x) for x in letter_file.read_bytes().splitlines()]
    assert 0 < len(lines) <= stats.dead_lettered
    assert [int(line["entry"]["request_id"]) for line in lines] == [
        int(d.entry["request_id"]) for d in letters[: len(lines)]
    ]
    assert {line["reason"] for line in lines} <= {d.reason for d in letters}
    assert all(line["entry"]["action"] == "fault.test" and line["at"] for line in lines)
    unfiled = stats.dead_lettered - len(lines)

    proxy.refuse(False)
    spooled = stats.spooled
    assert wait_until(lambda: writer.stats().spooled == 0, timeout=20)
    stats = writer.stats()
    assert stats.written == spooled and stats.dead_lettered == 3000 - spooled
    assert balanced(stats)
    dead_numbers = {int(d.entry["request_id"]) for d in letters}
    assert stored_numbers(table) == sorted(set(range(3000)) - dead_numbers)
    assert table.count() == table.distinct_ids() == stats.written
    writer.close(timeout=5)  # its last report says how many letters were not filed, if any
    assert ("dead letters since the last report were not written" in caplog.text) == (unfiled > 0)


# -- SIGKILL with a non-empty spool --------------------------------------------------------

SPOOLING_CHILD = """
    import json, sys, time
    from auditq import AuditWriter
    writer = AuditWriter(
        {dsn!r}, schema={schema!r}, table={table!r}, spool_dir={spool!r}, spool_after=0.1,
        spool_fsync="never", max_queue=1000, batch_size=200, flush_interval=0.05,
        retry_backoff_max=0.2, connect_timeout=1,
    )
    accepted = [i for i in range({count}) if writer.log("spool.kill", request_id=str(i))]
    assert writer.flush(timeout=30)
    stats = writer.stats()
    print(json.dumps({{"accepted": accepted, "spooled": stats.spooled,
                       "dead": stats.dead_lettered, "pending": stats.pending}}), flush=True)
    time.sleep(120)  # killed here, holding its segments
"""


def test_sigkill_with_a_spool_then_a_new_writer_replays_it(
    pg_dsn: str, table: Table, writers: WriterMaker, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    child = spawn(
        SPOOLING_CHILD.format(
            dsn=dead_port_dsn(pg_dsn),
            schema=table.schema,
            table=table.name,
            spool=str(spool),
            count=5000,
        )
    )
    try:
        report = read_json_line(child)
        assert report["pending"] == report["dead"] == 0
        assert report["spooled"] == len(report["accepted"]) > 0
        assert Spool(spool).size_bytes() > 0 and list(Spool(spool).claim()) == []  # held
    finally:
        child.send_signal(signal.SIGKILL)  # no close(), no atexit, no fsync
        child.wait(10)
    kept = tmp_path / "copy"
    shutil.copytree(spool, kept)

    writer = writers(pg_dsn, table, spool_dir=spool)
    assert writer.flush(timeout=5)  # starts the thread: its first wake-up replays orphans
    spooled = report["spooled"]
    assert wait_until(lambda: writer.stats().replayed == spooled, timeout=20), writer.stats()
    stats = writer.stats()
    assert stats.accepted == stats.written == stats.spooled == stats.pending == 0
    assert stats.replay_dead_lettered == 0
    assert stored_numbers(table) == report["accepted"]
    assert table.count() == table.distinct_ids() == spooled
    assert segments(spool) == []

    # A crash mid-replay leaves a segment that was (partly) written: replaying it again
    # writes nothing twice.
    for path in segments(kept):
        shutil.copy(path, spool / path.name)
    writer.close(timeout=5)
    again = writers(pg_dsn, table, spool_dir=spool)
    assert again.flush(timeout=5)
    assert wait_until(lambda: segments(spool) == [], timeout=20)
    assert wait_until(lambda: again.stats().replayed == spooled, timeout=5)  # found stored
    assert table.count() == table.distinct_ids() == spooled
    assert stored_numbers(table) == report["accepted"]


# -- two live writers, one spool_dir -------------------------------------------------------

REPLAYING_CHILD = """
    import json, sys, time
    import auditq.spool
    from auditq import AuditWriter
    replayed = []
    done = auditq.spool.Spool.done
    def recording_done(self, path):
        replayed.append(path.name)
        done(self, path)
    auditq.spool.Spool.done = recording_done
    writer = AuditWriter({dsn!r}, schema={schema!r}, table={table!r}, spool_dir={spool!r},
                         flush_interval=0.01)
    print(json.dumps("ready"), flush=True)
    sys.stdin.readline()  # both start together
    writer.flush()
    deadline = time.monotonic() + 30
    while list(auditq.spool.Path({spool!r}).glob("seg-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.close(timeout=10)
    print(json.dumps({{"replayed": replayed, "rows": writer.stats().replayed}}), flush=True)
"""


def test_two_live_writers_never_replay_the_same_segment(
    pg_dsn: str, table: Table, tmp_path: Path
) -> None:
    total = 0
    for _ in range(40):  # 40 orphaned segments of 2 records each
        spool = Spool(tmp_path, fsync="never", target=target_of(table))
        spool.append(rows(total, 100))
        spool.append(rows(total + 100, 100))
        total += 200
        spool.close()
    names = sorted(p.name for p in segments(tmp_path))
    assert len(names) == 40
    source = REPLAYING_CHILD.format(
        dsn=pg_dsn, schema=table.schema, table=table.name, spool=str(tmp_path)
    )
    children = [spawn(source), spawn(source)]
    try:
        for child in children:
            assert read_json_line(child) == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        reports = [read_json_line(child) for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait(10)
    a, b = (set(r["replayed"]) for r in reports)
    print(f"\n[two writers] replayed {len(a)} and {len(b)} segments")
    assert not a & b, "a segment was replayed by both writers"
    assert sorted(a | b) == names
    assert reports[0]["rows"] + reports[1]["rows"] == total  # no segment counted twice
    assert table.count() == table.distinct_ids() == total
    assert stored_numbers(table) == list(range(total))


# -- close() during an outage --------------------------------------------------------------


def test_close_while_the_server_hangs_spools_and_the_next_writer_replays(
    proxy: Proxy, table: Table, writers: WriterMaker, tmp_path: Path
) -> None:
    writer = writers(proxy.dsn, table, batch_size=500, write_timeout=30.0, spool_dir=tmp_path)
    caller = Caller(writer)
    caller.stream(1000)
    assert writer.flush(timeout=10)

    proxy.blackhole(True)  # hung, and write_timeout is far away: only close() can cut it
    caller.stream(3000, chunk=500, start=1000)
    time.sleep(0.3)  # let the writer get stuck in a COPY
    started = time.monotonic()
    writer.close(timeout=1.5)
    took = time.monotonic() - started
    print(f"\n[close while hung, spool] close(timeout=1.5) returned after {took:.2f}s")
    assert took < 2.0
    stats = writer.stats()
    assert balanced(stats) and stats.pending == 0
    assert stats.written == 1000 and stats.spooled == 3000, stats
    assert stats.dead_lettered == stats.dropped_overflow == stats.rejected == 0
    assert not (tmp_path / DEAD_LETTER_FILE).exists()
    proxy.blackhole(False)
    time.sleep(0.5)  # the cut COPY reaches the server after the blackhole: it must abort

    following = writers(proxy.dsn, table, spool_dir=tmp_path)
    following.flush()
    assert wait_until(lambda: following.stats().replayed == 3000, timeout=20)
    assert following.stats().accepted == 0
    assert stored_numbers(table) == list(range(4000))
    assert table.count() == table.distinct_ids() == 4000
    caller.check_latency("close while hung, spool")


def test_close_while_the_server_refuses(
    proxy: Proxy, table: Table, writers: WriterMaker, tmp_path: Path
) -> None:
    writer = writers(proxy.dsn, table, batch_size=500, spool_dir=tmp_path, spool_after=60)
    proxy.refuse(True)
    for i in range(2000):
        writer.log("fault.test", request_id=str(i))
    started = time.monotonic()
    writer.close(timeout=2.0)
    assert time.monotonic() - started < 2.2
    stats = writer.stats()
    assert stats.pending == stats.written == stats.dead_lettered == 0
    assert stats.spooled == stats.accepted == 2000
    proxy.refuse(False)
    following = writers(proxy.dsn, table, spool_dir=tmp_path)
    following.flush()
    assert wait_until(lambda: following.stats().replayed == 2000, timeout=20)
    assert stored_numbers(table) == list(range(2000))


def test_an_orphan_cut_midway_resumes_where_this_writer_left_it(
    pg_dsn: str, table: Table, writers: WriterMaker, tmp_path: Path
) -> None:
    """A replay of another process's segment that loses its connection midway hands the
    segment back, and the writer's next try goes on from where it was: the rows it already
    wrote are not counted in `replayed` a second time."""
    spool = Spool(tmp_path, target=target_of(table))
    for start in (0, 100, 200):
        spool.append(rows(start, 100))  # three records
    spool.close()  # unlocked: an orphan
    seq = f"{table.name}_cut_once"
    table.execute(f"CREATE SEQUENCE {seq}")
    # The server drops the replaying connection once, at a row of the second record (the
    # sequence is not rolled back with the transaction, so it fires only the first time).
    table.execute(
        f"""CREATE FUNCTION {table.name}_cut() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.request_id = '150' AND nextval('{seq}') = 1 THEN
            PERFORM pg_terminate_backend(pg_backend_pid());
          END IF;
          RETURN NEW;
        END $$"""
    )
    table.execute(
        f"CREATE TRIGGER cut BEFORE INSERT ON {{table}} FOR EACH ROW EXECUTE FUNCTION "
        f"{table.name}_cut()"
    )
    writer = writers(pg_dsn, table, spool_dir=tmp_path)
    writer.flush()  # starts the thread: its first wake-up replays the orphan
    assert wait_until(lambda: segments(tmp_path) == [], timeout=20), writer.stats()
    assert table.query(f"SELECT last_value FROM {seq}")[0][0] >= 1  # the cut did happen
    assert writer.stats().retries >= 1
    assert stored_numbers(table) == list(range(300))
    assert table.count() == table.distinct_ids() == 300
    assert writer.stats().replayed == 300
    assert writer.stats().replay_dead_lettered == 0


# -- damage in a segment -------------------------------------------------------------------


def test_a_damaged_segment_is_replayed_around_the_damage(
    pg_dsn: str, table: Table, writers: WriterMaker, tmp_path: Path
) -> None:
    spool = Spool(tmp_path, target=target_of(table))
    for start in (0, 100, 200):
        spool.append(rows(start, 100))
    spool.close()
    (path,) = segments(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the second record
    path.write_bytes(bytes(data))
    writer = writers(pg_dsn, table, spool_dir=tmp_path)
    writer.flush()
    assert wait_until(lambda: writer.stats().replayed == 200, timeout=10)
    assert wait_until(lambda: segments(tmp_path) == [], timeout=5)
    assert stored_numbers(table) == list(range(100)) + list(range(200, 300))
    (line,) = (tmp_path / DEAD_LETTER_FILE).read_bytes().splitlines()
    letter = orjson.loads(line)
    assert letter["entry"]["segment"] == path.name and "corrupt record" in letter["reason"]


# -- the operator commands -----------------------------------------------------------------


class _NoText:
    def __repr__(self) -> str:
        raise LookupError("no text")


def test_spool_commands(
    pg_dsn: str, table: Table, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    writer = AuditWriter(
        dead_port_dsn(pg_dsn),
        schema=table.schema,
        table=table.name,
        spool_dir=tmp_path,
        connect_timeout=1,
    )
    for i in range(300):
        writer.log("cli.test", request_id=str(i), metadata={"n": i})
    # Content is stored repaired; a value whose own code raises is still dead-lettered.
    writer.write({"action": "cli.test", "request_id": "bad", "id": _NoText()})
    writer.close(timeout=3)
    assert writer.stats().spooled == 300 and writer.stats().dead_lettered == 1

    status = subprocess.run(
        [AUDITQ, "spool", "status", str(tmp_path)],
        capture_output=True,
        text=True,
        env=child_env(),
        check=True,
        timeout=30,
    )
    report = json.loads(status.stdout)
    assert report["rows"] == 300 and report["segments"] >= 1 and report["dead_letters"] == 1
    assert report["dead_letter_bytes"] == (tmp_path / DEAD_LETTER_FILE).stat().st_size > 0
    assert report["owned_by_live_writers"] == 0 and report["damaged_bytes"] == 0

    assert main(["spool", "inspect", str(tmp_path), "--rows", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = [json.loads(line) for line in out if not line.startswith("  ")]
    shown = [json.loads(line) for line in out if line.startswith("  ")]
    assert sum(s["rows"] for s in listed) == 300
    assert [r["request_id"] for r in shown[:2]] == ["0", "1"]
    assert len(shown) == 2 * len(listed)
    assert json.loads(shown[0]["metadata"]) == {"n": 0} and shown[0]["action"] == "cli.test"

    assert (
        main(
            [
                "spool",
                "replay",
                str(tmp_path),
                "--dsn",
                pg_dsn,
                "--schema",
                table.schema,
                "--table",
                table.name,
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["replayed"] == 300 and result["complete"] is True and result["rows_left"] == 0
    assert stored_numbers(table) == list(range(300))

    assert main(["spool", "status", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["segments"] == 0
    assert (
        main(["spool", "replay", str(tmp_path), "--dsn", dead_port_dsn(), "--timeout", "1"]) == 0
    )  # nothing left: complete at once
    assert main(["spool", "status", str(tmp_path / "nope")]) == 2


def test_spool_replay_command_takes_the_applications_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`auditq spool replay` holds what it files (dead letters) to AUDITQ_SPOOL_MAX_BYTES,
    as the application's writers do, not to the default."""
    seen: list[int] = []

    def replay(self: AuditWriter, timeout: float | None = None) -> bool:
        seen.append(self.spool_max_bytes)
        return True

    monkeypatch.setattr(AuditWriter, "replay_spool", replay)
    monkeypatch.setenv("AUDITQ_SPOOL_MAX_BYTES", "123456")
    assert main(["spool", "replay", str(tmp_path), "--dsn", dead_port_dsn()]) == 0
    assert seen == [123456]
    assert json.loads(capsys.readouterr().out)["complete"] is True
