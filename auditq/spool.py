"""The disk spool for long outages, and the dead-letter file.

Layout of `spool_dir` (0700, owned by the writer's user; see docs/SECURITY.md):

    seg-<created ns>-<pid>-<token>.aqs   segments, appended by one writer each
    dead-letters.jsonl                   one JSON object per dead letter: entry, reason, at

A segment starts with a header naming where its rows belong and holding a random key of its
own, then a sequence of records, each one batch of rows exactly as COPY sends them (binary
tuples made by `binary.encode_row`, so a replay re-checks nothing and costs nothing):

    header:  b"AQSG" | u16 format | u32 length | JSON | u32 crc32(all before it)
    record:  b"AQR2" | u32 payload length | head tag (8) | tag (32) | payload

    head tag = HMAC-SHA256(key, b"head" | u64 offset | u32 length)[:8]
    tag      = HMAC-SHA256(key, b"body" | u64 offset | u32 length | payload)

The JSON names the target (schema, table, the database's system identifier when the writer
knew it, and host/port/dbname as its DSN says, without secrets) and the key. A writer
replays only segments whose target matches its own; others are skipped, reported once and
left on disk. The key makes each record valid only in its own segment, at its own offset:
a record spliced in from elsewhere, a torn tail, a flipped bit or a file cut short fail
their tag. It does not stop someone who can write the directory (they can read the key):
the directory's mode and owner, checked at start, are what keep others out.

The head tag lets a reader find the next record after damage in one pass: a candidate
position costs one small HMAC, not a checksum over the rest of the file. A torn tail (the
process died mid-append) ends the reading; the bytes lost are reported (the writer
dead-letters a note of them). Segment names sort by creation time, so replay follows the
order the batches were spooled in. A writer holds an exclusive `flock` on every segment it
has spooled until it has replayed it (or closes), so two live writers never replay the same
segment; a segment whose writer is gone is unlocked and any writer may take it over. A
segment is created under a temporary name and renamed once locked, so it is never seen
unlocked while its writer lives. Replays go through the sink's idempotent path (`ON
CONFLICT (id) DO NOTHING`), so a segment replayed twice after a crash writes each row once.

Every file is opened relative to the directory's descriptor, with `O_NOFOLLOW |
O_NONBLOCK`, and used only when it is a regular file owned by this user: a symlink named
like a segment (or like the dead-letter file) cannot redirect a write, and a FIFO cannot
block a replay.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson

from .binary import split_rows

if TYPE_CHECKING:
    from .dsn import Dsn

logger = logging.getLogger("auditq")

SEGMENT_MAGIC: Final = b"AQSG"
SEGMENT_FORMAT: Final = 2
_SEGMENT_HEAD: Final = struct.Struct(">4sHI")
_CRC: Final = struct.Struct(">I")
#: A segment header longer than this is not one (it holds a few short names).
_MAX_HEADER: Final = 64 * 1024
RECORD_MAGIC: Final = b"AQR2"
_RECORD_HEAD: Final = struct.Struct(">4sI8s32s")
#: Bytes a record adds to its payload.
RECORD_OVERHEAD: Final = _RECORD_HEAD.size
_TAG_INPUT: Final = struct.Struct(">QI")
_KEY_BYTES: Final = 32
#: Rows joined per C call when a batch is appended (see `Spool.append`).
_PIECE_ROWS: Final = 1000
#: How much of a damaged segment is read at a time while looking for the next record.
_SCAN_BYTES: Final = 1024 * 1024
SEGMENT_SUFFIX: Final = ".aqs"
_SEGMENT_PREFIX: Final = "seg-"
DEAD_LETTER_FILE: Final = "dead-letters.jsonl"
#: Segments are created under this prefix, locked, then renamed (never seen unlocked).
_TEMP_PREFIX: Final = ".new-"
#: A temporary segment file this old (seconds) belongs to a writer that died creating it.
_STALE_TEMP_SECONDS: Final = 60.0
#: A segment is closed and a new one started past this size.
SEGMENT_BYTES: Final = 16 * 1024 * 1024
#: Opening any file of the spool: never through a symlink, never waiting on a FIFO.
_OPEN_FLAGS: Final = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

FsyncPolicy = Literal["always", "interval", "never"]


class UnsafeSpoolDir(PermissionError):
    """`spool_dir` is not private to this user: a symlink, another user's, or writable by
    others. Refused at start, because whoever can write it can plant rows or redirect
    writes."""


class Refused(OSError):
    """A file in the spool that is not this user's regular file (or not a segment)."""


@dataclass(frozen=True, slots=True)
class SpoolTarget:
    """Where a segment's rows belong. Unset fields are unknown (compared only when both
    sides know them); a writer with no target at all checks nothing (see `mismatch`)."""

    schema: str | None = None
    table: str | None = None
    #: host, port and dbname as the DSN says (`Dsn.target()`), without secrets.
    database: str | None = None
    dbname: str | None = None
    #: `pg_control_system().system_identifier`, once the writer has connected.
    system_identifier: str | None = None

    def known(self) -> bool:
        return self.schema is not None and self.table is not None

    def mismatch(self, segment: SpoolTarget) -> str:
        """Why a segment written for `segment` must not be replayed by this writer ("" when
        it may). The system identifier decides when both know it; else the database name
        (a server is reached under many host names)."""
        if not self.known():
            return ""
        if not segment.known():
            return "its header names no table"
        if (segment.schema, segment.table) != (self.schema, self.table):
            return f"it belongs to table {segment.schema}.{segment.table}"
        if self.system_identifier and segment.system_identifier:
            if self.system_identifier != segment.system_identifier:
                return (
                    f"it belongs to the database system {segment.system_identifier}, "
                    f"not {self.system_identifier}"
                )
            return ""
        if self.dbname and segment.dbname and self.dbname != segment.dbname:
            return f"it belongs to database {segment.dbname!r}"
        return ""

    def as_json(self) -> dict[str, str | None]:
        return {
            "schema": self.schema,
            "table": self.table,
            "database": self.database,
            "dbname": self.dbname,
            "system_identifier": self.system_identifier,
        }

    @classmethod
    def from_json(cls, data: Any) -> SpoolTarget:
        if not isinstance(data, dict):
            raise ValueError("no target")
        values = {k: data.get(k) for k in cls.__dataclass_fields__}
        if not all(v is None or isinstance(v, str) for v in values.values()):
            raise ValueError("a target field is not text")
        return cls(**values)


def spool_target(schema: str, table: str, dsn: Dsn | str | None = None) -> SpoolTarget:
    """The target of a writer on `schema.table` through `dsn` (its own DSN, or a pool's
    conninfo), for `Spool(target=...)`."""
    database = dbname = None
    if dsn is not None:
        from .dsn import Dsn

        try:
            parsed = dsn if isinstance(dsn, Dsn) else Dsn(dsn)
        except ValueError:
            parsed = None
        if parsed is not None:
            database = parsed.target()
            dbname = parsed.params().get("dbname") or parsed.params().get("user")
    return SpoolTarget(schema, table, database, dbname)


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """What a segment says of itself."""

    target: SpoolTarget
    key: bytes = field(repr=False)
    created_ns: int
    pid: int
    #: Bytes of the header: the first record starts here.
    size: int

    def describe(self) -> dict[str, Any]:
        """For `auditq spool inspect` (the key is left out: it is no use to read)."""
        return {
            "format": SEGMENT_FORMAT,
            "target": self.target.as_json(),
            "created_ns": self.created_ns,
            "pid": self.pid,
        }


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
    header: SegmentHeader


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
        target: SpoolTarget | None = None,
    ) -> None:
        """Creates `directory` (0700) if needed; raises `UnsafeSpoolDir` when it is a
        symlink, another user's, or writable by group or others. `target` names where this
        writer's rows go: written in each new segment's header, and required of a segment
        before it is replayed (None: segments are written with no target and any is
        replayed)."""
        self.directory = Path(directory)
        self._dir_fd: int | None = open_private_dir(self.directory, create=True)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.target = target or SpoolTarget()
        # Segments skipped, and why: each is reported once (see _refuse).
        self.refused: dict[str, str] = {}
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

    def identify(self, system_identifier: str) -> None:
        """The database's system identifier, once the writer has connected: named in the
        headers of segments created from now on, and compared with theirs."""
        self.target = replace(self.target, system_identifier=system_identifier)

    def _dir(self) -> int:
        """The directory's descriptor (opened again, and checked again, after close())."""
        fd = self._dir_fd
        if fd is None:
            fd = self._dir_fd = open_private_dir(self.directory, create=True)
        return fd

    # -- appending -----------------------------------------------------------------------

    def append(self, rows: list[bytes]) -> None:
        """Append one batch of binary tuples as a record; raises `SpoolFull` past max_bytes
        and `OSError` when the disk refuses (the segment is then left as it was)."""
        if not rows:
            return
        # Joined, tagged and written a piece at a time: one join (or copy) of a whole batch
        # is one long C call, during which no other thread gets the GIL.
        pieces = [b"".join(rows[i : i + _PIECE_ROWS]) for i in range(0, len(rows), _PIECE_ROWS)]
        length = sum(map(len, pieces))
        with self._lock:
            segment = self._active
            fresh = None
            if segment is None or segment.size + RECORD_OVERHEAD + length > SEGMENT_BYTES:
                fresh = _header_bytes(self.target, secrets.token_bytes(_KEY_BYTES))
            need = RECORD_OVERHEAD + length + (len(fresh[0]) if fresh else 0)
            if self.size_bytes() + need > self.max_bytes:
                raise SpoolFull(f"spool would exceed spool_max_bytes={self.max_bytes}")
            if fresh is not None:
                segment = self._open_segment(*fresh)
            assert segment is not None
            head = _record_head(segment.header.key, segment.size, length, pieces)
            try:
                _write_all(segment.fd, head)
                for piece in pieces:
                    _write_all(segment.fd, piece)
            except OSError:
                # Never leave a torn record behind a live writer's later appends.
                with contextlib.suppress(OSError):
                    os.ftruncate(segment.fd, segment.size)
                raise
            segment.size += len(head) + length
            segment.rows += len(rows)
            self._dirty = True
            self._maybe_sync(segment.fd)

    def _open_segment(self, header: bytes, parsed: SegmentHeader) -> _Segment:
        # Created under a name no reader globs for, with its header, locked, then renamed:
        # a segment is never visible unlocked (another writer would take it over as an
        # orphan) nor without its header.
        directory = self._dir()
        name = f"{_SEGMENT_PREFIX}{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
        name += SEGMENT_SUFFIX
        temp = f"{_TEMP_PREFIX}{name}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | _OPEN_FLAGS
        fd = os.open(temp, flags, 0o600, dir_fd=directory)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, header)
            os.rename(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=directory)
            raise
        path = self.directory / name
        segment = _Segment(path, fd, True, 0, len(header), parsed)
        self._active = segment
        self._owned[path] = segment
        if self.fsync != "never":
            os.fsync(directory)
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
        another live writer holds is skipped; so is one that is not this user's regular
        file, has no valid header, or belongs to another target (each reported once, and
        left on disk: see `refused`)."""
        for name in _segment_names(self._dir()):
            path = self.directory / name
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
            try:
                fd = _try_lock(self._dir(), name)
            except Refused as exc:
                self._refuse(name, exc.strerror or str(exc))
                continue
            if fd is None:
                continue  # another live writer owns it (or it was just replayed)
            try:
                header = _read_header(fd)
                problem = self.target.mismatch(header.target)
                if problem:
                    raise Refused(f"{problem}, not {self.target.schema}.{self.target.table}")
            except Refused as exc:
                os.close(fd)
                self._refuse(name, exc.strerror or str(exc))
                continue
            self.refused.pop(name, None)
            with self._lock:
                self._owned[path] = _Segment(path, fd, False, 0, os.fstat(fd).st_size, header)
            yield path, False
        self._remove_stale_temps()

    def _refuse(self, name: str, why: str) -> None:
        """A segment this writer will not replay: said once per file, left where it is."""
        if self.refused.get(name) == why:
            return
        self.refused[name] = why
        logger.warning(
            "spool %s: not replaying %s: %s; it is left on disk (`auditq spool inspect` "
            "shows it; move it away once dealt with)",
            self.directory,
            name,
            why,
        )

    def _remove_stale_temps(self) -> None:
        """A writer killed between creating a segment and naming it leaves a file with at
        most a header. Only old ones are removed: a young one may be between its creation
        and its lock. Only this user's regular files: nothing else is this writer's to
        delete."""
        directory = self._dir()
        for name in os.listdir(directory):
            if not name.startswith(_TEMP_PREFIX):
                continue
            try:
                info = os.stat(name, dir_fd=directory, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not _ours(info) or time.time() - info.st_mtime < _STALE_TEMP_SECONDS:
                continue
            try:
                fd = _try_lock(directory, name)
            except Refused:
                continue
            if fd is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=directory)
                os.close(fd)

    def records(
        self, path: Path, start: int = 0, on_damage: DamageHandler | None = None
    ) -> Iterator[Record]:
        """The intact records of a claimed segment from byte `start` (see `read_records`),
        read through the descriptor this writer holds."""
        with self._lock:
            segment = self._owned.get(path)
        if segment is None:
            return read_records(path, start, on_damage)
        return _read_fd(segment.fd, path.name, segment.header, start, on_damage)

    def header(self, path: Path) -> SegmentHeader | None:
        """The header of a segment this writer holds (None for any other)."""
        with self._lock:
            segment = self._owned.get(path)
        return None if segment is None else segment.header

    def done(self, path: Path) -> None:
        """The segment is replayed: delete it and release its lock."""
        with self._lock:
            segment = self._owned.pop(path, None)
            if self._active is not None and self._active.path == path:
                self._active = None
        if segment is not None:  # only a segment this writer holds is its to delete
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.name, dir_fd=self._dir())
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
        directory = self._dir()
        total = 0
        for name in _segment_names(directory):
            with contextlib.suppress(FileNotFoundError):
                info = os.stat(name, dir_fd=directory, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode):
                    total += info.st_size
        return total

    def dead_letter_bytes(self) -> int:
        """Bytes of the dead-letter file (0 when there is none)."""
        try:
            info = os.stat(DEAD_LETTER_FILE, dir_fd=self._dir(), follow_symlinks=False)
        except FileNotFoundError:
            return 0
        return info.st_size if stat.S_ISREG(info.st_mode) else 0

    def close(self) -> None:
        """Sync and release every lock; segments stay on disk for the next writer."""
        with self._lock:
            segments = list(self._owned.values())
            self._owned.clear()
            self._active = None
            self._dirty = False
            directory, self._dir_fd = self._dir_fd, None
        for segment in segments:
            try:
                if self.fsync != "never" and segment.mine:
                    os.fsync(segment.fd)
            except OSError:
                pass
            os.close(segment.fd)
        if directory is not None:
            os.close(directory)

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
        many were written. Raises `OSError` (`Refused`) when the file is not this user's
        regular file: a symlink there must not steer audit data into another file.

        The file has a bound of its own, apart from the segments': it grows fastest exactly
        when the spool is full (each refused entry becomes a line), so unbounded it would fill
        the disk the spool bound protects; but sharing the segments' bound would let old
        letters (never trimmed) shut the spool, and a full spool refuse the letters of the
        very rows a replay gives up on. Other processes on the same directory check it too,
        each before its own write: with several, the bound can be passed by one write each."""
        if not letters:
            return 0
        lines = [orjson.dumps(letter, default=str) + b"\n" for letter in letters]
        with self._letters_lock:  # the size check and the write; not the segments' lock
            try:
                fd = _open_owned(
                    self._dir(), DEAD_LETTER_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                )
            except Refused as exc:
                raise Refused(
                    exc.errno, f"{self.directory / DEAD_LETTER_FILE} is refused: {exc.strerror}"
                ) from None
            try:
                info = os.fstat(fd)
                if info.st_mode & 0o077:
                    os.fchmod(fd, 0o600)  # private, whoever made it
                room = self.max_bytes - info.st_size
                fitting = sum(1 for end in accumulate(map(len, lines)) if end <= room)
                if fitting:
                    _write_all(fd, b"".join(lines[:fitting]))
                    os.fsync(fd)
            finally:
                os.close(fd)
        return fitting


# -- the directory and its files ---------------------------------------------------------


def open_private_dir(path: Path, *, create: bool) -> int:
    """A descriptor of `path`, made 0700 when `create` and missing; raises `UnsafeSpoolDir`
    unless it is a real directory (not a symlink), owned by this user, and not writable by
    group or others."""
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeSpoolDir(
                f"spool_dir {path} is a symbolic link or not a directory: use the real "
                "directory, private to this user"
            ) from None
        raise
    info = os.fstat(fd)
    problem = ""
    if info.st_uid != os.geteuid():
        problem = f"is owned by uid {info.st_uid}, not by this process's user ({os.geteuid()})"
    elif info.st_mode & 0o022:
        problem = (
            f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"`chmod 700 {path}`"
        )
    if problem:
        os.close(fd)
        raise UnsafeSpoolDir(
            f"spool_dir {path} {problem}: whoever can write it can plant rows or redirect "
            "what the writer writes"
        )
    return fd


def _ours(info: os.stat_result) -> bool:
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid()


def _open_owned(directory: int, name: str, flags: int) -> int:
    """Open `name` in `directory`: never through a symlink, never waiting on a FIFO, and
    only when it is this user's regular file (raises `Refused` otherwise)."""
    try:
        fd = os.open(name, flags | _OPEN_FLAGS, 0o600, dir_fd=directory)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(exc.errno, "it is a symbolic link") from None
        if exc.errno == errno.ENXIO:  # a FIFO with no reader, opened to write
            raise Refused(exc.errno, "it is not a regular file (a FIFO)") from None
        if isinstance(exc, PermissionError):
            raise Refused(exc.errno, f"it cannot be opened ({exc.strerror})") from None
        raise
    info = os.fstat(fd)
    if not _ours(info):
        os.close(fd)
        kind = "a regular file" if stat.S_ISREG(info.st_mode) else "not a regular file"
        owner = "" if info.st_uid == os.geteuid() else f", owned by uid {info.st_uid}"
        raise Refused(errno.EPERM, f"it is {kind}{owner}")
    return fd


def _segment_names(directory: int) -> list[str]:
    return sorted(
        name
        for name in os.listdir(directory)
        if name.startswith(_SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX)
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # os.write may write less than asked (a full disk, a signal)
        view = view[os.write(fd, view) :]


def _try_lock(directory: int, name: str, operation: int = fcntl.LOCK_EX) -> int | None:
    """Open and lock `name` without waiting; None if another holder has it (or it is gone).
    Raises `Refused` for what is not this user's regular file."""
    try:
        fd = _open_owned(directory, name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        # Replayed and deleted (or replaced) between the open and the lock?
        same = os.stat(name, dir_fd=directory, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


# -- the segment format ------------------------------------------------------------------


def _header_bytes(target: SpoolTarget, key: bytes) -> tuple[bytes, SegmentHeader]:
    created, pid = time.time_ns(), os.getpid()
    body = orjson.dumps(
        {"target": target.as_json(), "key": key.hex(), "created_ns": created, "pid": pid}
    )
    head = _SEGMENT_HEAD.pack(SEGMENT_MAGIC, SEGMENT_FORMAT, len(body)) + body
    data = head + _CRC.pack(zlib.crc32(head))
    return data, SegmentHeader(target, key, created, pid, len(data))


def _read_header(fd: int) -> SegmentHeader:
    """The header at the start of a segment; raises `Refused` when there is none."""
    head = os.pread(fd, _SEGMENT_HEAD.size, 0)
    if len(head) < _SEGMENT_HEAD.size:
        raise Refused(errno.EINVAL, "it is too short to hold a segment header")
    magic, version, length = _SEGMENT_HEAD.unpack(head)
    if magic != SEGMENT_MAGIC:
        return _no_header(head)
    if version != SEGMENT_FORMAT:
        raise Refused(errno.EINVAL, f"its format {version} is not {SEGMENT_FORMAT}")
    if length > _MAX_HEADER:
        raise Refused(errno.EINVAL, "its header is too long")
    rest = os.pread(fd, length + _CRC.size, _SEGMENT_HEAD.size)
    if len(rest) < length + _CRC.size:
        raise Refused(errno.EINVAL, "its header is cut short")
    body = rest[:length]
    (crc,) = _CRC.unpack_from(rest, length)
    if zlib.crc32(head + body) != crc:
        raise Refused(errno.EINVAL, "its header is damaged")
    try:
        data = orjson.loads(body)
        key = bytes.fromhex(data["key"])
        target = SpoolTarget.from_json(data["target"])
        created, pid = int(data["created_ns"]), int(data["pid"])
    except (ValueError, KeyError, TypeError) as exc:
        raise Refused(errno.EINVAL, f"its header does not parse ({exc})") from None
    if len(key) != _KEY_BYTES:
        raise Refused(errno.EINVAL, "its header holds no usable key")
    return SegmentHeader(target, key, created, pid, _SEGMENT_HEAD.size + length + _CRC.size)


def _no_header(head: bytes) -> SegmentHeader:
    if head.startswith(b"AQS1"):
        raise Refused(
            errno.EINVAL,
            "it was written by an earlier auditq (no header naming its table, no tags); "
            "replay it with that version",
        )
    raise Refused(errno.EINVAL, "it does not start with a segment header")


def _tags(key: bytes, offset: int, payload_length: int, payload: bytes | None) -> bytes:
    """The head tag, or (with `payload`) the full tag, of a record at `offset`."""
    where = _TAG_INPUT.pack(offset, payload_length)
    if payload is None:
        return hmac.digest(key, b"head" + where, hashlib.sha256)[:8]
    mac = hmac.new(key, b"body" + where, hashlib.sha256)
    mac.update(payload)
    return mac.digest()


def _record_head(key: bytes, offset: int, length: int, pieces: list[bytes]) -> bytes:
    """The head of a record whose payload is `pieces` joined (`length` bytes in all)."""
    mac = hmac.new(key, b"body" + _TAG_INPUT.pack(offset, length), hashlib.sha256)
    for piece in pieces:
        mac.update(piece)
    return _RECORD_HEAD.pack(RECORD_MAGIC, length, _tags(key, offset, length, None), mac.digest())


_TORN: Final = "torn"
_BAD: Final = "bad"


def _record_at(
    fd: int, key: bytes, offset: int, size: int
) -> tuple[list[bytes], int] | tuple[str, int]:
    """The record at `offset`: (rows, end), or (_TORN, size) when the file ends inside it,
    or (_BAD, where reading may resume: its end when its head is sound, else -1)."""
    head = os.pread(fd, _RECORD_HEAD.size, offset)
    if len(head) < _RECORD_HEAD.size:
        return _TORN, size
    magic, length, head_tag, tag = _RECORD_HEAD.unpack(head)
    if magic != RECORD_MAGIC or not hmac.compare_digest(head_tag, _tags(key, offset, length, None)):
        return _BAD, -1
    body = offset + _RECORD_HEAD.size
    if body + length > size:
        return _TORN, size
    payload = os.pread(fd, length, body)
    if len(payload) < length:
        return _TORN, size
    if not hmac.compare_digest(tag, _tags(key, offset, length, payload)):
        return _BAD, body + length
    try:
        return split_rows(payload), body + length
    except struct.error:  # a sound tag over rows that do not split: never written so
        return _BAD, body + length


def _next_record(fd: int, key: bytes, start: int, size: int) -> int:
    """The offset of the next record with a sound head after `start` (-1: none). One pass:
    each candidate costs a small read and a small HMAC, whatever the damage holds."""
    position = start
    tail = b""
    while position < size:
        chunk = os.pread(fd, _SCAN_BYTES, position)
        if not chunk:
            return -1
        data = tail + chunk
        base = position - len(tail)
        found = data.find(RECORD_MAGIC)
        while found != -1:
            candidate = base + found
            if candidate > start:
                head = os.pread(fd, _RECORD_HEAD.size, candidate)
                if len(head) == _RECORD_HEAD.size:
                    _, length, head_tag, _ = _RECORD_HEAD.unpack(head)
                    if hmac.compare_digest(head_tag, _tags(key, candidate, length, None)):
                        return candidate
            found = data.find(RECORD_MAGIC, found + 1)
        tail = data[-(len(RECORD_MAGIC) - 1) :]
        position += len(chunk)
    return -1


def _read_fd(
    fd: int,
    name: str,
    header: SegmentHeader,
    start: int,
    on_damage: DamageHandler | None,
) -> Iterator[Record]:
    def damaged(offset: int, length: int, what: str) -> None:
        damage = Damage(name, offset, length, what)
        if on_damage is not None:
            on_damage(damage)
        else:
            logger.warning("spool segment %s: %s (%d bytes at %d)", name, what, length, offset)

    size = os.fstat(fd).st_size
    offset = max(start, header.size)
    while offset < size:
        got, end = _record_at(fd, header.key, offset, size)
        if not isinstance(got, str):
            yield Record(got, end)
            offset = end
            continue
        if got == _TORN:
            damaged(offset, size - offset, "torn record at the end")
            return
        resume = end if end > offset else _next_record(fd, header.key, offset, size)
        if resume == -1:
            damaged(offset, size - offset, "torn record at the end")
            return
        damaged(offset, resume - offset, "corrupt record")
        offset = resume


def read_records(
    path: Path, start: int = 0, on_damage: DamageHandler | None = None
) -> Iterator[Record]:
    """The intact records of a segment from byte `start` (0: the first), oldest first.

    A record whose tags are wrong is skipped: reading resumes at the next record with a
    sound head, and `on_damage` (or a warning) is told which bytes were lost. A torn tail
    (the writer died mid-append) ends the reading and is reported the same way. Raises
    `Refused` for a file that is not this user's regular file or has no valid header."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_owned(directory, path.name, os.O_RDONLY)
    finally:
        os.close(directory)
    try:
        header = _read_header(fd)
        yield from _read_fd(fd, path.name, header, start, on_damage)
    finally:
        os.close(fd)


def read_header(path: Path) -> SegmentHeader:
    """A segment's header (raises `Refused` when it has none, or is not this user's
    regular file)."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_owned(directory, path.name, os.O_RDONLY)
    finally:
        os.close(directory)
    try:
        return _read_header(fd)
    finally:
        os.close(fd)


def dead_letter_count(directory: str | os.PathLike[str]) -> tuple[int, int]:
    """Lines and bytes of a spool's dead-letter file ((0, 0) without one); raises `Refused`
    when it is not this user's regular file."""
    dir_fd = open_private_dir(Path(directory), create=False)
    try:
        fd = _open_owned(dir_fd, DEAD_LETTER_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return 0, 0
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as handle:
        lines = sum(1 for _ in handle)
        return lines, handle.tell()


def inspect_segments(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """What an operator wants to know of each segment, its header (target) included, and
    why one would not be replayed. Takes no lock a writer would wait for: a shared lock,
    dropped at once, only to tell whether a live writer holds it. Raises `UnsafeSpoolDir`
    for a directory a writer would refuse."""
    spool = Path(directory)
    dir_fd = open_private_dir(spool, create=False)
    out: list[dict[str, Any]] = []
    try:
        for name in _segment_names(dir_fd):
            entry: dict[str, Any] = {
                "segment": name,
                "bytes": 0,
                "records": 0,
                "rows": 0,
                "damaged_bytes": 0,
                "owned_by_live_writer": False,
            }
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                entry["bytes"] = info.st_size
                fd = _try_lock(dir_fd, name, fcntl.LOCK_SH)
                entry["owned_by_live_writer"] = fd is None
                if fd is not None:
                    os.close(fd)
                readable = _open_owned(dir_fd, name, os.O_RDONLY)
            except FileNotFoundError:
                continue  # replayed meanwhile
            except Refused as exc:
                out.append({**entry, "refused": exc.strerror})
                continue
            try:
                header = _read_header(readable)
            except Refused as exc:
                os.close(readable)
                out.append({**entry, "refused": exc.strerror})
                continue
            damage: list[Damage] = []
            records = rows = 0
            try:
                for record in _read_fd(readable, name, header, 0, damage.append):
                    records += 1
                    rows += len(record.rows)
            finally:
                os.close(readable)
            out.append(
                {
                    **entry,
                    "header": header.describe(),
                    "records": records,
                    "rows": rows,
                    "damaged_bytes": sum(d.length for d in damage),
                }
            )
    finally:
        os.close(dir_fd)
    return out
