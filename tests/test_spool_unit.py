"""The disk spool on its own: real files, real locks, no database and no mocks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from auditq.binary import decode_row, encode_row
from auditq.entry import COLUMNS
from auditq.spool import (
    DEAD_LETTER_FILE,
    RECORD_OVERHEAD,
    SEGMENT_SUFFIX,
    Damage,
    Spool,
    SpoolFull,
    inspect_segments,
    read_records,
)

from .helpers import ROOT


def rows(start: int, count: int) -> list[bytes]:
    """Binary COPY tuples numbered by request_id, as the writer spools them."""
    out = []
    for i in range(start, start + count):
        row = [None] * len(COLUMNS)
        row[1] = time.time_ns()
        row[2] = "spool.unit"
        row[11] = str(i)
        out.append(encode_row(tuple(row))[0])  # type: ignore[arg-type]
    return out


def numbers(batch: list[bytes]) -> list[int]:
    return [int(decode_row(data)["request_id"]) for data in batch]


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"seg-*{SEGMENT_SUFFIX}"))


def read_all(path: Path, damage: list[Damage] | None = None) -> list[int]:
    handler = None if damage is None else damage.append
    return [n for record in read_records(path, 0, handler) for n in numbers(record.rows)]


def test_records_come_back_in_order_across_segments(tmp_path: Path) -> None:
    for start in (0, 100, 200):  # one writer (and so one segment) each, created in order
        spool = Spool(tmp_path, fsync="always")
        spool.append(rows(start, 50))
        spool.append(rows(start + 50, 50))
        spool.append([])  # nothing to spool: no record
        spool.close()
    reader = Spool(tmp_path)
    claimed = list(reader.claim())
    assert [own for _, own in claimed] == [False, False, False]  # orphans: their writers closed
    assert [p for p, _ in claimed] == segments(tmp_path)
    got = [n for path, _ in claimed for n in read_all(path)]
    assert got == list(range(300))
    records = list(read_records(claimed[0][0]))
    assert len(records) == 2 and records[-1].end == claimed[0][0].stat().st_size
    for path, _ in claimed:
        reader.done(path)
    assert segments(tmp_path) == []
    assert reader.owned_rows() == 0


def test_torn_tail_keeps_the_records_before_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(rows(0, 10))
    spool.append(rows(10, 10))
    spool.close()
    (path,) = segments(tmp_path)
    whole = path.stat().st_size
    with open(path, "r+b") as handle:  # the writer died in the middle of the second record
        handle.truncate(whole - 7)
    damage: list[Damage] = []
    assert read_all(path, damage) == list(range(10))
    assert len(damage) == 1 and damage[0].what == "torn record at the end"
    assert damage[0].offset + damage[0].length == whole - 7
    # A header cut short is a torn tail too.
    with open(path, "r+b") as handle:
        handle.truncate(damage[0].offset + 5)
    damage.clear()
    assert read_all(path, damage) == list(range(10)) and damage[0].length == 5


def test_corrupt_record_is_skipped_and_reading_resumes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for start in (0, 10, 20):
        spool.append(rows(start, 10))
    spool.close()
    (path,) = segments(tmp_path)
    first = next(read_records(path)).end
    data = bytearray(path.read_bytes())
    data[first + 40] ^= 0xFF  # a flipped bit in the second record's payload
    path.write_bytes(bytes(data))
    damage: list[Damage] = []
    assert read_all(path, damage) == list(range(10)) + list(range(20, 30))
    assert [(d.what, d.offset) for d in damage] == [("corrupt record", first)]
    assert inspect_segments(tmp_path)[0]["damaged_bytes"] == damage[0].length


def test_two_spools_never_claim_the_same_segment(tmp_path: Path) -> None:
    a, b = Spool(tmp_path), Spool(tmp_path)
    a.append(rows(0, 5))
    assert [own for _, own in a.claim()] == [True]
    assert list(b.claim()) == []  # a live writer holds it (flock: even in one process)
    assert inspect_segments(tmp_path)[0]["owned_by_live_writer"] is True
    a.close()  # gone: its segment is an orphan now
    assert inspect_segments(tmp_path)[0]["owned_by_live_writer"] is False
    (claimed,) = list(b.claim())
    assert claimed[1] is False
    c = Spool(tmp_path)
    assert list(c.claim()) == []  # b holds it now
    b.release(claimed[0])
    assert [own for _, own in c.claim()] == [False]
    c.done(claimed[0])
    assert list(b.claim()) == [] and segments(tmp_path) == []


def test_a_segment_of_a_live_process_is_not_claimed_until_it_dies(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from auditq.spool import Spool
        from tests.test_spool_unit import rows
        spool = Spool({str(tmp_path)!r}, fsync="never")
        spool.append(rows(0, 20))
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        spool = Spool(tmp_path)
        assert list(spool.claim()) == []
        assert inspect_segments(tmp_path)[0]["owned_by_live_writer"] is True
    finally:
        child.kill()
        child.wait(10)
    (path, own), *_ = list(spool.claim())  # the lock died with the process
    assert own is False and read_all(path) == list(range(20))
    spool.close()


def header_bytes(directory: Path) -> int:
    """The size of a segment header written by a Spool with no target (in `directory`)."""
    probe = Spool(directory / "probe")
    probe.append(rows(0, 1))
    (path,) = segments(directory / "probe")
    size = path.stat().st_size - RECORD_OVERHEAD - len(rows(0, 1)[0])
    probe.close()
    return size


def test_size_bound(tmp_path: Path) -> None:
    batch = rows(0, 10)
    record = RECORD_OVERHEAD + sum(map(len, batch))
    header = header_bytes(tmp_path / "elsewhere")
    spool = Spool(tmp_path, max_bytes=header + 3 * record + 10)
    for _ in range(3):
        spool.append(batch)
    with pytest.raises(SpoolFull, match="spool_max_bytes"):
        spool.append(batch)
    (path,) = segments(tmp_path)
    assert path.stat().st_size == header + 3 * record  # the refused record left nothing

    assert spool.owned_rows() == 30 and spool.segment_rows(path) == 30
    # The bound counts every writer's segments.
    other = Spool(tmp_path, max_bytes=2 * header + 4 * record)
    other.append(batch)
    with pytest.raises(SpoolFull):
        other.append(batch)
    spool.done(path)  # replayed: room again
    spool.append(batch)


def test_dead_letter_file_has_one_line_per_letter(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.write_dead_letters(
        [{"entry": {"action": "a", "n": i}, "reason": f"r{i}"} for i in range(3)]
    )
    spool.write_dead_letters([])
    spool.write_dead_letters([{"entry": {"action": "b"}, "reason": "why"}])
    lines = (tmp_path / DEAD_LETTER_FILE).read_bytes().splitlines()
    assert [orjson.loads(line)["reason"] for line in lines] == ["r0", "r1", "r2", "why"]
    assert orjson.loads(lines[1])["entry"] == {"action": "a", "n": 1}


def test_the_dead_letter_file_has_a_bound_of_its_own(tmp_path: Path) -> None:
    """Refused entries become dead letters exactly when the spool is full, so the file they
    go to is bounded too, or a long outage would fill the disk through it. Its bound is its
    own: old letters (the file is never trimmed) must not shut the spool, and a full spool
    must not refuse the letters of rows a replay gives up on."""
    batch = rows(0, 10)
    record = RECORD_OVERHEAD + sum(map(len, batch))
    letter = {"entry": {"action": "a", "n": 0}, "reason": "spool would exceed the bound"}
    line = len(orjson.dumps(letter)) + 1
    spool = Spool(tmp_path, max_bytes=header_bytes(tmp_path / "elsewhere") + 2 * record + 10)
    assert line * 3 < spool.max_bytes
    spool.append(batch)
    spool.append(batch)
    with pytest.raises(SpoolFull):
        spool.append(batch)  # the segments are full ...
    letters = [{**letter, "entry": {"action": "a", "n": i}} for i in range(40)]
    sizes = [len(orjson.dumps(x)) + 1 for x in letters]
    fitting = next(k for k in range(len(sizes) + 1) if sum(sizes[: k + 1]) > spool.max_bytes)
    assert 3 < fitting < len(letters)
    assert spool.write_dead_letters(letters) == fitting  # ... the letters still go in
    lines = (tmp_path / DEAD_LETTER_FILE).read_bytes().splitlines()
    assert [orjson.loads(x)["entry"]["n"] for x in lines] == list(range(fitting))  # oldest
    assert spool.dead_letter_bytes() == sum(sizes[:fitting]) <= spool.max_bytes
    assert spool.write_dead_letters(letters) == 0  # full: nothing, and no partial line
    assert spool.dead_letter_bytes() == sum(sizes[:fitting])
    (path, *_) = segments(tmp_path)
    spool.done(path)  # a segment replayed: room for segments, not for letters
    spool.append(batch)
    assert spool.write_dead_letters(letters) == 0
    (tmp_path / DEAD_LETTER_FILE).rename(tmp_path / "dead-letters.1.jsonl")  # moved aside
    assert spool.write_dead_letters(letters[:2]) == 2
    spool.close()


def test_a_forked_child_does_not_inherit_a_held_lock(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(rows(0, 1))
    spool._lock.acquire()  # as if a parent thread were inside append() at the fork
    spool._letters_lock.acquire()
    try:
        spool.forget_after_fork()  # what the child runs: must not wait on the parent's locks
        spool.append(rows(1, 1))
        assert spool.write_dead_letters([{"entry": {}, "reason": "r"}]) == 1
    finally:
        spool.close()


def test_new_segments_start_past_segment_bytes_and_stale_temps_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import auditq.spool

    monkeypatch.setattr(auditq.spool, "SEGMENT_BYTES", 4000)
    stale, young = tmp_path / ".new-seg-0-1-x.aqs", tmp_path / ".new-seg-9-1-y.aqs"
    stale.write_bytes(b"")  # a writer died while creating it
    os.utime(stale, (time.time() - 120, time.time() - 120))
    young.write_bytes(b"")  # another writer is creating it right now
    spool = Spool(tmp_path)
    for start in range(0, 100, 10):
        spool.append(rows(start, 10))
    assert len(segments(tmp_path)) > 2
    claimed = [path for path, own in spool.claim() if own]
    assert claimed == segments(tmp_path)
    assert [n for path in claimed for n in read_all(path)] == list(range(100))
    assert list(tmp_path.glob(".new-*")) == [young]
    spool.append(rows(100, 1))  # the active segment was sealed by claim(): a new one
    assert len(segments(tmp_path)) == len(claimed) + 1
    spool.close()
