"""The spool directory is a trust boundary (issue 14, items 10-12): its mode and owner, the
files in it, planted and foreign segments, damage, and segments for another table. Real
files in a real directory; the ownership cases need root (to give a file to another user)."""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import auditq.spool
from auditq import AuditWriter
from auditq.cli import main
from auditq.spool import (
    DEAD_LETTER_FILE,
    RECORD_MAGIC,
    SEGMENT_SUFFIX,
    Damage,
    Spool,
    SpoolTarget,
    UnsafeSpoolDir,
    inspect_segments,
    read_records,
    spool_target,
)

from .conftest import Table
from .helpers import wait_until
from .test_spool_unit import numbers, rows, segments

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
#: A uid that is not this process's (nobody).
OTHER_UID = 65534

A = SpoolTarget("audit", "table_a", "host=db port=5432 dbname=app", "app")
B = SpoolTarget("audit", "table_b", "host=db port=5432 dbname=app", "app")


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def _claim_all(spool: Spool) -> list[tuple[Path, bool]]:
    return list(spool.claim())


# -- the directory (item 10) ---------------------------------------------------------------


def test_the_directory_is_created_private_whatever_the_umask(spool_dir: Path) -> None:
    old = os.umask(0)
    try:
        Spool(spool_dir).close()
    finally:
        os.umask(old)
    assert spool_dir.stat().st_mode & 0o777 == 0o700


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafeSpoolDir, match="symbolic link"):
        Spool(link)
    with pytest.raises(UnsafeSpoolDir):
        inspect_segments(link)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_directory_others_can_write_is_refused(spool_dir: Path, mode: int) -> None:
    spool_dir.mkdir()
    spool_dir.chmod(mode)
    with pytest.raises(UnsafeSpoolDir, match="writable by group or others"):
        Spool(spool_dir)


@ROOT_ONLY
def test_a_directory_of_another_user_is_refused(spool_dir: Path) -> None:
    spool_dir.mkdir(mode=0o700)
    os.chown(spool_dir, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafeSpoolDir, match=f"owned by uid {OTHER_UID}"):
        Spool(spool_dir)


def test_the_dead_letter_file_is_never_written_through_a_symlink(
    spool_dir: Path, tmp_path: Path
) -> None:
    spool = Spool(spool_dir)
    victim = tmp_path / "victim-profile"
    victim.write_text("untouched\n")
    (spool_dir / DEAD_LETTER_FILE).symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        spool.write_dead_letters([{"entry": {"action": "a"}, "reason": "r"}])
    assert victim.read_text() == "untouched\n"
    spool.close()


def test_the_dead_letter_file_is_made_private(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    path = spool_dir / DEAD_LETTER_FILE
    path.write_bytes(b"")
    path.chmod(0o644)
    assert spool.write_dead_letters([{"entry": {"action": "a"}, "reason": "r"}]) == 1
    assert path.stat().st_mode & 0o777 == 0o600
    spool.close()


def test_a_fifo_named_like_the_dead_letter_file_does_not_block(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    os.mkfifo(spool_dir / DEAD_LETTER_FILE, 0o600)
    outcome: list[BaseException | int] = []

    def write() -> None:
        try:
            outcome.append(spool.write_dead_letters([{"entry": {}, "reason": "r"}]))
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "blocked on a FIFO"
    assert isinstance(outcome[0], OSError) and "not a regular file" in str(outcome[0])
    spool.close()


# -- planted and foreign files (item 11) -----------------------------------------------------


def _claims_without_blocking(spool: Spool) -> list[tuple[Path, bool]]:
    result: list[list[tuple[Path, bool]]] = []
    thread = threading.Thread(target=lambda: result.append(_claim_all(spool)), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "claim() blocked"
    return result[0]


def test_a_fifo_named_like_a_segment_is_skipped_and_reported(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = Spool(spool_dir, target=A)
    writer.append(rows(0, 3))
    writer.close()
    fifo = spool_dir / f"seg-00000000000000000001-1-fifo{SEGMENT_SUFFIX}"
    os.mkfifo(fifo, 0o600)
    caplog.set_level(logging.WARNING, logger="auditq")
    reader = Spool(spool_dir, target=A)
    claimed = _claims_without_blocking(reader)
    assert [path.name for path, _ in claimed] == [p.name for p in segments(spool_dir) if p != fifo]
    assert "not a regular file" in reader.refused[fifo.name]
    assert _claims_without_blocking(reader) == claimed  # held ones again; the FIFO skipped
    assert caplog.text.count(fifo.name) == 1  # reported once, not at every scan
    listed = {s["segment"]: s for s in inspect_segments(spool_dir)}
    assert "not a regular file" in listed[fifo.name]["refused"]
    reader.close()


def test_a_symlink_named_like_a_segment_is_skipped_and_its_target_untouched(
    spool_dir: Path, tmp_path: Path
) -> None:
    Spool(spool_dir).close()
    victim = tmp_path / "victim"
    victim.write_bytes(b"x" * 5000)
    link = spool_dir / f"seg-00000000000000000001-1-link{SEGMENT_SUFFIX}"
    link.symlink_to(victim)
    spool = Spool(spool_dir)
    assert _claims_without_blocking(spool) == []
    assert "symbolic link" in spool.refused[link.name]
    assert spool.size_bytes() == 0  # the link's target is not counted as spooled bytes
    spool.close()
    assert victim.read_bytes() == b"x" * 5000 and link.is_symlink()


@ROOT_ONLY
def test_a_segment_of_another_user_is_skipped(spool_dir: Path) -> None:
    writer = Spool(spool_dir)
    writer.append(rows(0, 3))
    writer.close()
    (path,) = segments(spool_dir)
    os.chown(path, OTHER_UID, OTHER_UID)
    spool = Spool(spool_dir)
    assert _claims_without_blocking(spool) == []
    assert f"owned by uid {OTHER_UID}" in spool.refused[path.name]
    spool.close()
    assert path.exists()


def _old_format_segment(directory: Path, batch: list[bytes]) -> Path:
    """A hand-made segment in the format auditq wrote before headers: a CRC is all it has,
    and anyone can compute one."""
    payload = b"".join(batch)
    path = directory / f"seg-00000000000000000001-1-forged{SEGMENT_SUFFIX}"
    path.write_bytes(struct.pack(">4sII", b"AQS1", len(payload), zlib.crc32(payload)) + payload)
    path.chmod(0o600)
    return path


def test_a_planted_crc_valid_segment_is_not_replayed(spool_dir: Path) -> None:
    Spool(spool_dir).close()
    forged = _old_format_segment(spool_dir, rows(666, 5))
    spool = Spool(spool_dir, target=A)
    assert _claims_without_blocking(spool) == []
    assert "earlier auditq" in spool.refused[forged.name]
    spool.close()
    assert forged.exists()  # left for the operator, not deleted


def test_records_spliced_from_another_segment_are_not_read(spool_dir: Path) -> None:
    first = Spool(spool_dir, target=A)
    first.append(rows(0, 5))
    first.close()
    second = Spool(spool_dir, target=A)
    second.append(rows(100, 5))
    second.close()
    one, two = segments(spool_dir)
    record_one = one.read_bytes()[next(_record_offsets(one)) :]
    with open(two, "ab") as handle:  # a record of `one` (CRC-valid), appended to `two`
        handle.write(record_one)
    damage: list[Damage] = []
    got = [n for record in read_records(two, 0, damage.append) for n in numbers(record.rows)]
    assert got == list(range(100, 105))
    assert [d.length for d in damage] == [len(record_one)]


def _record_offsets(path: Path) -> Iterator[int]:
    """Where each record of a segment starts."""
    data = path.read_bytes()
    at = data.find(RECORD_MAGIC)
    while at != -1:
        yield at
        at = data.find(RECORD_MAGIC, at + 1)


def test_resync_after_damage_reads_each_byte_a_bounded_number_of_times(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 512 KiB of damage made of record magics, each followed by a length reaching to the end
    # of the file: a reader that checks each candidate against the rest of the file does
    # quadratic work.
    spool = Spool(spool_dir, target=A)
    spool.append(rows(0, 10))
    spool.close()
    (path,) = segments(spool_dir)
    damage = bytearray()
    while len(damage) < 512 * 1024:
        left = 512 * 1024 - len(damage)
        damage += RECORD_MAGIC + struct.pack(">I", max(0, left - 8)) + b"\x00" * 8
    with open(path, "ab") as handle:
        handle.write(bytes(damage))
    read_bytes = [0]
    real_pread = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        data = real_pread(fd, length, offset)
        read_bytes[0] += len(data)
        return data

    monkeypatch.setattr(auditq.spool.os, "pread", counting_pread)
    found: list[Damage] = []
    got = [n for r in read_records(path, 0, found.append) for n in numbers(r.rows)]
    assert got == list(range(10))
    assert [d.length for d in found] == [len(damage)]
    total = path.stat().st_size
    assert read_bytes[0] <= 4 * total, (read_bytes[0], total)


def test_reading_resumes_at_the_next_sound_record_after_garbage(spool_dir: Path) -> None:
    spool = Spool(spool_dir, target=A)
    spool.append(rows(0, 5))
    spool.append(rows(5, 5))
    spool.append(rows(10, 5))
    spool.close()
    (path,) = segments(spool_dir)
    starts = list(_record_offsets(path))
    data = bytearray(path.read_bytes())
    # The second record's head is overwritten: its length can no longer be trusted, so
    # the reader must find the third record by scanning.
    data[starts[1] : starts[1] + 12] = RECORD_MAGIC + b"\xff" * 8
    path.write_bytes(bytes(data))
    found: list[Damage] = []
    got = [n for r in read_records(path, 0, found.append) for n in numbers(r.rows)]
    assert got == list(range(5)) + list(range(10, 15))
    assert [(d.what, d.offset, d.length) for d in found] == [
        ("corrupt record", starts[1], starts[2] - starts[1])
    ]


# -- segments name their target (item 12) ----------------------------------------------------


def test_a_segment_for_another_table_is_skipped_and_left(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer_a = Spool(spool_dir, target=A)
    writer_a.append(rows(0, 5))
    writer_a.close()
    (path,) = segments(spool_dir)
    caplog.set_level(logging.WARNING, logger="auditq")
    writer_b = Spool(spool_dir, target=B)
    assert _claim_all(writer_b) == []
    assert "table audit.table_a" in writer_b.refused[path.name]
    assert "table audit.table_a" in caplog.text
    writer_b.close()
    again_a = Spool(spool_dir, target=A)
    assert [(p.name, own) for p, own in _claim_all(again_a)] == [(path.name, False)]
    assert [n for r in again_a.records(path) for n in numbers(r.rows)] == list(range(5))
    again_a.close()


def test_the_system_identifier_decides_when_both_know_it(spool_dir: Path) -> None:
    writer = Spool(spool_dir, target=A)
    writer.identify("7000000000000000001")
    writer.append(rows(0, 5))
    writer.close()
    other_server = Spool(spool_dir, target=A)
    other_server.identify("7000000000000000002")
    assert _claim_all(other_server) == []
    assert "database system 7000000000000000001" in next(iter(other_server.refused.values()))
    other_server.close()
    same_server = Spool(spool_dir, target=A)  # not connected yet: the database name decides
    assert len(_claim_all(same_server)) == 1
    same_server.close()
    renamed = Spool(spool_dir, target=SpoolTarget("audit", "table_a", "host=x", "other_db"))
    assert _claim_all(renamed) == []
    renamed.close()


def test_spool_inspect_shows_the_header(
    spool_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    writer = Spool(spool_dir, target=A)
    writer.identify("7000000000000000001")
    writer.append(rows(0, 5))
    writer.close()
    Spool(spool_dir).close()
    _old_format_segment(spool_dir, rows(9, 1))
    assert main(["spool", "inspect", str(spool_dir)]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_refusal = {bool(item.get("refused")): item for item in listed}
    target = by_refusal[False]["header"]["target"]
    assert target == {
        "schema": "audit",
        "table": "table_a",
        "database": "host=db port=5432 dbname=app",
        "dbname": "app",
        "system_identifier": "7000000000000000001",
    }
    assert "key" not in by_refusal[False]["header"]
    assert by_refusal[False]["rows"] == 5
    assert "earlier auditq" in by_refusal[True]["refused"]
    assert main(["spool", "status", str(spool_dir)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["rows"] == 5 and status["refused"] == 1


def test_spool_target_names_the_database_without_secrets() -> None:
    target = spool_target("audit", "events", "postgresql://app:Sekr3tPw@db.internal:6432/prod")
    assert target == SpoolTarget(
        "audit", "events", "host=db.internal port=6432 dbname=prod", "prod", None
    )
    assert "Sekr3tPw" not in repr(target)


def test_a_writer_does_not_replay_a_spool_left_for_another_table(
    table: Table, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Writer A (table "other") spooled here and is gone; writer B, on `table`, is pointed at
    # the same directory. Its orphan scan must leave A's rows alone.
    left = Spool(tmp_path, target=spool_target(table.schema, "other", table.dsn))
    left.append(rows(0, 5))
    left.close()
    caplog.set_level(logging.WARNING, logger="auditq")
    with AuditWriter(table.dsn, schema=table.schema, table=table.name, spool_dir=tmp_path) as w:
        w.flush(timeout=10)  # its first wake-up scans for orphans
        assert wait_until(lambda: "not replaying" in caplog.text or table.count() > 0)
    assert table.count() == 0
    assert len(segments(tmp_path)) == 1
