"""The disk spool for long outages, and the dead-letter file.

Layout of `spool_dir`:

    seg-<created ns>-<pid>-<token>.aqs   segments, appended by one writer each
    dead-letters.jsonl                   one JSON object per dead letter: entry, reason, at

A segment is a sequence of records, each one batch of rows exactly as COPY sends them
(binary tuples made by `binary.encode_row`, so a replay re-checks nothing and costs nothing):

    b"AQS1" | u32 payload length | u32 crc32(payload) | payload (concatenated binary tuples)

A torn tail (the process died mid-append) fails its length or checksum; reading stops there
and the records before it are kept. Segment names sort by creation time, so replay follows
the order the batches were spooled in. A writer holds an exclusive `flock` on every segment
it has spooled until it has replayed it (or closes), so two live writers never replay the
same segment; a segment whose writer is gone is unlocked and any writer may take it over.
Replays go through the sink's idempotent path (`ON CONFLICT (id) DO NOTHING`), so a segment
replayed twice after a crash writes each row once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import orjson

from .binary import split_rows

logger = logging.getLogger("auditq")

MAGIC: Final = b"AQS1"
_HEADER: Final = struct.Struct(">4sII")
SEGMENT_SUFFIX: Final = ".aqs"
DEAD_LETTER_FILE: Final = "dead-letters.jsonl"
#: A segment is closed and a new one started past this size.
SEGMENT_BYTES: Final = 16 * 1024 * 1024

FsyncPolicy = Literal["always", "interval", "never"]


@dataclass(frozen=True, slots=True)
class Record:
    """One spooled batch (binary tuples), and where it ends in its segment."""

    rows: list[bytes]
    end: int


@dataclass
class _Segment:
    path: Path
    fd: int  # open, with an exclusive flock, for as long as this writer owns the segment
    rows: int
    size: int


class SpoolFull(Exception):
    """Appending would take the spool past `max_bytes`."""


class Spool:
    """Segments of spooled batches in one directory, owned by one writer in this process."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = 1024**3,
        fsync: FsyncPolicy = "interval",
        fsync_interval: float = 1.0,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        # Guards the segment table; appends and replays happen on the writer thread, but
        # stats() and close() read it from others.
        self._lock = threading.Lock()
        self._active: _Segment | None = None
        self._owned: dict[Path, _Segment] = {}  # segments this writer spooled, not yet replayed
        self._last_sync = 0.0

    # -- appending -----------------------------------------------------------------------

    def append(self, rows: list[bytes]) -> None:
        """Append one batch of binary tuples as a record; raises `SpoolFull` past max_bytes."""
        payload = b"".join(rows)
        record = _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            if self.size_bytes() + len(record) > self.max_bytes:
                raise SpoolFull(f"spool would exceed spool_max_bytes={self.max_bytes}")
            segment = self._active
            if segment is None or segment.size + len(record) > SEGMENT_BYTES:
                segment = self._open_segment()
            os.write(segment.fd, record)
            segment.size += len(record)
            segment.rows += len(rows)
            self._maybe_sync(segment.fd)

    def _open_segment(self) -> _Segment:
        name = f"seg-{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}{SEGMENT_SUFFIX}"
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        segment = _Segment(path, fd, 0, 0)
        self._active = segment
        self._owned[path] = segment
        if self.fsync != "never":
            _fsync_dir(self.directory)
        return segment

    def _maybe_sync(self, fd: int) -> None:
        if self.fsync == "always":
            os.fsync(fd)
        elif self.fsync == "interval":
            now = time.monotonic()
            if now - self._last_sync >= self.fsync_interval:
                os.fsync(fd)
                self._last_sync = now

    def sync(self) -> None:
        """Make every appended record durable now (close() and the end of an outage)."""
        with self._lock:
            if self._active is not None and self.fsync != "never":
                os.fsync(self._active.fd)

    # -- replaying -----------------------------------------------------------------------

    def owned_rows(self) -> int:
        """Rows this writer spooled that are still on disk."""
        with self._lock:
            return sum(s.rows for s in self._owned.values())

    def claim(self) -> Iterator[tuple[Path, bool]]:
        """Yield segments to replay, oldest first, each locked for this writer: its own
        (flag True) and orphans left by writers that are gone (flag False)."""
        for path in sorted(self.directory.glob(f"seg-*{SEGMENT_SUFFIX}")):
            with self._lock:
                if path in self._owned:
                    if self._active is not None and self._active.path == path:
                        self._active = None  # seal it: new appends go to a new segment
                    yield path, True
                    continue
            fd = _try_lock(path)
            if fd is None:
                continue  # another live writer owns it
            with self._lock:
                self._owned[path] = _Segment(path, fd, -1, path.stat().st_size)
            yield path, False

    def records(self, path: Path, start: int = 0) -> Iterator[Record]:
        """The intact records of a segment from byte `start`, stopping at a torn tail."""
        with open(path, "rb") as handle:
            handle.seek(start)
            offset = start
            while True:
                header = handle.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    if header:
                        logger.warning("spool segment %s ends in a torn record", path.name)
                    return
                magic, length, crc = _HEADER.unpack(header)
                payload = handle.read(length)
                if magic != MAGIC or len(payload) < length or zlib.crc32(payload) != crc:
                    logger.warning("spool segment %s: corrupt record at byte %d", path.name, offset)
                    return
                offset += _HEADER.size + length
                yield Record(split_rows(payload), offset)

    def done(self, path: Path) -> None:
        """The segment is replayed: delete it and release its lock."""
        with self._lock:
            segment = self._owned.pop(path, None)
            if self._active is not None and self._active.path == path:
                self._active = None
        path.unlink(missing_ok=True)
        if segment is not None:
            os.close(segment.fd)

    def release(self, path: Path) -> None:
        """Give up a claimed orphan without replaying it (so another writer may)."""
        with self._lock:
            segment = self._owned.pop(path, None)
        if segment is not None:
            os.close(segment.fd)

    # -- state ---------------------------------------------------------------------------

    def size_bytes(self) -> int:
        total = 0
        for path in self.directory.glob(f"seg-*{SEGMENT_SUFFIX}"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def close(self) -> None:
        """Sync and release every lock; segments stay on disk for the next writer."""
        with self._lock:
            segments = list(self._owned.values())
            self._owned.clear()
            self._active = None
        for segment in segments:
            try:
                if self.fsync != "never":
                    os.fsync(segment.fd)
            except OSError:
                pass
            os.close(segment.fd)

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's segments and locks stay the parent's."""
        with self._lock:
            segments = list(self._owned.values())
            self._owned.clear()
            self._active = None
        for segment in segments:
            os.close(segment.fd)  # the flock belongs to the parent's open file description

    # -- dead letters --------------------------------------------------------------------

    def write_dead_letters(self, letters: list[dict[str, Any]]) -> None:
        """Append dead letters to `dead-letters.jsonl` (always fsynced: they are evidence)."""
        data = b"".join(orjson.dumps(letter, default=str) + b"\n" for letter in letters)
        path = self.directory / DEAD_LETTER_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if not path.exists():  # replayed and deleted between the glob and the lock
        os.close(fd)
        return None
    return fd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def inspect_segments(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """What an operator wants to know of each segment, without taking any lock."""
    spool = Path(directory)
    out: list[dict[str, Any]] = []
    for path in sorted(spool.glob(f"seg-*{SEGMENT_SUFFIX}")):
        fd = _try_lock(path)
        locked = fd is None
        if fd is not None:
            os.close(fd)
        reader = Spool.__new__(Spool)
        rows = records = 0
        for record in Spool.records(reader, path):
            records += 1
            rows += len(record.rows)
        out.append(
            {
                "segment": path.name,
                "bytes": path.stat().st_size if path.exists() else 0,
                "records": records,
                "rows": rows,
                "owned_by_live_writer": locked,
            }
        )
    return out
