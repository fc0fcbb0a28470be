"""`auditq verify`: recompute every chained row's leaf, every batch's root and link, check
them against the signed checkpoints, and name the damage exactly.

Rows are read with `COPY (...) TO STDOUT (FORMAT binary)` ordered by (stream, position) and
digests with a server-side cursor in the same order, both in one exported snapshot, and the
two are merged stream by stream: memory holds one batch's leaves, not the table.
"""

from __future__ import annotations

import bisect
import struct
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql

from . import chain
from .chain import GENESIS, HASH_SIZE, LEAF_COLUMNS_V1, SCAN_RECORD, digest_hash
from .chain_schema import checkpoints_table, digests_table, q, retention_table
from .checkpoint import (
    Checkpoint,
    Head,
    VerifierKey,
    note_signed_by,
    parse_checkpoint,
    parse_retention,
    read_external,
)

#: Findings that make the exit status 1.
DAMAGE: Final = frozenset(
    {
        "MODIFIED",
        "MISSING",
        "EXTRA",
        "DUPLICATE",
        "REORDERED",
        "BROKEN",
        "TRUNCATED",
        "BAD_SIGNATURE",
    }
)
#: Findings that are reported but are not damage.
NOTICE: Final = frozenset({"UNANCHORED", "PURGED"})
#: How many unmatched positions a suspect row is tried against before it is called MODIFIED.
_REORDER_TRIES: Final = 256
_POS: Final = struct.Struct(">Q")


@dataclass(frozen=True)
class Finding:
    """One thing `verify` found. Field names are stable (docs/tamper-evidence.md)."""

    kind: str
    stream: str | None = None
    first_pos: int | None = None
    last_pos: int | None = None
    id: str | None = None
    checkpoint: int | None = None
    detail: str = ""

    def json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}

    def line(self) -> str:
        parts = [f"{self.kind:<13}"]
        if self.stream:
            parts.append(f"stream={self.stream}")
        if self.first_pos is not None:
            span = (
                str(self.first_pos)
                if self.last_pos in (None, self.first_pos)
                else f"{self.first_pos}-{self.last_pos}"
            )
            parts.append(f"pos={span}")
        if self.id:
            parts.append(f"id={self.id}")
        if self.checkpoint is not None:
            parts.append(f"checkpoint={self.checkpoint}")
        if self.detail:
            parts.append(f"({self.detail})")
        return " ".join(parts)


@dataclass
class Summary:
    rows: int = 0
    digests: int = 0
    streams: int = 0
    checkpoints: int = 0
    unchained_rows: int = 0
    signatures_checked: bool = False
    findings: Counter[str] = field(default_factory=Counter)

    @property
    def damaged(self) -> bool:
        return any(self.findings[k] for k in DAMAGE)

    def json(self) -> dict[str, Any]:
        return {
            "kind": "SUMMARY",
            "clean": not self.damaged,
            "rows": self.rows,
            "digests": self.digests,
            "streams": self.streams,
            "checkpoints": self.checkpoints,
            "unchained_rows": self.unchained_rows,
            "signatures_checked": self.signatures_checked,
            "findings": dict(sorted(self.findings.items())),
        }

    def merge(self, other: Summary) -> None:
        self.rows += other.rows
        self.digests += other.digests
        self.streams += other.streams
        self.findings.update(other.findings)


@dataclass(frozen=True)
class Options:
    dsn: str
    schema: str
    table: str
    keys: tuple[VerifierKey, ...] = ()
    external: Path | None = None
    since_checkpoint: int | None = None
    since_time: datetime | None = None
    tenant: str | None = None
    jobs: int = 1
    #: Count unchained rows written after chaining began without calling them EXTRA (a
    #: rolling upgrade, while some writers do not chain yet).
    allow_unchained: bool = False


Report = Callable[[Finding], None]


class UsageError(ValueError):
    """What was asked cannot be checked (exit status 2)."""


# -- checkpoints and retention ---------------------------------------------------------------


@dataclass
class Anchors:
    #: stream -> next_pos -> (head hash, checkpoint number), from every valid checkpoint
    heads: dict[bytes, dict[int, tuple[bytes, int]]] = field(default_factory=dict)
    #: stream -> sorted purged ranges (first_pos, end_pos)
    purged: dict[bytes, list[tuple[int, int]]] = field(default_factory=dict)
    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)

    def latest(self, stream: bytes) -> tuple[int, bytes, int] | None:
        known = self.heads.get(stream)
        if not known:
            return None
        pos = max(known)
        return pos, known[pos][0], known[pos][1]

    def is_purged(self, stream: bytes, pos: int) -> bool:
        ranges = self.purged.get(stream)
        if not ranges:
            return False
        at = bisect.bisect_right(ranges, (pos, float("inf"))) - 1
        return at >= 0 and ranges[at][0] <= pos < ranges[at][1]


def _signed(note: str, keys: Sequence[VerifierKey]) -> bool:
    return not keys or any(note_signed_by(note, key) for key in keys)


def load_anchors(conn: psycopg.Connection[Any], opts: Options, report: Report) -> Anchors:
    anchors = Anchors()
    notes: dict[int, str] = {
        int(n): str(text)
        for n, text in conn.execute(
            sql.SQL("SELECT checkpoint_no, note FROM {} ORDER BY checkpoint_no").format(
                q(opts.schema, checkpoints_table(opts.table))
            )
        )
    }
    if opts.external is not None:
        for text in read_external(opts.external):
            try:
                outside = parse_checkpoint(text)
            except ValueError as exc:
                report(Finding("BAD_SIGNATURE", detail=f"external checkpoint unreadable: {exc}"))
                continue
            inside = notes.get(outside.number)
            if inside is None:
                report(
                    Finding(
                        "TRUNCATED",
                        checkpoint=outside.number,
                        detail="checkpoint kept outside the database is missing from it",
                    )
                )
                notes[outside.number] = text
            elif inside != text:
                report(
                    Finding(
                        "BROKEN",
                        checkpoint=outside.number,
                        detail="checkpoint differs from the copy kept outside the database",
                    )
                )
                notes[outside.number] = text  # the outside copy is the trusted one
    previous: Checkpoint | None = None
    for number in sorted(notes):
        text = notes[number]
        try:
            point = parse_checkpoint(text)
        except ValueError as exc:
            report(Finding("BAD_SIGNATURE", checkpoint=number, detail=f"unreadable: {exc}"))
            continue
        if point.number != number or not _signed(text, opts.keys):
            report(Finding("BAD_SIGNATURE", checkpoint=number, detail="signature does not verify"))
            continue
        if previous is not None and point.prev != previous.hash:
            report(
                Finding(
                    "BROKEN",
                    checkpoint=number,
                    detail=f"does not link to checkpoint {previous.number}",
                )
            )
        anchors.checkpoints[number] = point
        for head in point.heads:
            anchors.heads.setdefault(head.stream.bytes, {})[head.next_pos] = (head.hash, number)
        previous = point
    for number, text in conn.execute(
        sql.SQL("SELECT purge_no, note FROM {} ORDER BY purge_no").format(
            q(opts.schema, retention_table(opts.table))
        )
    ):
        try:
            _, ranges = parse_retention(text)
        except ValueError as exc:
            report(Finding("BAD_SIGNATURE", detail=f"retention record {number} unreadable: {exc}"))
            continue
        if not _signed(text, opts.keys):
            report(Finding("BAD_SIGNATURE", detail=f"retention record {number} does not verify"))
            continue
        for r in ranges:
            anchors.purged.setdefault(r.stream.bytes, []).append((r.first_pos, r.end_pos))
    for spans in anchors.purged.values():
        spans.sort()
    return anchors


# -- the streamed scan -----------------------------------------------------------------------


@dataclass(frozen=True)
class Digest:
    stream: bytes
    first_pos: int
    count: int
    skipped: tuple[tuple[int, int], ...]
    root: bytes
    prev_hash: bytes
    hash: bytes
    leaves: bytes

    @property
    def next_pos(self) -> int:
        return self.first_pos + self.count


class _Peek:
    __slots__ = ("_it", "head")

    def __init__(self, it: Iterator[Any]) -> None:
        self._it = it
        self.head: Any = next(it, None)

    def pop(self) -> Any:
        item = self.head
        self.head = next(self._it, None)
        return item


#: A scanned row: (stream, pos, id, leaf, its tuple's bytes).
Row = tuple[bytes, int, bytes, bytes, memoryview]
#: One scanned piece of COPY data: (the data, its records, their leaves).
Chunk = tuple[bytes, bytes, bytes]
_RECORD: Final = SCAN_RECORD.size
_HEAD: Final = struct.Struct(">16sQ")


def copy_chunks(cur: psycopg.Cursor[Any], statement: sql.Composed) -> Iterator[Chunk]:
    """The rows of the COPY as scanned pieces of ~64 KiB (the server sends one message per
    row; a C call and a Python step per row would cost more than the hash)."""
    rest = b""
    started = False
    with cur.copy(statement) as copy:
        messages = iter(copy)
        finished = False
        while not finished:
            pending: list[Any] = [rest]
            size = len(rest)
            for data in messages:
                pending.append(data)
                size += len(data)
                if size >= 1 << 16:
                    break
            else:
                finished = True
            buf = b"".join(pending)
            at = 0
            if not started:
                if len(buf) < 19:
                    rest = buf
                    continue
                (ext,) = struct.unpack_from(">I", buf, 15)
                at = 19 + ext
                started = True
            at, records, ended, leaves = chain.scan_rows(buf, at, len(LEAF_COLUMNS_V1))
            if records:
                yield buf, records, leaves
            if ended:
                return
            rest = buf[at:]


class _Taken:
    """The rows of one stream below a position, as pieces of scanned chunks."""

    __slots__ = ("count", "pieces")

    def __init__(self) -> None:
        self.pieces: list[tuple[bytes, bytes, bytes]] = []
        self.count = 0

    def leaves(self) -> bytes:
        return b"".join(p[2] for p in self.pieces)

    def rows(self) -> Iterator[Row]:
        for buf, records, _ in self.pieces:
            view = memoryview(buf)
            for stream, pos, ident, leaf, off, length in SCAN_RECORD.iter_unpack(records):
                yield stream, pos, ident, leaf, view[off : off + length]


class _RowSource:
    """The scanned rows in (stream, position) order, taken a run at a time."""

    def __init__(self, chunks: Iterator[Chunk]) -> None:
        self._chunks = chunks
        self._buf = self._records = self._leaves = b""
        self._at = self._n = 0
        self._load()

    def _load(self) -> bool:
        for buf, records, leaves in self._chunks:
            self._buf, self._records, self._leaves = buf, records, leaves
            self._at, self._n = 0, len(records) // _RECORD
            return True
        self._n = self._at = 0
        return False

    @property
    def head(self) -> tuple[bytes, int] | None:
        if self._at >= self._n:
            return None
        stream, pos = _HEAD.unpack_from(self._records, self._at * _RECORD)
        return stream, pos

    def take(self, stream: bytes, end: int) -> _Taken:
        """Every row of `stream` at a position below `end`, from here on."""
        taken = _Taken()
        while self._at < self._n:
            # rows sorted by (stream, pos): the ones wanted are a prefix; find where it ends
            lo, hi = self._at, self._n
            while lo < hi:
                mid = (lo + hi) // 2
                s, pos = _HEAD.unpack_from(self._records, mid * _RECORD)
                if s == stream and pos < end:
                    lo = mid + 1
                else:
                    hi = mid
            if lo > self._at:
                taken.pieces.append(
                    (
                        self._buf,
                        self._records[self._at * _RECORD : lo * _RECORD],
                        self._leaves[self._at * HASH_SIZE : lo * HASH_SIZE],
                    )
                )
                taken.count += lo - self._at
            self._at = lo
            if lo < self._n or not self._load():
                break
        return taken


def _digests(cur: psycopg.Cursor[Any]) -> Iterator[Digest]:
    for row in cur:
        stream, first, count, skip_pos, skip_reason, root, prev, digest, leaves = row
        yield Digest(
            stream.bytes,
            first,
            count,
            tuple(zip(skip_pos, skip_reason, strict=True)),
            bytes(root),
            bytes(prev),
            bytes(digest),
            bytes(leaves),
        )


def _leaf_at(tuple_bytes: bytes, pos: int) -> bytes:
    """The leaf the row would have at position `pos` (to tell a moved row from an edited one)."""
    fields, _ = chain.tuple_fields(tuple_bytes, 0)
    fields[-1] = _POS.pack(pos)
    return chain.leaf_of_fields(fields)


class _Ranges:
    """Coalesces consecutive positions of one kind into one finding."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.open: dict[str, tuple[bytes, int, int, str]] = {}

    def add(self, kind: str, stream: bytes, first: int, last: int, detail: str = "") -> None:
        held = self.open.get(kind)
        if held and held[0] == stream and held[2] + 1 == first and held[3] == detail:
            self.open[kind] = (stream, held[1], last, detail)
            return
        self.flush(kind)
        self.open[kind] = (stream, first, last, detail)

    def flush(self, kind: str | None = None) -> None:
        for k in [kind] if kind else list(self.open):
            held = self.open.pop(k, None)
            if held:
                s, first, last, detail = held
                self.report(Finding(k, str(uuid.UUID(bytes=s)), first, last, detail=detail))


class _StreamCheck:
    def __init__(
        self, anchors: Anchors, report: Report, summary: Summary, chain_links: bool
    ) -> None:
        self.anchors = anchors
        self.report = report
        self.summary = summary
        self.ranges = _Ranges(report)
        self.chain_links = chain_links

    def finding(self, kind: str, stream: bytes, first: int | None = None, **kw: Any) -> None:
        self.report(Finding(kind, str(uuid.UUID(bytes=stream)), first, kw.pop("last", first), **kw))

    def missing(self, stream: bytes, first: int, last: int) -> None:
        pos = first
        while pos <= last:  # split into purged and missing runs
            purged = self.anchors.is_purged(stream, pos)
            end = pos
            while end + 1 <= last and self.anchors.is_purged(stream, end + 1) == purged:
                end += 1
            self.ranges.add("PURGED" if purged else "MISSING", stream, pos, end)
            pos = end + 1

    def run(
        self,
        stream: bytes,
        digests: Iterator[Digest],
        rows: _RowSource,
        start: tuple[int, bytes] | None,
    ) -> None:
        expected, prev = start or (1, GENESIS)
        known = self.anchors.heads.get(stream, {})
        seen = self.summary.digests
        for d in digests:
            self.summary.digests += 1
            if d.hash != digest_hash(
                uuid.UUID(bytes=stream), d.first_pos, d.count, d.skipped, d.root, d.prev_hash
            ):
                self.finding(
                    "BROKEN",
                    stream,
                    d.first_pos,
                    last=d.next_pos - 1,
                    detail="digest hash does not match its fields",
                )
            if chain.root(d.leaves) != d.root:
                self.finding(
                    "BROKEN",
                    stream,
                    d.first_pos,
                    last=d.next_pos - 1,
                    detail="digest leaves do not match its root",
                )
            if self.chain_links:
                if d.first_pos > expected:
                    if all(self.anchors.is_purged(stream, p) for p in (expected, d.first_pos - 1)):
                        self.ranges.add("PURGED", stream, expected, d.first_pos - 1)
                    else:
                        self.finding(
                            "BROKEN",
                            stream,
                            expected,
                            last=d.first_pos - 1,
                            detail="no digest covers these positions",
                        )
                elif d.first_pos < expected:
                    self.finding(
                        "DUPLICATE",
                        stream,
                        d.first_pos,
                        last=d.next_pos - 1,
                        detail="a second digest covers these positions",
                    )
                if d.prev_hash != prev and not (d.first_pos > expected):
                    self.finding(
                        "BROKEN",
                        stream,
                        d.first_pos,
                        last=d.next_pos - 1,
                        detail="digest does not link to the previous one",
                    )
            # rows before this digest: in a gap no digest covers
            before = rows.take(stream, d.first_pos)
            self.summary.rows += before.count
            for row in before.rows() if before.count else ():
                self.extra_row(row, "no digest covers its position")
            self.batch(stream, d, rows)
            head = known.get(d.next_pos)
            if head is not None and head[0] != d.hash:
                self.finding(
                    "BROKEN",
                    stream,
                    d.first_pos,
                    last=d.next_pos - 1,
                    checkpoint=head[1],
                    detail="digest differs from the one the checkpoint signed",
                )
            expected, prev = max(expected, d.next_pos), d.hash
        after = rows.take(stream, 1 << 63)
        self.summary.rows += after.count
        for row in after.rows() if after.count else ():
            self.extra_row(
                row,
                "after the stream's last digest"
                if self.summary.digests > seen
                else "its stream has no digest",
            )
        if not self.chain_links:
            self.ranges.flush()
            return
        latest = self.anchors.latest(stream)
        if latest is None:
            if expected > (start or (1, b""))[0]:
                self.ranges.add("UNANCHORED", stream, (start or (1, b""))[0], expected - 1)
        elif expected < latest[0]:
            self.finding(
                "TRUNCATED",
                stream,
                expected,
                last=latest[0] - 1,
                checkpoint=latest[2],
                detail="positions the checkpoint signed are gone",
            )
        elif expected > latest[0]:
            self.ranges.add("UNANCHORED", stream, latest[0], expected - 1)
        self.ranges.flush()

    def extra_row(self, row: Row, detail: str) -> None:
        self.finding("EXTRA", row[0], row[1], id=str(uuid.UUID(bytes=row[2])), detail=detail)

    def batch(self, stream: bytes, d: Digest, rows: _RowSource) -> None:
        skipped = {p for p, _ in d.skipped}
        skips = sorted(skipped)
        present = d.count - len(skipped)
        leaves = d.leaves
        if len(leaves) != present * HASH_SIZE:
            self.finding(
                "BROKEN",
                stream,
                d.first_pos,
                last=d.next_pos - 1,
                detail="digest holds the wrong number of leaves",
            )
            leaves = leaves[: present * HASH_SIZE].ljust(present * HASH_SIZE, b"\0")
        matched = bytearray(present)
        suspects: list[tuple[int, bytes, bytes]] = []
        first = d.first_pos
        end = d.next_pos
        taken = rows.take(stream, end)
        self.summary.rows += taken.count
        if taken.count == present and taken.leaves() == leaves:
            return  # each row has the leaf of its position: the whole batch is intact
        for s, pos, ident, leaf, data in taken.rows():
            if pos in skipped:
                self.extra_row((s, pos, ident, leaf, data), "at a position its digest skipped")
                continue
            index = pos - first - (bisect.bisect_left(skips, pos) if skips else 0)
            if leaves[index * HASH_SIZE : index * HASH_SIZE + HASH_SIZE] == leaf:
                if matched[index]:
                    self.finding(
                        "DUPLICATE",
                        stream,
                        pos,
                        id=str(uuid.UUID(bytes=ident)),
                        detail="a second copy of this row",
                    )
                matched[index] = 1
            else:
                suspects.append((pos, ident, bytes(data)))
        if not suspects and all(matched):
            return
        unmatched = [i for i in range(present) if not matched[i]]
        positions = [p for p in range(first, end) if p not in skipped]
        later: list[tuple[int, bytes, bytes]] = []
        for pos, ident, tuple_bytes in suspects:
            for i in unmatched[:_REORDER_TRIES]:
                if matched[i]:
                    continue
                if (
                    _leaf_at(tuple_bytes, positions[i])
                    == leaves[i * HASH_SIZE : i * HASH_SIZE + HASH_SIZE]
                ):
                    matched[i] = 1
                    self.finding(
                        "REORDERED",
                        stream,
                        pos,
                        id=str(uuid.UUID(bytes=ident)),
                        detail=f"belongs at position {positions[i]}",
                    )
                    break
            else:
                later.append((pos, ident, tuple_bytes))
        for pos, ident, _data in later:
            index = positions.index(pos)
            if not matched[index]:
                matched[index] = 1
                self.finding("MODIFIED", stream, pos, id=str(uuid.UUID(bytes=ident)))
            else:
                self.finding(
                    "DUPLICATE",
                    stream,
                    pos,
                    id=str(uuid.UUID(bytes=ident)),
                    detail="another row holds this position",
                )
        run: list[int] = []
        for i in range(present):
            if not matched[i]:
                if run and positions[i] != run[-1] + 1:
                    self.missing(stream, run[0], run[-1])
                    run = []
                run.append(positions[i])
        if run:
            self.missing(stream, run[0], run[-1])


# -- queries -----------------------------------------------------------------------------------


def _selection(
    opts: Options, anchors: Anchors, part: tuple[int, int] | None
) -> tuple[sql.Composable, sql.Composable]:
    """(a CTE `starts(stream, pos)` selecting where each stream is read from, a WHERE for
    digests `d`)."""
    digests = q(opts.schema, digests_table(opts.table))
    conds: list[sql.Composable] = []
    if part is not None:
        conds.append(
            sql.SQL("get_byte(uuid_send(d.stream), 15) % {} = {}").format(
                sql.Literal(part[1]), sql.Literal(part[0])
            )
        )
    if opts.tenant is not None:
        conds.append(
            sql.SQL(
                "EXISTS (SELECT 1 FROM {} t WHERE t.chain_stream = d.stream "
                "AND t.chain_pos >= d.first_pos "
                "AND t.chain_pos < d.first_pos + d.pos_count AND t.tenant_id = {})"
            ).format(q(opts.schema, opts.table), sql.Literal(opts.tenant))
        )
    if opts.since_time is not None:
        conds.append(
            sql.SQL(
                "d.first_pos >= coalesce((SELECT min(x.first_pos) FROM {} x "
                "WHERE x.stream = d.stream AND x.recorded_at >= {}), 9223372036854775807)"
            ).format(digests, sql.Literal(opts.since_time))
        )
    if opts.since_checkpoint is not None:
        point = anchors.checkpoints.get(opts.since_checkpoint)
        heads = point.heads if point else ()
        conds.append(
            sql.SQL(
                "d.first_pos >= coalesce((SELECT s.pos FROM unnest({}::uuid[], {}::bigint[]) "
                "AS s(stream, pos) WHERE s.stream = d.stream), 1)"
            ).format(
                sql.Literal([h.stream for h in heads]), sql.Literal([h.next_pos for h in heads])
            )
        )
    where = sql.SQL(" AND ").join(conds) if conds else sql.SQL("true")
    return where, digests


def _scan_part(
    opts: Options, anchors: Anchors, part: tuple[int, int] | None, report: Report
) -> Summary:
    summary = Summary()
    where, digests = _selection(opts, anchors, part)
    columns = sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in LEAF_COLUMNS_V1)
    # --tenant and --since TIME read only some batches of a stream, so links between batches
    # and the stream's ends cannot be checked; --since CHECKPOINT starts each stream at its
    # signed head and checks everything after it.
    joined = opts.tenant is not None or opts.since_time is not None
    starts: dict[bytes, tuple[int, bytes]] = {}
    if opts.since_checkpoint is not None and opts.since_checkpoint in anchors.checkpoints:
        for h in anchors.checkpoints[opts.since_checkpoint].heads:
            starts[h.stream.bytes] = (h.next_pos, h.hash)
    with psycopg.connect(opts.dsn) as a, psycopg.connect(opts.dsn) as b:
        a.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        (snapshot,) = a.execute("SELECT pg_export_snapshot()").fetchone() or ("",)
        b.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        b.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        if joined:
            rows_sql = sql.SQL(
                "COPY (SELECT {} FROM {} t JOIN "
                "(SELECT d.stream, d.first_pos, d.pos_count FROM {} d WHERE {}) s "
                "ON t.chain_stream = s.stream AND t.chain_pos >= s.first_pos "
                "AND t.chain_pos < s.first_pos + s.pos_count "
                "ORDER BY t.chain_stream, t.chain_pos, t.id) TO STDOUT (FORMAT binary)"
            ).format(columns, q(opts.schema, opts.table), digests, where)
        else:
            part_cond = (
                sql.SQL("AND get_byte(uuid_send(t.chain_stream), 15) % {} = {}").format(
                    sql.Literal(part[1]), sql.Literal(part[0])
                )
                if part
                else sql.SQL("")
            )
            since = (
                sql.SQL(
                    "LEFT JOIN unnest({}::uuid[], {}::bigint[]) AS s(stream, pos) "
                    "ON s.stream = t.chain_stream"
                ).format(
                    sql.Literal([uuid.UUID(bytes=k) for k in starts]),
                    sql.Literal([v[0] for v in starts.values()]),
                )
                if opts.since_checkpoint is not None
                else sql.SQL("")
            )
            since_cond = (
                sql.SQL("AND t.chain_pos >= coalesce(s.pos, 1)")
                if opts.since_checkpoint is not None
                else sql.SQL("")
            )
            rows_sql = sql.SQL(
                "COPY (SELECT {} FROM {} t {} WHERE t.chain_stream IS NOT NULL {} {} "
                "ORDER BY t.chain_stream, t.chain_pos, t.id) TO STDOUT (FORMAT binary)"
            ).format(columns, q(opts.schema, opts.table), since, part_cond, since_cond)
        dcur = a.cursor(name="auditq_verify_digests")
        dcur.itersize = 64  # a batch of 1,000 rows carries 32 KB of leaves
        dcur.execute(
            sql.SQL(
                "SELECT d.stream, d.first_pos, d.pos_count, d.skipped_pos, d.skipped_reason, "
                "d.root, "
                "d.prev_hash, d.hash, d.leaves FROM {} d WHERE {} ORDER BY d.stream, d.first_pos"
            ).format(digests, where)
        )
        check = _StreamCheck(anchors, report, summary, chain_links=not joined)
        rows = _RowSource(copy_chunks(b.cursor(), rows_sql))
        ds = _Peek(_digests(dcur))
        visited: set[bytes] = set()
        while ds.head is not None or rows.head is not None:
            row_head = rows.head
            candidates = [x for x in (row_head and row_head[0], ds.head and ds.head.stream) if x]
            stream = min(candidates)
            visited.add(stream)
            summary.streams += 1

            def of_stream(s: bytes = stream) -> Iterator[Digest]:
                while ds.head is not None and ds.head.stream == s:
                    yield ds.pop()

            check.run(stream, of_stream(), rows, starts.get(stream))
        if not joined:
            for stream, known in anchors.heads.items():
                if stream in visited or (part and stream[15] % part[1] != part[0]):
                    continue
                first = starts.get(stream, (1, b""))[0]
                latest = max(known)
                if latest > first and not all(
                    anchors.is_purged(stream, p) for p in (first, latest - 1)
                ):
                    check.finding(
                        "TRUNCATED",
                        stream,
                        first,
                        last=latest - 1,
                        checkpoint=known[latest][1],
                        detail="every digest of these signed positions is gone",
                    )
        dcur.close()
    return summary


def _unchained(
    conn: psycopg.Connection[Any], opts: Options, report: Report, summary: Summary
) -> None:
    target = q(opts.schema, opts.table)
    digests = q(opts.schema, digests_table(opts.table))
    tenant = (
        sql.SQL("AND tenant_id = {}").format(sql.Literal(opts.tenant))
        if opts.tenant
        else sql.SQL("")
    )
    (count,) = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE chain_stream IS NULL {}").format(target, tenant)
    ).fetchone() or (0,)
    summary.unchained_rows = int(count)
    if not count or opts.allow_unchained:
        return
    for (ident,) in conn.execute(
        sql.SQL(
            "SELECT id FROM {} WHERE chain_stream IS NULL {} "
            "AND recorded_at >= (SELECT min(recorded_at) FROM {}) ORDER BY id"
        ).format(target, tenant, digests)
    ):
        report(Finding("EXTRA", id=str(ident), detail="unchained row written after chaining began"))


def _job(args: tuple[Options, Anchors, tuple[int, int]]) -> tuple[Summary, list[Finding]]:
    opts, anchors, part = args
    found: list[Finding] = []
    return _scan_part(opts, anchors, part, found.append), found


def verify(opts: Options, report: Report) -> Summary:
    """Check everything `opts` selects, reporting each finding as it is made."""
    summary = Summary(signatures_checked=bool(opts.keys))

    def counted(finding: Finding) -> None:
        summary.findings[finding.kind] += 1
        report(finding)

    with psycopg.connect(opts.dsn) as conn:
        anchors = load_anchors(conn, opts, counted)
        if opts.since_checkpoint is not None and opts.since_checkpoint not in anchors.checkpoints:
            raise UsageError(f"there is no valid checkpoint {opts.since_checkpoint}")
        summary.checkpoints = len(anchors.checkpoints)
        _unchained(conn, opts, counted, summary)
    if opts.jobs <= 1:
        part = _scan_part(opts, anchors, None, counted)
        part.findings.clear()
        summary.merge(part)
        return summary
    with ProcessPoolExecutor(opts.jobs) as pool:
        for part, found in pool.map(
            _job, [(opts, anchors, (k, opts.jobs)) for k in range(opts.jobs)]
        ):
            part.findings.clear()
            summary.merge(part)
            for finding in found:
                counted(finding)
    return summary


def heads_of(anchors: Anchors) -> dict[bytes, Head]:
    """The latest signed head of each stream (for tools built on `load_anchors`)."""
    out: dict[bytes, Head] = {}
    for stream, known in anchors.heads.items():
        pos = max(known)
        out[stream] = Head(uuid.UUID(bytes=stream), pos, known[pos][0])
    return out
