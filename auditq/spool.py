"""The disk spool for long outages, and the dead-letter file.

Layout of `spool_dir`:

    seg-<created ns>-<pid>-<token>.aqs   segments, appended by one writer each
    dead-letters.jsonl                   one JSON object per dead letter: entry, reason, at

A segment is a sequence of records, each one batch of rows exactly as COPY sends them
(binary tuples made by `binary.encode_row`, so a replay re-checks nothing and costs nothing):

    b"AQS1" | u32 payload length | u32 crc32(payload) | payload (concatenated binary tuples)

A torn tail (the process died mid-append) or a corrupt record fails its length or checksum;
the reader reports those bytes as damaged (the writer dead-letters a note of them) and goes
on with the next intact record. Segment names sort by creation time, so replay follows
the order the batches were spooled in. A writer holds an exclusive `flock` on every segment
it has spooled until it has replayed it (or closes), so two live writers never replay the
same segment; a segment whose writer is gone is unlocked and any writer may take it over.
A segment is created under a temporary name and renamed once locked, so it is never seen
unlocked while its writer lives. Replays go through the sink's idempotent path (`ON
CONFLICT (id) DO NOTHING`), so a segment replayed twice after a crash writes each row once.
A spool holds no table name: use one `spool_dir` per table.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Final, Literal

import orjson

from .binary import split_rows

logger = logging.getLogger("auditq")

MAGIC: Final = b"AQS1"
_HEADER: Final = struct.Struct(">4sII")
SEGMENT_SUFFIX: Final = ".aqs"
DEAD_LETTER_FILE: Final = "dead-letters.jsonl"
#: Segments are created under this prefix, locked, then renamed (never seen unlocked).
_TEMP_PREFIX: Final = ".new-"
#: A temporary segment file this old (seconds) belongs to a writer that died creating it.
_STALE_TEMP_SECONDS: Final = 60.0
#: A segment is closed and a new one started past this size.
SEGMENT_BYTES: Final = 16 * 1024 * 1024

FsyncPolicy = Literal["always", "interval", "never"]


@dataclass(frozen=True, slots=True)
class Record:
    """One spooled batch (binary tuples), and where it ends in its segment."""

    rows: list[bytes]
    end: int


@dataclass(frozen=True, slots=True)
class Damage:
    """Bytes of a segment that hold no intact record (a torn tail, a corrupt record)."""

    segment: str
    offset: int
    length: int
    what: str


DamageHandler = Callable[[Damage], None]


@dataclass
class _Segment:
    path: Path
    fd: int  # open, with an exclusive flock, for as long as this writer owns the segment
    mine: bool  # spooled by this writer (counted in its `spooled`), or an orphan it took over
    rows: int  # rows appended (own segments; 0 for orphans)
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
        # Guards the dead-letter file's size check and append (apart from the segments).
        self._letters_lock = threading.Lock()
        self._active: _Segment | None = None
        self._owned: dict[Path, _Segment] = {}  # segments this writer holds locked
        self._last_sync = 0.0
        # Appended records not yet fsynced ("interval"): synced when the interval is up,
        # even if no further append comes.
        self._dirty = False

    # -- appending -----------------------------------------------------------------------

    def append(self, rows: list[bytes]) -> None:
        """Append one batch of binary tuples as a record; raises `SpoolFull` past max_bytes
        and `OSError` when the disk refuses (the segment is then left as it was)."""
        if not rows:
            return
        payload = b"".join(rows)
        record = _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            if self.size_bytes() + len(record) > self.max_bytes:
                raise SpoolFull(f"spool would exceed spool_max_bytes={self.max_bytes}")
            segment = self._active
            if segment is None or segment.size + len(record) > SEGMENT_BYTES:
                segment = self._open_segment()
            try:
                view = memoryview(record)
                while view:  # os.write may write less than asked (a full disk, a signal)
                    view = view[os.write(segment.fd, view) :]
            except OSError:
                # Never leave a torn record behind a live writer's later appends.
                with contextlib.suppress(OSError):
                    os.ftruncate(segment.fd, segment.size)
                raise
            segment.size += len(record)
            segment.rows += len(rows)
            self._dirty = True
            self._maybe_sync(segment.fd)

    def _open_segment(self) -> _Segment:
        # Created under a name no reader globs for, locked, then renamed: a segment is
        # never visible unlocked, so another writer cannot take it over as an orphan.
        name = f"seg-{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}{SEGMENT_SUFFIX}"
        temp = self.directory / f"{_TEMP_PREFIX}{name}"
        path = self.directory / name
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(temp, path)
        except OSError:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        segment = _Segment(path, fd, True, 0, 0)
        self._active = segment
        self._owned[path] = segment
        if self.fsync != "never":
            _fsync_dir(self.directory)
        return segment

    def _maybe_sync(self, fd: int) -> None:
        if self.fsync == "always":
            os.fsync(fd)
            self._dirty = False
        elif self.fsync == "interval":
            now = time.monotonic()
            if now - self._last_sync >= self.fsync_interval:
                os.fsync(fd)
                self._last_sync = now
                self._dirty = False

    def sync(self, *, due_only: bool = False) -> None:
        """Make every appended record durable now (close(), and the writer's idle steps with
        `due_only`: only once `fsync_interval` has passed since the last sync)."""
        with self._lock:
            if not self._dirty or self.fsync == "never" or self._active is None:
                return
            now = time.monotonic()
            if due_only and now - self._last_sync < self.fsync_interval:
                return
            os.fsync(self._active.fd)
            self._last_sync = now
            self._dirty = False

    # -- replaying -----------------------------------------------------------------------

    def owned_rows(self) -> int:
        """Rows this writer spooled that are still on disk."""
        with self._lock:
            return sum(s.rows for s in self._owned.values() if s.mine)

    def segment_rows(self, path: Path) -> int:
        """Rows this writer appended to one of its own segments (0 for any other)."""
        with self._lock:
            segment = self._owned.get(path)
            return segment.rows if segment is not None and segment.mine else 0

    def claim(self) -> Iterator[tuple[Path, bool]]:
        """Yield segments to replay, oldest first, each locked for this writer: its own
        (flag True) and orphans left by writers that are gone (flag False). A segment
        another live writer holds is skipped."""
        for path in sorted(self.directory.glob(f"seg-*{SEGMENT_SUFFIX}")):
            with self._lock:
                segment = self._owned.get(path)
                if segment is not None:
                    if segment is self._active:
                        self._active = None  # seal it: new appends go to a new segment
                        if self._dirty and self.fsync != "never":
                            os.fsync(segment.fd)
                            self._dirty = False
                    mine = segment.mine
                else:
                    mine = None
            if mine is not None:
                yield path, mine
                continue
            fd = _try_lock(path)
            if fd is None:
                continue  # another live writer owns it (or it was just replayed)
            with self._lock:
                self._owned[path] = _Segment(path, fd, False, 0, os.fstat(fd).st_size)
            yield path, False
        self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        """A writer killed between creating a segment and naming it leaves an empty file.
        Only old ones are removed: a young one may be between its creation and its lock."""
        for temp in self.directory.glob(f"{_TEMP_PREFIX}*"):
            try:
                if time.time() - temp.stat().st_mtime < _STALE_TEMP_SECONDS:
                    continue
            except FileNotFoundError:
                continue
            fd = _try_lock(temp)
            if fd is not None:
                temp.unlink(missing_ok=True)
                os.close(fd)

    def records(
        self, path: Path, start: int = 0, on_damage: DamageHandler | None = None
    ) -> Iterator[Record]:
        """The intact records of a segment from byte `start` (see `read_records`)."""
        return read_records(path, start, on_damage)

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
            segment = self._owned.get(path)
            if segment is None or segment.mine:
                return
            del self._owned[path]
        os.close(segment.fd)

    # -- state ---------------------------------------------------------------------------

    def size_bytes(self) -> int:
        """Bytes of every segment in the directory (this writer's, orphans, other writers')."""
        total = 0
        for path in self.directory.glob(f"seg-*{SEGMENT_SUFFIX}"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def dead_letter_bytes(self) -> int:
        """Bytes of the dead-letter file (0 when there is none)."""
        try:
            return (self.directory / DEAD_LETTER_FILE).stat().st_size
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        """Sync and release every lock; segments stay on disk for the next writer."""
        with self._lock:
            segments = list(self._owned.values())
            self._owned.clear()
            self._active = None
            self._dirty = False
        for segment in segments:
            try:
                if self.fsync != "never" and segment.mine:
                    os.fsync(segment.fd)
            except OSError:
                pass
            os.close(segment.fd)

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's segments and locks stay the parent's.

        The locks are made anew first: a parent thread that held one at the fork never
        releases the child's copy, and taking it would hang the child (it has no other
        threads, so nothing else uses them meanwhile)."""
        self._lock = threading.Lock()
        self._letters_lock = threading.Lock()
        with self._lock:
            segments = list(self._owned.values())
            self._owned.clear()
            self._active = None
        for segment in segments:
            os.close(segment.fd)  # the flock belongs to the parent's open file description

    # -- dead letters --------------------------------------------------------------------

    def write_dead_letters(self, letters: list[dict[str, Any]]) -> int:
        """Append dead letters to `dead-letters.jsonl` (always fsynced: they are evidence),
        as many whole lines as keep the file within `max_bytes`, oldest first; returns how
        many were written.

        The file has a bound of its own, apart from the segments': it grows fastest exactly
        when the spool is full (each refused entry becomes a line), so unbounded it would fill
        the disk the spool bound protects; but sharing the segments' bound would let old
        letters (never trimmed) shut the spool, and a full spool refuse the letters of the
        very rows a replay gives up on. Other processes on the same directory check it too,
        each before its own write: with several, the bound can be passed by one write each."""
        if not letters:
            return 0
        lines = [orjson.dumps(letter, default=str) + b"\n" for letter in letters]
        path = self.directory / DEAD_LETTER_FILE
        with self._letters_lock:  # the size check and the write; not the segments' lock
            room = self.max_bytes - self.dead_letter_bytes()
            fitting = sum(1 for end in accumulate(map(len, lines)) if end <= room)
            if not fitting:
                return 0
            data = b"".join(lines[:fitting])
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        return fitting


def read_records(
    path: Path, start: int = 0, on_damage: DamageHandler | None = None
) -> Iterator[Record]:
    """The intact records of a segment from byte `start`, oldest first.

    A record whose header or checksum is wrong is skipped: reading resumes at the next
    intact record (found by its magic and checksum), and `on_damage` (or a warning) is told
    which bytes were lost. A torn tail (the writer died mid-append) is reported the same way.
    """

    def damaged(offset: int, length: int, what: str) -> None:
        damage = Damage(path.name, offset, length, what)
        if on_damage is not None:
            on_damage(damage)
        else:
            logger.warning("spool segment %s: %s (%d bytes at %d)", path.name, what, length, offset)

    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read()
    offset = 0
    end = len(data)
    while offset < end:
        intact = _intact_at(data, offset)
        if intact is not None:
            yield Record(split_rows(data[offset + _HEADER.size : intact]), start + intact)
            offset = intact
            continue
        # Look for the next intact record; what lies in between is lost.
        probe = data.find(MAGIC, offset + 1)
        while probe != -1 and _intact_at(data, probe) is None:
            probe = data.find(MAGIC, probe + 1)
        stop = end if probe == -1 else probe
        what = "torn record at the end" if probe == -1 else "corrupt record"
        damaged(start + offset, stop - offset, what)
        offset = stop


def _intact_at(data: bytes, offset: int) -> int | None:
    """Where the record starting at `offset` ends, if it is whole and its checksum holds."""
    if offset + _HEADER.size > len(data):
        return None
    magic, length, crc = _HEADER.unpack_from(data, offset)
    body: int = offset + _HEADER.size
    if magic != MAGIC or body + length > len(data):
        return None
    payload = data[body : body + length]
    if zlib.crc32(payload) != crc:
        return None
    try:
        split_rows(payload)
    except struct.error:
        return None
    return body + int(length)


def _try_lock(path: Path, operation: int = fcntl.LOCK_EX) -> int | None:
    """Open and lock `path` without waiting; None if another holder has it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        # Replayed and deleted (or replaced) between the open and the lock?
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
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
    """What an operator wants to know of each segment. Takes no lock a writer would wait
    for: a shared lock, dropped at once, only to tell whether a live writer holds it."""
    spool = Path(directory)
    out: list[dict[str, Any]] = []
    for path in sorted(spool.glob(f"seg-*{SEGMENT_SUFFIX}")):
        fd = _try_lock(path, fcntl.LOCK_SH)
        locked = fd is None
        if fd is not None:
            os.close(fd)
        damage: list[Damage] = []
        rows = records = 0
        try:
            size = path.stat().st_size
            for record in read_records(path, 0, damage.append):
                records += 1
                rows += len(record.rows)
        except FileNotFoundError:
            continue  # replayed meanwhile
        out.append(
            {
                "segment": path.name,
                "bytes": size,
                "records": records,
                "rows": rows,
                "damaged_bytes": sum(d.length for d in damage),
                "owned_by_live_writer": locked,
            }
        )
    return out
