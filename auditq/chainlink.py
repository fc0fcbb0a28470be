"""The writer's side of the hash chain (docs/tamper-evidence.md, "What the writer does"):
which stream a row belongs to, stamping new rows, and the digest each COPY transaction
commits with its rows.

Kept out of sink.py, which decides *when* to write and what a failure means; this module
decides *what the chain records* for each write. One `Chainer` per sink, owned by the
writer thread (not thread-safe). Its live stream is made lazily at the first stamp, so a
forked child (which builds a new sink) opens a stream of its own, and a restarted writer
thread (same sink) keeps its stream.

A stream whose rows are handed back by the sink (to the spool, or to the dead letters at
close) is *retired*: the writer stamps later rows in a new stream, and the retired one is
continued by whoever writes its remaining rows (this writer's spool replay, or another
process's), each time from the head the digests table holds. So no position of a stream is
ever sealed by two parties, and a stream's rows reach the table in position order.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple

import psycopg
from psycopg import sql

from . import chain, chain_schema
from .binary import COPY_COLUMNS, Item, item_id
from .chain import ChainStream, DigestRecord, Skip

logger = logging.getLogger("auditq")

#: The columns of a chained COPY: the writer's own, then the two the stamp appends (the
#: v1 leaf's columns exactly).
CHAINED_COLUMNS: Final = (*COPY_COLUMNS, "chain_stream", "chain_pos")
assert CHAINED_COLUMNS == chain.LEAF_COLUMNS_V1
#: The first two bytes (field count) of a stamped tuple.
_CHAINED_HEAD: Final = len(CHAINED_COLUMNS).to_bytes(2, "big")
#: A stamped tuple ends with int32 16, the stream's 16 bytes, int32 8, the position.
_TAIL: Final = 32


def is_chained(data: bytes) -> bool:
    """Does this encoded row carry chain_stream and chain_pos (was it stamped)?"""
    return data[:2] == _CHAINED_HEAD


def stream_of(data: bytes) -> bytes:
    """The 16-byte stream id of a stamped row."""
    return data[-28:-12]


def pos_of(data: bytes) -> int:
    """The position of a stamped row."""
    return int.from_bytes(data[-8:], "big")


def group(items: list[Item]) -> list[list[Item]]:
    """`items` cut into batches each chaining can seal: the unchained rows (in their order),
    then each stream's rows in position order. A batch handed back by a failed delivery is
    not in position order (the sink's work list is a stack), and the spool keeps what it is
    given: the order is restored here, where it matters."""
    plain: list[Item] = []
    streams: dict[bytes, list[Item]] = {}
    for item in items:
        data = item[0]
        if is_chained(data):
            streams.setdefault(stream_of(data), []).append(item)
        else:
            plain.append(item)
    out = [plain] if plain else []
    for rows in streams.values():
        rows.sort(key=lambda item: pos_of(item[0]))
        out.append(rows)
    return out


class Plan(NamedTuple):
    """One chained write: the stream it continues and the rows still to write. Rows whose
    position the stream's committed head already covers are `done` when the table holds
    them (an earlier attempt whose commit was cut in flight wrote them) and `sealed` when
    it does not: their positions were sealed as skipped before this replay reached them
    (a later segment of the stream was replayed first), so they cannot join the chain."""

    stream: ChainStream
    todo: list[Item]
    done: list[Item]
    sealed: list[Item]


class Chainer:
    """The streams one writer continues (see the module docstring)."""

    def __init__(self, schema: str, table: str, *, enabled: bool) -> None:
        self.enabled = enabled
        self._schema, self._table = schema, table
        #: The stream new rows are stamped in (None until the first stamp, or once retired).
        self.live: ChainStream | None = None
        #: Skips recorded for retired streams, waiting for a digest: stream -> pos -> reason.
        self._retired: dict[bytes, dict[int, int]] = {}
        self._digests = chain_schema.q(schema, chain_schema.digests_table(table))
        # No ON CONFLICT (unlike `chain_schema.insert_digest_sql`): a digest already
        # stored at this start refuses the transaction (SQLSTATE 23505), and the sink's
        # dedupe path then reconciles the stream with the stored head.
        self._insert = sql.SQL(
            "INSERT INTO {} (stream, first_pos, pos_count, skipped_pos, skipped_reason, root, "
            "prev_hash, hash, leaves, version) VALUES (%s, %s, %s, %s, %s, %b, %b, %b, %b, %s)"
        ).format(self._digests)
        self._stored = sql.SQL(
            "SELECT id FROM {} WHERE chain_stream = %s AND chain_pos = ANY(%s)"
        ).format(chain_schema.q(schema, table))

    # -- stamping ---------------------------------------------------------------------------

    def stamp(self, data: bytes) -> tuple[bytes, bytes]:
        """Number a block of encoded rows in the live stream: the stamped tuples, and
        their leaves."""
        live = self.live
        if live is None:
            live = self.live = ChainStream()
        stamped, leaves, _first = live.stamp(data)
        return stamped, leaves

    def seal_live(self, leaves: Sequence[bytes]) -> DigestRecord | None:
        """The digest of everything stamped in the live stream since its sealed end (the
        first attempt of a batch: its rows are the stamped ones, in order, after any skips
        a failed digest left pending). None when there is nothing to seal."""
        live = self.live
        if live is None or live.next_pos == live.sealed_pos:
            return None
        joined = b"".join(leaves)
        start = live.next_pos - len(joined) // chain.HASH_SIZE
        for pos in range(live.sealed_pos, start):
            if not live.skipped(pos):  # never expected: recorded rather than refused
                logger.warning("chain position %d of stream %s had no record", pos, live.id)
                live.skip(pos, Skip.ABANDONED)
        return live.seal_through(joined, live.next_pos)

    # -- handing rows back ------------------------------------------------------------------

    def retire(self, items: Iterable[Item]) -> None:
        """`items` leave the writer (to the spool, or given up): if any is in the live
        stream, the next rows go to a new one (module docstring)."""
        live = self.live
        if live is None:
            return
        key = live.id.bytes
        if any(is_chained(item[0]) and stream_of(item[0]) == key for item in items):
            self.live = None
            pending = live.pending()
            if pending:
                self._retired[key] = pending

    def skip(self, items: Iterable[Item], reason: Skip) -> None:
        """Rows dead-lettered: their positions are recorded as skipped in the digest that
        covers them."""
        live = self.live
        for item in items:
            data = item[0]
            if not is_chained(data):
                continue
            key, pos = stream_of(data), pos_of(data)
            if live is not None and key == live.id.bytes and pos >= live.sealed_pos:
                live.skip(pos, reason)
            elif live is None or key != live.id.bytes:
                self._retired.setdefault(key, {})[pos] = int(reason)

    # -- the transaction --------------------------------------------------------------------

    def plan(self, conn: psycopg.Connection[Any], batch: list[Item], *, reconcile: bool) -> Plan:
        """Start a chained write of `batch` (one stream, position order) inside the open
        transaction. The live stream is trusted as it is unless `reconcile` (an idempotent
        replay, or a dedupe): then, like any other stream, it is set to the head the
        digests table holds, read in this transaction."""
        key = stream_of(batch[0][0])
        live = self.live
        end = pos_of(batch[-1][0]) + 1
        if live is not None and key == live.id.bytes:
            stream = live
            if reconcile:
                head = chain_schema.stream_head(conn, self._schema, self._table, live.id)
                if head is not None and head[0] > live.sealed_pos:
                    live.resync(head[0], head[1], end)
                elif head is not None and head[0] < live.sealed_pos:
                    logger.error(
                        "the digests table's head of stream %s (position %d) is behind what "
                        "this writer committed (%d): a digest was removed",
                        live.id,
                        head[0],
                        live.sealed_pos,
                    )
        else:
            stream = chain_schema.resume_stream(
                conn, self._schema, self._table, uuid.UUID(bytes=key)
            )
            stream.resync(stream.sealed_pos, stream.head_hash, end)
            for pos, reason in self._retired.get(key, {}).items():
                if stream.sealed_pos <= pos < end:
                    stream.skip(pos, Skip(reason))
        sealed = stream.sealed_pos
        todo = [item for item in batch if pos_of(item[0]) >= sealed]
        if len(todo) == len(batch):
            return Plan(stream, todo, [], [])
        covered = [i for i in batch if pos_of(i[0]) < sealed]
        # Counted as written only if the table holds them: a covered position may have been
        # sealed as skipped (ABANDONED) by a digest written before this row was replayed.
        stored = self._stored_ids(conn, stream, covered)
        done = [item for item in covered if item_id(item) in stored]
        missing = [item for item in covered if item_id(item) not in stored]
        return Plan(stream, todo, done, missing)

    def _stored_ids(
        self, conn: psycopg.Connection[Any], stream: ChainStream, items: list[Item]
    ) -> set[int]:
        """The ids, among `items`, of rows the table holds at their stream and position."""
        found: set[int] = set()
        for start in range(0, len(items), 1000):
            piece = items[start : start + 1000]
            rows = conn.execute(
                self._stored,
                (stream.id, [pos_of(item[0]) for item in piece]),
            ).fetchall()
            found.update(row[0].int for row in rows)
        return found

    def seal(self, plan: Plan, written: list[Item], duplicates: list[Item]) -> DigestRecord | None:
        """The digest of a planned write: `written` rows present, `duplicates` (refused by
        an idempotent merge: another row holds their id) skipped as DUPLICATE_ID, and any
        other position up to the batch's end that holds no row and no recorded skip
        skipped as ABANDONED (its row was resolved without being written: given up, or
        lost by the spool)."""
        stream = plan.stream
        if not plan.todo:
            return None
        for item in duplicates:
            stream.skip(pos_of(item[0]), Skip.DUPLICATE_ID)
        end = pos_of(plan.todo[-1][0]) + 1
        present = {pos_of(item[0]) for item in written}
        for pos in range(stream.sealed_pos, end):
            if pos not in present and not stream.skipped(pos):
                stream.skip(pos, Skip.ABANDONED)
        leaves = chain.leaves_of(b"".join([item[0] for item in written]))
        return stream.seal_through(leaves, end)

    def insert(self, conn: psycopg.Connection[Any], record: DigestRecord) -> None:
        """Insert a digest in the open transaction (see `__init__` on conflicts)."""
        conn.execute(self._insert, chain_schema.digest_params(record))

    def insert_and_commit(self, conn: psycopg.Connection[Any], record: DigestRecord | None) -> None:
        """The digest's INSERT and the COMMIT in one round trip (pipelined), on the
        writer's own connection, which began the transaction itself. The hashes go as
        binary parameters: a batch's leaves are 32 bytes a row."""
        if record is None:
            conn.execute("COMMIT")
            return
        with conn.pipeline():
            conn.execute(self._insert, chain_schema.digest_params(record))
            conn.execute("COMMIT")

    def committed(self, stream: ChainStream, record: DigestRecord | None) -> None:
        """The transaction holding `record` committed: move its stream's head."""
        if record is None:
            return
        stream.committed(record)
        if stream is not self.live:
            key = stream.id.bytes
            left = {p: r for p, r in self._retired.get(key, {}).items() if p >= record.next_pos}
            if left:
                self._retired[key] = left
            else:
                self._retired.pop(key, None)

    # -- recorded gaps ----------------------------------------------------------------------

    def open_gaps(self) -> list[bytes]:
        """Streams with skipped positions no digest covers yet (rows dead-lettered at the
        end of a batch, or given up at close)."""
        out = [key for key, pending in self._retired.items() if pending]
        live = self.live
        if live is not None and live.pending_run() > live.sealed_pos:
            out.append(live.id.bytes)
        return out

    def seal_gap(
        self, conn: psycopg.Connection[Any], key: bytes
    ) -> tuple[ChainStream, DigestRecord | None]:
        """In the open transaction: the digest-only record covering the run of skipped
        positions at the stream's sealed end, and never further (a later position may
        still be written, by this writer's spool replay say)."""
        live = self.live
        if live is not None and key == live.id.bytes:
            stream = live
        else:
            stream = chain_schema.resume_stream(
                conn, self._schema, self._table, uuid.UUID(bytes=key)
            )
            pending = self._retired.get(key, {})
            stream.resync(stream.sealed_pos, stream.head_hash, max(pending, default=0) + 1)
            for pos, reason in pending.items():
                if pos >= stream.sealed_pos:
                    stream.skip(pos, Skip(reason))
        end = stream.pending_run()
        if end == stream.sealed_pos:
            if stream is not live:
                self._retired.pop(key, None)
            return stream, None
        return stream, stream.seal_through(b"", end)
