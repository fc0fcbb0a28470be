"""PostgreSQL delivery of one batch: COPY, retries, idempotent replay, poison-row isolation.

`Sink.deliver()` does not return until every row of the batch is resolved: committed, or
dead-lettered with a reason, or (when the writer is closing past its deadline) handed back
as undelivered. The fast path is one transaction holding one binary COPY. The slow paths:

* transient failure (connection lost, server restarting, lock/serialisation trouble, the
  watchdog cutting a hung operation): reconnect and retry the same rows, with backoff;
* commit outcome unknown (connection lost while COMMIT was in flight): replay through a
  temporary staging table and `INSERT ... ON CONFLICT (id) DO NOTHING`, so rows that did
  commit are not written twice;
* the server rejects the data: split the batch in halves until each bad row stands alone
  (O(k log n) round trips for k bad rows), write every good row, dead-letter each bad one
  with the server's message;
* the table is missing or not writable: one clear error naming the fix, then quiet retries.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple, Protocol

import psycopg
from psycopg import sql

from . import chainlink, partitions, pqcopy
from .backoff import Backoff
from .binary import (
    COPY_COLUMNS,
    HEADER,
    NULL,
    TRAILER,
    Item,
    encode_block,
    encode_chunk,
    item_id,
    items_of_block,
    origin_field,
)
from .buffer import PIECE_ROWS, release
from .chain import ChainStream, DigestRecord, Skip
from .chainlink import Chainer, Plan
from .connection import Connection, ConnectionSource, session_timeouts
from .dsn import Dsn
from .entry import Row
from .ledger import RowReport
from .redact import DETAIL_MARK, escape_controls
from .routes import ROUTE_FAILURES, Routes
from .tables import check_version, qualified
from .watchdog import Watchdog

logger = logging.getLogger("auditq")

Mode = Literal["copy", "replay", "dedupe"]
Kind = Literal[
    "transient", "ambiguous", "data", "duplicate", "config", "partition", "route", "cancelled"
]

#: SQLSTATE classes whose errors are about the rows, not the connection or the server.
_DATA_CLASSES: Final = frozenset({"22", "23"})
#: SQLSTATEs that mean the table is not there or not writable: retrying will not help soon.
_CONFIG_STATES: Final = frozenset(
    {"42P01", "42703", "42501", "3F000", "0A000", "42804", "42P10", "3D000", "28000", "28P01"}
)
#: What libpq says when it cannot log in (its connection errors carry no SQLSTATE): the
#: server's FATAL message, matched on its English text, with the fix to name.
_LOGIN_FAILURES: Final = (
    ("password authentication failed", "check the user and password in the DSN"),
    ('role "', "check the user in the DSN: that role does not exist"),
    ("no pg_hba.conf entry", "allow this client in the server's pg_hba.conf"),
    ('database "', "check the database name in the DSN"),
    ("permission denied for database", "grant CONNECT on the database to this role"),
)
#: Configuration errors (a login refused, a missing table or grant) are retried at this
#: many times the backoff cap: they will not clear until someone acts, so the writer
#: keeps its entries and waits without hammering the server or the log.
_CONFIG_PACE: Final = 6
#: The server cancelled the statement (its `statement_timeout`, or an operator's cancel).
_CANCELLED: Final = "57014"
#: After this many batches in a row written whole under a row cap, the cap doubles.
_CAP_GROWTH_AFTER: Final = 4
#: What `_describe` keeps of a server's message (log lines and `last_error`).
_MESSAGE_CHARS: Final = 500

#: Unclassified server errors are retried this often before the rows are blamed and split.
MAX_UNKNOWN_ATTEMPTS: Final = 3


#: `Item`, a row on its way: (binary COPY tuple, the queued Row or None when it came back
#: from the spool). A plain tuple, not a class: the C encoder makes it and takes it out of
#: the garbage collector's sight, so batches of them do not lengthen collections, which
#: stop the callers too.
DATA: Final = 0
ROW: Final = 1
#: One `encode_block` result: (the bytes sent, the rows they encode). A first attempt keeps
#: only these; each row gets an Item of its own only when the attempt fails.
Block = tuple[bytes, list[Row]]
#: Rows joined into one `write()` of a COPY: the server starts on them while the next
#: chunk is joined, instead of waiting for the whole batch.
CHUNK_ROWS: Final = 1000
#: How often a backoff wait asks the writer whether to spool instead (seconds).
_DIVERT_POLL: Final = 0.05


class WriterLedger(RowReport, Protocol):
    """The writer's ledger also takes rows that failed their checks before COPY."""

    def rejected_rows(self, rows: Sequence[tuple[Row, str]]) -> None: ...


#: Why `deliver()` handed rows back: the writer is closing past its deadline, or it asked
#: for them (to spool them during an outage).
Handback = Literal["", "abort", "divert"]


class Handed(NamedTuple):
    """What `deliver()` could not resolve, and why (`why` is "" when `items` is empty)."""

    items: list[Item]
    why: Handback
    #: How many of `items`, at the front, were waiting for an idempotent replay when the
    #: writer aborted: their commit was cut in flight, so they may be in the table.
    unconfirmed: int = 0


_DONE: Final = Handed([], "")


class Sink:
    """Writes batches to one table through a `ConnectionSource`."""

    def __init__(
        self,
        source: ConnectionSource,
        *,
        schema: str,
        table: str,
        ledger: WriterLedger,
        abort: threading.Event,
        watchdog: Watchdog,
        dsn: Dsn | None,
        write_timeout: float,
        retry_backoff_max: float,
        origin: str | None = None,
        chain: bool = False,
    ) -> None:
        self._source = source
        # The hash chain (docs/tamper-evidence.md): with `chain`, new rows are stamped and
        # each COPY transaction commits their digest; stamped rows (from a spool, say) are
        # written with their digests whatever `chain` says.
        self._chainer = Chainer(schema, table, enabled=chain)
        # The writer's own session bounds (see connection.session_timeouts): set at connect
        # time on its own connections, per transaction on borrowed ones.
        source.bound_session(write_timeout)
        self._local_timeouts = source.per_transaction_timeouts
        settings = sql.SQL(", ").join(
            sql.SQL("set_config({}, {}, true)").format(sql.Literal(name), sql.Literal(str(ms)))
            for name, ms in session_timeouts(write_timeout).items()
            if name != "idle_session_timeout"  # meaningless within a transaction
        )
        self._set_timeouts = sql.SQL("SELECT {}").format(settings)
        # Rows per COPY while the server keeps cancelling large ones (None: no cap). Halved
        # at each cancel, doubled again after _CAP_GROWTH_AFTER whole batches.
        self.row_cap: int | None = None
        self._capped_successes = 0
        # The writer's origin (AU-3 "where"), encoded once: every row ends with these bytes.
        self._origin = origin_field(origin)
        self._ledger = ledger
        # Set by close() past its deadline: stop retrying and hand rows back.
        self._abort = abort
        self._watchdog = watchdog
        self._dsn = dsn
        self._write_timeout = write_timeout
        self._backoff = Backoff(cap=retry_backoff_max)
        # True while the failures are configuration errors: retried at a slower pace.
        self._config_pace = False
        #: A monotonic time after which to stop retrying (close() draining inline).
        self.deadline: float | None = None
        # When the current run of failures began (monotonic), for one warning per outage.
        self._outage_since: float | None = None
        self._outage_retries = 0
        self._config_error_logged = False
        # True once COMMIT may be in flight: a failure after it leaves the outcome unknown.
        self._committing = False
        self._schema, self._table = schema, table
        target = qualified(schema, table)
        columns = sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS))
        chained = sql.SQL(", ").join(map(sql.Identifier, chainlink.CHAINED_COLUMNS))
        self._copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(target, columns)
        # A partitioned table's batches go straight into their month's partition (with the
        # chain, the first attempt's rows are stamped: the chained columns).
        self._routes = Routes(schema, table, chained if chain else columns)
        # True while the attempt under way is a routed COPY (see `auditq.routes`).
        self._routed = False
        self._copy_chained = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            target, chained
        )
        # The idempotent replay's statements, for plain and for stamped rows (two more
        # columns: a staging table of their own, as one made before the chain columns
        # existed would lack them).
        self._create_staging, self._copy_staging, self._merge = _replay_statements(
            schema, table, columns, ""
        )
        self._create_staging_chained, self._copy_staging_chained, self._merge_chained = (
            _replay_statements(schema, table, chained, "_c")
        )

    def deliver(
        self,
        items: list[Item],
        *,
        mode: Mode = "copy",
        divert: Callable[[], bool] | None = None,
        ledger: RowReport | None = None,
        failed: Exception | None = None,
    ) -> Handed:
        """Write `items`, reporting to `ledger` (default: the writer's). Returns the rows
        handed back unresolved, and why: the writer is aborting, or `divert()` said so
        after a failed attempt (the writer then spools them). `failed` is the error of a
        first attempt already made (by `deliver_rows`)."""
        chained = self._chainer.enabled or any(chainlink.is_chained(i[DATA]) for i in items)
        handed = self._deliver(items, mode, divert, ledger or self._ledger, failed, chained)
        if chained:
            if handed.items:
                self._chainer.retire(handed.items)
            else:
                self.seal_gaps()
        return handed

    def _deliver(
        self,
        items: list[Item],
        mode: Mode,
        divert: Callable[[], bool] | None,
        report: RowReport,
        failed: Exception | None,
        chained: bool,
    ) -> Handed:
        work: list[tuple[list[Item], Mode, int]] = []
        if failed is None:
            # Chained rows are written a stream at a time, in position order.
            parts = chainlink.group(items) if chained else [items]
            work.extend(
                reversed([(part, mode, 0) for whole in parts for part in self._capped(whole)])
            )
        else:
            kind = self._classify(failed, 0)
            if self._on_failure(items, mode, 0, kind, failed, work, report) and (
                self._pause(divert)
            ):
                return Handed([item for chunk, _, _ in work for item in chunk], "divert")
        while work:
            batch, mode, attempts = work.pop()
            if self.stopping():
                # Rows waiting for an idempotent replay may have committed already (their
                # commit was cut in flight): they go first, counted apart.
                pending = [(batch, mode), *((chunk, m) for chunk, m, _ in work)]
                unsure = [item for chunk, m in pending if m == "replay" for item in chunk]
                sure = [item for chunk, m in pending if m != "replay" for item in chunk]
                return Handed(unsure + sure, "abort", len(unsure))
            try:
                inserted = self._attempt(batch, mode)
            except Exception as exc:
                kind = self._classify(exc, attempts)
                if self._on_failure(batch, mode, attempts, kind, exc, work, report) and (
                    self._pause(divert)
                ):
                    return Handed([item for chunk, _, _ in work for item in chunk], "divert")
                continue
            self._recovered()
            self._grow_cap(len(batch))
            if isinstance(inserted, Written):
                report.committed(inserted.rows)
                if inserted.duplicates:
                    report.dead(
                        inserted.duplicates, "duplicate id: a row with this id is already stored"
                    )
                if inserted.sealed:
                    report.dead(
                        inserted.sealed,
                        "chain position already sealed as skipped: the rest of its stream "
                        "was replayed first",
                    )
            elif inserted is None or mode == "replay":
                report.committed(len(batch))
            else:
                written = [item for item in batch if item_id(item) in inserted]
                duplicates = [item for item in batch if item_id(item) not in inserted]
                report.committed(len(written))
                if duplicates:
                    report.dead(duplicates, "duplicate id: a row with this id is already stored")
        return _DONE

    def deliver_rows(
        self,
        rows: list[Row],
        *,
        divert: Callable[[], bool] | None = None,
        more: Callable[[], list[Row]] | None = None,
    ) -> Handed:
        """Encode and write queued rows. The first attempt encodes chunk by chunk inside
        the COPY, so the server ingests one chunk while the next is encoded; rows that fail
        their checks are dead-lettered; retries reuse what was encoded.

        `more()`, when given, is asked for further rows once `rows` are sent, and they join
        the same COPY until it returns none: under a backlog one COPY carries many chunks
        instead of ending (and leaving the server idle for two round trips) and starting
        again."""
        rows = list(rows)  # rows taken by more() are added to this copy
        blocks: list[Block] = []
        leaves: list[bytes] = []  # with the chain: the stamped rows' leaves, in order
        bad: list[tuple[Row, str]] = []
        consumed = [0]  # rows the first attempt has encoded so far
        error: Exception | None = None
        cap = self.row_cap
        # Over the cap, the first attempt is skipped: deliver() writes the rows cap by cap.
        attempted = not self.stopping() and (cap is None or len(rows) <= cap)
        if attempted:
            try:
                self._attempt_rows(rows, blocks, bad, consumed, more, leaves)
            except Exception as exc:
                error = exc
        # Rows that failed their checks are reported once the rest of the batch is resolved,
        # not before: flush() counts resolved rows, and a batch's rejects resolved early
        # would let it return while rows queued before it are still in flight.
        if attempted and error is None:
            self._recovered()
            self._grow_cap(len(rows))
            written = sum(len(kept) for _, kept in blocks)
            if written:
                self._ledger.committed(written)
            if bad:
                self._ledger.rejected_rows(bad)
            return _DONE
        # Failed, or not attempted (closing past the deadline): from here on each row is an
        # Item of its own, as retries, splits and dead letters need.
        items = [item for block in blocks for item in items_of_block(*block)]
        if consumed[0] < len(rows):
            self._encode(rows[consumed[0] :], items, bad)
        try:
            return self.deliver(items, divert=divert, failed=error)
        finally:
            release(items)  # what was handed back is in the Handed's own list
            if bad:
                self._ledger.rejected_rows(bad)

    def _attempt_rows(
        self,
        rows: list[Row],
        blocks: list[Block],
        bad: list[tuple[Row, str]],
        consumed: list[int],
        more: Callable[[], list[Row]] | None,
        leaves: list[bytes],
    ) -> None:
        chainer = self._chainer
        stamping = chainer.enabled

        def block(chunk: Sequence[Row]) -> bytes:
            # All or nothing: if encode_block raises, none of the chunk is in `blocks` or
            # `bad`, and `consumed` leaves it to be encoded again on the failure path.
            kept: list[Row] = []
            rejected: list[tuple[Row, str]] = []
            data = encode_block(chunk, kept, rejected, self._origin)
            if stamping and data:
                # Numbered once, here: every retry, split, spool record and dead letter
                # carries these positions.
                data, leaf = chainer.stamp(data)
                leaves.append(leaf)
            blocks.append((data, kept))
            bad.extend(rejected)
            return data

        def encoded_chunks() -> Iterator[bytes]:
            initial = len(rows)
            for start in range(0, initial, CHUNK_ROWS):
                chunk = rows[start : start + CHUNK_ROWS]
                data = block(chunk)
                consumed[0] = start + len(chunk)
                if data:
                    yield data
            # Rows taken by more() join `rows` first, so a failed attempt finds each of them
            # in `blocks`, in `bad` or past `consumed`, like the others.
            while more is not None and not self._at_cap(len(rows)) and (extra := more()):
                rows.extend(extra)
                data = block(extra)
                consumed[0] = len(rows)
                if data:
                    yield data

        self._committing = False
        self._routed = False
        with self._connection() as conn:
            chunks = encoded_chunks()
            first = next(chunks, None)
            if first is None:
                return  # every row was refused by the encoder: nothing to send
            routes = self._routes
            statement = routes.copy_for(first)
            if statement is None and routes.due():
                try:
                    routes.load(conn)
                except psycopg.OperationalError:
                    raise  # the connection: the COPY's failure path handles it
                except psycopg.Error:
                    # Routing is a shortcut: a list it cannot read sends the batch through
                    # the parent, and the routes rest before the next try.
                    routes.failed()
                    if not conn.autocommit:
                        conn.rollback()
                statement = routes.copy_for(first)
            self._routed = statement is not None
            rest = itertools.chain((first,), chunks)
            if not stamping:
                self._copy_chunks(conn, rest, statement or self._copy)
                return

            def copy() -> DigestRecord | None:
                self._stream(conn, statement or self._copy_chained, rest)
                return chainer.seal_live(leaves)

            record = self._chained_transaction(conn, copy)
        if chainer.live is not None:
            chainer.committed(chainer.live, record)

    def make_items(self, rows: Sequence[Row]) -> tuple[list[Item], list[tuple[Row, str]]]:
        """`make_items` with this sink's origin (and, with the chain, stamped)."""
        items: list[Item] = []
        bad: list[tuple[Row, str]] = []
        self._encode(rows, items, bad)
        return items, bad

    def _encode(self, rows: Sequence[Row], items: list[Item], bad: list[tuple[Row, str]]) -> None:
        """Encode rows into Items (stamped with the chain), a piece at a time."""
        if not self._chainer.enabled:
            _encode_pieces(rows, items, bad, self._origin)
            return
        for start in range(0, len(rows), PIECE_ROWS):
            kept: list[Row] = []
            data = encode_block(rows[start : start + PIECE_ROWS], kept, bad, self._origin)
            if data:
                data, _leaves = self._chainer.stamp(data)
                items.extend(items_of_block(data, kept))

    def handed_off(self, items: list[Item]) -> None:
        """`items` left the sink for the spool: their stream is continued by its replay."""
        self._chainer.retire(items)

    def abandoned(self, items: list[Item]) -> None:
        """`items` were given up on (dead-lettered at close, or refused by a full spool):
        their positions are recorded as skipped (Skip.ABANDONED), in a digest with no rows
        when the database answers now, else by the next write of their stream."""
        self._chainer.skip(items, Skip.ABANDONED)
        self._chainer.retire(items)
        if self.outage_seconds() == 0:
            self.seal_gaps()

    def seal_gaps(self) -> None:
        """Commit digests with no rows for the skipped positions at the end of streams
        (rows dead-lettered after the last row written): a gap is recorded, never silent.
        One try each; what fails stays pending for the next batch of the stream."""
        for key in self._chainer.open_gaps():
            self._committing = False
            try:
                with self._connection() as conn:
                    sealed: list[ChainStream] = []

                    def gap(
                        conn: Connection = conn,
                        key: bytes = key,
                        sealed: list[ChainStream] = sealed,
                    ) -> DigestRecord | None:
                        stream, record = self._chainer.seal_gap(conn, key)
                        sealed.append(stream)
                        return record

                    record = self._chained_transaction(conn, gap)
                self._chainer.committed(sealed[0], record)
            except Exception as exc:
                logger.warning(
                    "could not record the chain positions of dead-lettered rows (%s); "
                    "the next write of their stream records them",
                    self._describe(exc),
                )
                return

    def warm_up(self) -> None:
        """Get ready for the first batch while it is still filling up: open the writer's
        own connection and start the watchdog thread. Under load each of the connection's
        round trips costs the writer thread a wait for the GIL (up to the 5 ms switch
        interval, longer with several busy callers): made at the first batch, that setup
        would keep the server idle while the queue fills (about 0.2 s with 4 busy callers)."""
        self._watchdog.start()
        self._source.warm_up()
        try:
            with self._connection() as conn:
                behind = check_version(conn, self._schema, self._table, missing_ok=True)
                with contextlib.suppress(psycopg.Error):  # the first batch tries again
                    self._routes.load(conn)
        except psycopg.Error:
            return  # down: the first batch reports it
        if behind is not None:
            # Entries keep queueing (and are retried, or spooled) meanwhile: nothing is lost.
            logger.warning("%s", behind)

    def probe(self) -> bool:
        """One cheap round trip: is the database answering again?"""
        try:
            with self._connection() as conn:
                conn.execute("SELECT 1")
                conn.rollback()
        except Exception:
            return False
        return True

    def outage_seconds(self) -> float:
        """How long writes have been failing (0 when they are not)."""
        since = self._outage_since
        return 0.0 if since is None else time.monotonic() - since

    # -- one attempt ---------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """A connection for one operation, bounded by the watchdog; given back broken or not."""
        conn = self._source.acquire()
        broken = False
        try:
            self._watchdog.arm(conn.pgconn.socket, self._write_timeout)
            try:
                yield conn
            finally:
                self._watchdog.disarm()
        except BaseException:
            broken = conn.closed or conn.broken
            raise
        finally:
            self._source.release(conn, broken=broken)

    def _attempt(self, batch: list[Item], mode: Mode) -> set[Any] | Written | None:
        self._committing = False
        self._routed = False  # a retry goes through the parent
        with self._connection() as conn:
            if batch and chainlink.is_chained(batch[0][DATA]):
                return self._attempt_chained(conn, batch, mode)
            if mode == "copy":
                self._copy_chunks(conn, _chunks(batch), self._copy)
                return None
            return self._merge_rows(conn, batch)

    def _copy_chunks(
        self, conn: Connection, chunks: Iterable[bytes], statement: sql.Composed
    ) -> None:
        if conn.autocommit and not self._local_timeouts:
            # The writer's own connection: a lone COPY is its own transaction and commits
            # when the server acknowledges the end of the data. That saves the BEGIN and
            # COMMIT round trips, and each round trip costs the writer a wait for the GIL
            # (up to the 5 ms switch interval) while callers keep it busy.
            self._stream(conn, statement, chunks, ends_transaction=True)
            return
        with conn.transaction():  # a pooled connection, left in the mode its pool gave
            if self._local_timeouts:
                conn.execute(self._set_timeouts)
            self._stream(conn, statement, chunks)
            # From here the transaction's exit sends COMMIT: a lost connection now leaves
            # the outcome unknown, and the retry must not write these rows twice.
            self._committing = True

    def _chained_transaction(
        self, conn: Connection, body: Callable[[], DigestRecord | None]
    ) -> DigestRecord | None:
        """Run `body` (the COPY, returning the digest to commit with it) in a transaction
        that also inserts the digest: rows and digest commit together or not at all.

        On the writer's own connection (autocommit) the transaction is begun by hand and
        ends with the digest's INSERT and the COMMIT pipelined, one round trip; a pooled
        connection uses its own transaction handling. Either way a failure once
        COMMIT may be in flight leaves the outcome unknown (`_committing`), and the replay
        then reconciles the stream with the digests table (`Chainer.plan`)."""
        if conn.autocommit and not self._local_timeouts:
            conn.execute("BEGIN")
            try:
                record = body()
                self._committing = True
                self._chainer.insert_and_commit(conn, record)
            except BaseException:
                _roll_back(conn)
                raise
            return record
        with conn.transaction():
            if self._local_timeouts:
                conn.execute(self._set_timeouts)
            record = body()
            if record is not None:
                self._chainer.insert(conn, record)
            self._committing = True
        return record

    def _attempt_chained(self, conn: Connection, batch: list[Item], mode: Mode) -> Written:
        """Write one stream's rows (position order) with their digest. In `replay` and
        `dedupe` mode the rows go through the staging table's merge, and a row another row's
        id keeps out is skipped (Skip.DUPLICATE_ID) and dead-lettered."""
        chainer = self._chainer
        plans: list[Plan] = []
        outcome = Written()

        def write() -> DigestRecord | None:
            plan = chainer.plan(conn, batch, reconcile=mode != "copy")
            plans.append(plan)
            written, duplicates = plan.todo, []
            if plan.todo and mode == "copy":
                self._stream(conn, self._copy_chained, _chunks(plan.todo))
            elif plan.todo:
                conn.execute(self._create_staging_chained)
                self._stream(conn, self._copy_staging_chained, _chunks(plan.todo))
                inserted = self._merged_ids(conn, self._merge_chained)
                written = [item for item in plan.todo if item_id(item) in inserted]
                duplicates = [item for item in plan.todo if item_id(item) not in inserted]
            outcome.duplicates = duplicates
            outcome.sealed = plan.sealed
            # Rows an earlier attempt committed (the stream's head covers them, and the
            # table holds them) count as written.
            outcome.rows = len(written) + len(plan.done)
            return chainer.seal(plan, written, duplicates)

        record = self._chained_transaction(conn, write)
        chainer.committed(plans[-1].stream, record)
        return outcome

    def _merged_ids(self, conn: Connection, merge: sql.Composed) -> set[Any]:
        with conn.cursor() as cur:
            cur.execute(merge)
            inserted: set[Any] = set()
            while found := cur.fetchmany(PIECE_ROWS):
                inserted.update(row[0].int for row in found)
        return inserted

    def _merge_rows(self, conn: Connection, batch: list[Item]) -> set[Any]:
        with conn.transaction():
            if self._local_timeouts:
                conn.execute(self._set_timeouts)
            conn.execute(self._create_staging)
            self._stream(conn, self._copy_staging, _chunks(batch))
            with conn.cursor() as cur:
                cur.execute(self._merge)
                # Loaded a piece at a time: one fetchall() of a whole batch's ids is one
                # long hold of the GIL (see `buffer.release`).
                inserted: set[Any] = set()
                while found := cur.fetchmany(PIECE_ROWS):
                    inserted.update(row[0].int for row in found)
            self._committing = True
        return inserted

    def _stream(
        self,
        conn: Connection,
        statement: sql.Composed,
        chunks: Iterable[bytes],
        *,
        ends_transaction: bool = False,
    ) -> None:
        if pqcopy.available():
            # Through libpq from C (see `auditq.pqcopy`): the writer waits for the GIL at
            # the COPY's start, its end and a high water only, not after each piece's
            # flush; behind busy threads each such wait lasts up to the switch interval
            # while the server idles.
            def ended() -> None:
                # The end of the data is out; in autocommit that commits, so a lost
                # connection from here on leaves the outcome unknown.
                self._committing = ends_transaction

            pqcopy.copy(conn, statement.as_bytes(conn), _framed(chunks), on_end=ended)
            return
        with conn.cursor() as cur, cur.copy(statement) as copy:
            write = copy.write
            write(HEADER)
            for chunk in chunks:
                write(chunk)
            write(TRAILER)
            # The block's exit sends the end of the data; in autocommit that commits, so
            # a lost connection from here on leaves the outcome unknown.
            self._committing = ends_transaction

    # -- failures ------------------------------------------------------------------------

    def _classify(self, exc: BaseException, attempts: int) -> Kind:
        state = getattr(exc, "sqlstate", None)
        if self._routed and state in ROUTE_FAILURES and (state != "23514" or _no_partition(exc)):
            # The route's fault (see `auditq.routes`), not the rows' nor the server's.
            return "route"
        if state == "23505":
            return "duplicate"
        if state == "23514" and _no_partition(exc):
            # Not a bad row: the whole COPY failed because a month has no partition yet.
            return "partition"
        if state == _CANCELLED:
            return "cancelled"
        if state and state[:2] in _DATA_CLASSES:
            return "data"
        if state in _CONFIG_STATES or (state is None and _login_fix(exc) is not None):
            return "config"
        if isinstance(exc, psycopg.OperationalError) or state is None:
            return "ambiguous" if self._committing else "transient"
        if state[:2] in {"08", "40", "53", "55", "57", "58"}:
            return "transient"
        # An unclassified server error: retry a few times, then suspect the rows.
        return "data" if attempts + 1 >= MAX_UNKNOWN_ATTEMPTS else "transient"

    def _on_failure(
        self,
        batch: list[Item],
        mode: Mode,
        attempts: int,
        kind: Kind,
        exc: BaseException,
        work: list[tuple[list[Item], Mode, int]],
        report: RowReport,
    ) -> bool:
        """Queue what to try next; True when that is a retry of the same rows."""
        message = self._describe(exc)
        if kind == "cancelled" and len(batch) > 1:
            # Too big to write within the server's time limit: smaller batches, no blame.
            # Still a failure like any other (backoff, and the spool may take the rows): a
            # server that cancels every size is in trouble, not busy.
            self._shrink_cap(len(batch), message)
            for part in reversed(self._capped(batch)):
                work.append((part, mode, attempts))
            report.retrying(message)
            self._enter_outage(kind, message)
            return True
        if kind == "data":
            if len(batch) == 1:
                report.dead(batch, self._dead_reason(exc, message))
                self._chainer.skip(batch, Skip.DEAD_LETTER)
            else:
                half = len(batch) // 2
                work.append((batch[half:], mode, 0))
                work.append((batch[:half], mode, 0))
            return False
        if kind == "route":
            self._routes.failed()
            work.append((batch, mode, attempts))  # at once, through the parent
            return False
        if kind == "duplicate":
            work.append((batch, "replay" if mode == "replay" else "dedupe", attempts))
            return False
        if kind == "partition":
            try:
                self._create_months(batch)
            except Exception as ensure_exc:
                # Retried with backoff, like a missing table, until someone fixes it.
                message = f"{message}; creating it failed: {self._describe(ensure_exc)}"
                kind = "config"
            else:
                if attempts + 1 < MAX_UNKNOWN_ATTEMPTS:
                    work.append((batch, mode, attempts + 1))
                    return False
                # Created, yet still refused: back off rather than spin.
        report.retrying(message)
        self._enter_outage(kind, message)
        next_mode: Mode = "replay" if kind == "ambiguous" or mode == "replay" else mode
        work.append((batch, next_mode, attempts + 1))
        return True

    def _create_months(self, batch: list[Item]) -> None:
        """Create the partitions the batch's rows need (see `auditq.partitions`)."""
        months = partitions.months_of(item[DATA] for item in batch)
        with self._connection() as conn:
            partitions.ensure_months(conn, self._schema, self._table, months)

    def _pause(self, divert: Callable[[], bool] | None = None) -> bool:
        """Back off before a retry; close() cuts the wait short. True (at once, or as soon
        as it turns so during the wait) when `divert()` asks to hand the rows back instead:
        the queue may fill up while the writer waits, and that must not wait for the
        backoff to end."""
        if divert is not None and divert():
            return True
        delay = self._backoff.next_delay()
        if self._config_pace:
            delay = max(delay, self._backoff.cap * _CONFIG_PACE * 0.5)
        if self.deadline is not None:
            delay = max(0.0, min(delay, self.deadline - time.monotonic()))
        if divert is None:
            self._abort.wait(delay)
            return False
        end = time.monotonic() + delay
        while (remaining := end - time.monotonic()) > 0:
            if self._abort.wait(min(remaining, _DIVERT_POLL)):
                return False
            if divert():
                return True
        return False

    def stopping(self) -> bool:
        """True once close() is aborting or the inline drain's deadline has passed."""
        return self._abort.is_set() or (
            self.deadline is not None and time.monotonic() >= self.deadline
        )

    def _describe(self, exc: BaseException) -> str:
        """What log lines and `last_error` say of a failure: the SQLSTATE and the server's
        primary message, control characters escaped (a newline in a value must not forge a
        log line) and cut. Never the DETAIL: "Failing row contains (...)" is the row itself,
        emails and addresses included; it goes to the dead letters only."""
        state = getattr(exc, "sqlstate", None)
        diag = getattr(exc, "diag", None)
        primary = getattr(diag, "message_primary", None) if state else None
        text = str(primary or exc).strip() or type(exc).__name__
        if len(text) > _MESSAGE_CHARS:
            text = text[:_MESSAGE_CHARS] + "..."
        text = escape_controls(text)
        text = f"{type(exc).__name__}: {text}" if not state else f"[{state}] {text}"
        return self._dsn.scrub(text) if self._dsn is not None else text

    def _dead_reason(self, exc: BaseException, message: str) -> str:
        """A rejected row's dead-letter reason: the summary, then the server's DETAIL after
        DETAIL_MARK (the dead-letter file is private; `loggable()` cuts it off for logs)."""
        reason = f"rejected by the server: {message}"
        diag = getattr(exc, "diag", None)
        detail = getattr(diag, "message_detail", None)
        if detail:
            detail = escape_controls(str(detail))
            reason += DETAIL_MARK + (self._dsn.scrub(detail) if self._dsn else detail)
        return reason

    # -- row cap (the server cancelling large batches) -------------------------------------

    def _capped(self, items: list[Item]) -> list[list[Item]]:
        cap = self.row_cap
        if cap is None or len(items) <= cap:
            return [items]
        return [items[i : i + cap] for i in range(0, len(items), cap)]

    def _at_cap(self, rows: int) -> bool:
        return self.row_cap is not None and rows >= self.row_cap

    def _shrink_cap(self, rows: int, message: str) -> None:
        cap = max(1, rows // 2)
        self._capped_successes = 0
        if self.row_cap is None or cap < self.row_cap:
            self.row_cap = cap
            logger.warning(
                "the server cancelled a write of %d rows (%s); writing at most %d rows "
                "per statement for now (raise the role's statement_timeout or lower "
                "batch_size)",
                rows,
                message,
                cap,
            )

    def _grow_cap(self, rows: int) -> None:
        cap = self.row_cap
        if cap is None or rows < cap:
            return
        self._capped_successes += 1
        if self._capped_successes >= _CAP_GROWTH_AFTER:
            self._capped_successes = 0
            self.row_cap = cap * 2

    def _enter_outage(self, kind: Kind, message: str) -> None:
        self._outage_retries += 1
        if kind == "config" and not self._config_error_logged:
            self._config_error_logged = True
            login = _login_fix(message)
            fix = (
                login
                if login is not None
                else "create it with `auditq init-db` (or auditq.schema.create()) and grant "
                "INSERT to this role"
            )
            logger.error(
                "cannot write to the audit table (%s): %s. Entries are kept (queued, or "
                "spooled) and retried every so often until this is fixed.",
                message,
                fix,
            )
        self._config_pace = kind == "config"
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            if kind != "config":
                logger.warning(
                    "database write failed (%s); retrying with backoff, entries keep "
                    "queueing up to max_queue",
                    message,
                )

    def _recovered(self) -> None:
        self._backoff.reset()
        self._config_pace = False
        if self._outage_since is not None:
            logger.info(
                "database writes recovered after %.1fs (%d retries)",
                time.monotonic() - self._outage_since,
                self._outage_retries,
            )
            self._outage_since = None
            self._outage_retries = 0
            self._config_error_logged = False


@dataclass
class Written:
    """What a chained attempt wrote: rows written (or found committed), and the rows
    another row's id kept out."""

    rows: int = 0
    duplicates: list[Item] = field(default_factory=list)
    #: Rows whose positions a digest had already sealed as skipped (see `Plan`).
    sealed: list[Item] = field(default_factory=list)


def _roll_back(conn: Connection) -> None:
    """End a transaction begun by hand that failed, so the connection is usable again (a
    lost one is given back broken anyway)."""
    if conn.closed or conn.broken:
        return
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error:
        pass


def _login_fix(exc_or_text: BaseException | str) -> str | None:
    """The fix for a refused login (connection errors carry no SQLSTATE), else None."""
    text = str(exc_or_text)
    if isinstance(exc_or_text, BaseException) and "FATAL" not in text:
        return None
    for phrase, fix in _LOGIN_FAILURES:
        if phrase in text and (phrase != 'database "' or "does not exist" in text):
            return fix
    return None


def _no_partition(exc: BaseException) -> bool:
    """SQLSTATE 23514 without a constraint: "no partition of relation ... found for row"
    (a CHECK constraint's violation names its constraint), whatever the server's language."""
    diag = getattr(exc, "diag", None)
    return diag is not None and diag.constraint_name is None


def _framed(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """A binary COPY stream: the header, the tuples, the trailer."""
    yield HEADER
    yield from chunks
    yield TRAILER


def _replay_statements(
    schema: str, table: str, columns: sql.Composable, suffix: str
) -> tuple[sql.Composed, sql.Composed, sql.Composed]:
    """The replay's staging table (created), the COPY into it, and the merge into the table
    that inserts only the rows whose id is not stored yet."""
    target = qualified(schema, table)
    # In pg_temp by name: resolved through search_path, a table of the same name in a
    # schema listed before pg_temp (`search_path = public, pg_temp`, a common hardening)
    # would receive the rows, and whatever was planted in it would be merged.
    staging = sql.Identifier(
        "pg_temp", f"auditq_staging_{zlib.crc32(f'{schema}.{table}'.encode()):08x}{suffix}"
    )
    create = sql.SQL(
        "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    ).format(staging, target)
    copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(staging, columns)
    # No conflict target: a partitioned table's key is (id, occurred_at), a distributed
    # one's starts with tenant_id; any of them names the same stored row.
    merge = sql.SQL(
        "INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT DO NOTHING RETURNING id"
    ).format(target, columns, columns, staging)
    return create, copy, merge


def _chunks(batch: list[Item]) -> Iterator[bytes]:
    """Already encoded rows, joined CHUNK_ROWS at a time."""
    for start in range(0, len(batch), CHUNK_ROWS):
        yield b"".join([item[DATA] for item in batch[start : start + CHUNK_ROWS]])


def make_items(
    rows: Sequence[Row], origin: bytes = NULL
) -> tuple[list[Item], list[tuple[Row, str]]]:
    """Encode `rows` (with the pre-encoded `origin` field, `binary.origin_field`), splitting
    off those that fail their checks, with the reason."""
    items: list[Item] = []
    bad: list[tuple[Row, str]] = []
    _encode_pieces(rows, items, bad, origin)
    return items, bad


def _encode_pieces(
    rows: Sequence[Row], items: list[Item], bad: list[tuple[Row, str]], origin: bytes
) -> None:
    """`encode_chunk` PIECE_ROWS rows per call: one call over a whole batch would hold the
    GIL for all of it (see `buffer.release`)."""
    for start in range(0, len(rows), PIECE_ROWS):
        encode_chunk(rows[start : start + PIECE_ROWS], items, bad, origin)
