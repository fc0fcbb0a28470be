"""AuditWriter: the caller-facing queue, the drain loop, and flush/close/atexit/fork.

The caller's path (`log`) is a pid check, a cheap validity check, a timestamp, one tuple and
one `deque.append`: no I/O, no lock, no model, no uuid, no JSON unless metadata is given.
Everything else happens on one daemon thread per writer, which takes batches from the
queue, encodes them and hands them to the sink.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from psycopg_pool import ConnectionPool
from pydantic import ValidationError

from . import binary, ids, native
from . import otel as _otel
from .binary import Item
from .buffer import Buffer
from .connection import ConnectionSource, DsnSource, PoolSource
from .context import current as _current_context
from .dsn import Dsn
from .entry import COLUMNS, AuditEntry, InvalidEntry, Row, dump_metadata
from .replay import SpoolReplayer
from .schema import DEFAULT_SCHEMA, DEFAULT_TABLE
from .sink import CHUNK_ROWS, DATA, Sink, entry_view, make_items
from .spool import DEAD_LETTER_FILE, FsyncPolicy, Spool, SpoolFull
from .stats import WriterStats
from .watchdog import Watchdog

logger = logging.getLogger("auditq")

_getpid: Final = os.getpid
_FORKS: Final = native.FORKS
_time_ns: Final = time.time_ns
#: Rows per COPY transaction at most (`batch_size`): ~0.4 s of a 2-core server's work, so
#: the two round trips between COPYs (each a wait for the GIL under load) are rare.
DEFAULT_BATCH_SIZE: Final = 50_000
#: Queued entries that wake the writer before flush_interval (see `_wake_every`).
WAKE_ROWS: Final = 5_000

#: While its own spool is not empty and the database was failing, how often the writer tries
#: it again (seconds; capped by retry_backoff_max).
PROBE_SECONDS: Final = 1.0

#: Mapping keys accepted by `write()` besides the field names: the original TypeScript
#: service's camelCase spelling, so `write_audit_log({...})` payloads keep working.
_ALIASES: Final = {
    "tenantId": "tenant_id",
    "actorId": "actor_id",
    "actorType": "actor_type",
    "resourceType": "resource_type",
    "resourceId": "resource_id",
    "userAgent": "user_agent",
    "requestId": "request_id",
    "occurredAt": "occurred_at",
    "ipAddress": "ip",
}
_FIELDS: Final = frozenset(COLUMNS)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An accepted entry that will never be written, and why."""

    entry: dict[str, Any]
    reason: str
    at: datetime


DeadLetterHandler = Callable[[DeadLetter], None]


class AuditWriter:
    """Accepts audit entries without blocking and writes them to PostgreSQL in batches.

    `dsn_or_pool` is a connection string (its password never appears in logs, reprs or
    errors) or your own `psycopg_pool.ConnectionPool`; with None, `AUDITQ_DSN` then
    `DATABASE_URL` are read. Every option is keyword-only; the defaults suit a web worker.
    """

    def __init__(
        self,
        dsn_or_pool: str | ConnectionPool[Any] | None = None,
        *,
        table: str = DEFAULT_TABLE,
        schema: str = DEFAULT_SCHEMA,
        max_queue: int = 100_000,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval: float = 1.0,
        shutdown_timeout: float = 10.0,
        write_timeout: float = 15.0,
        connect_timeout: float = 5.0,
        retry_backoff_max: float = 5.0,
        warn_interval: float = 10.0,
        strict: bool = False,
        on_dead_letter: DeadLetterHandler | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_after: float = 5.0,
        spool_max_bytes: int = 1024**3,
        spool_fsync: FsyncPolicy = "interval",
        prefault_memory: bool = True,
        name: str | None = None,
    ) -> None:
        _positive("max_queue", max_queue)
        _positive("batch_size", batch_size)
        _positive("flush_interval", flush_interval)
        _positive("write_timeout", write_timeout)
        _positive("connect_timeout", connect_timeout)
        _positive("retry_backoff_max", retry_backoff_max)
        _positive("spool_max_bytes", spool_max_bytes)
        if spool_after < 0:
            raise ValueError("spool_after must be >= 0")
        if spool_fsync not in ("always", "interval", "never"):
            raise ValueError("spool_fsync must be 'always', 'interval' or 'never'")
        if shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")
        if not table or not schema:
            raise ValueError("table and schema must be non-empty")
        self.table = table
        self.schema = schema
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.shutdown_timeout = shutdown_timeout
        self.write_timeout = write_timeout
        self.connect_timeout = connect_timeout
        self.retry_backoff_max = retry_backoff_max
        self.warn_interval = warn_interval
        self.strict = strict
        self.on_dead_letter = on_dead_letter
        self.spool_dir = None if spool_dir is None else os.fspath(spool_dir)
        self.spool_after = spool_after
        self.spool_max_bytes = spool_max_bytes
        self.spool_fsync: FsyncPolicy = spool_fsync
        self.prefault_memory = prefault_memory
        self.name = name or f"{schema}.{table}"
        self._dsn: Dsn | None = None
        self._pool: ConnectionPool[Any] | None = None
        if isinstance(dsn_or_pool, ConnectionPool):
            self._pool = dsn_or_pool
            self._display_target = f"pool {dsn_or_pool.name!r}"
        else:
            raw = dsn_or_pool or os.environ.get("AUDITQ_DSN") or os.environ.get("DATABASE_URL")
            if not raw:
                raise ValueError(
                    "no database given: pass a DSN or pool, or set AUDITQ_DSN or DATABASE_URL"
                )
            self._display_target = str(Dsn(raw))
            self._dsn = Dsn(raw).with_defaults(
                connect_timeout=max(2, round(connect_timeout)),
                application_name="auditq",
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
        self._init_state()
        _live_writers.add(self)

    def _init_state(self) -> None:
        """Fresh runtime state: at construction and in a forked child."""
        # The process that owns this state. On the caller's path a fork is noticed by the
        # fork count (`native.FORKS`) instead, which also changes when a fork skipped
        # Python's at-fork hooks (uWSGI) and triggers the same reset.
        self._pid = _getpid()
        self._forks = _FORKS[0]
        # Wakes the writer thread early: a full batch, flush(), close().
        self._wake = threading.Event()
        # Callers wake the writer every this many entries (else it waits out flush_interval):
        # WAKE_ROWS, or a full batch or half the queue when either is smaller. The COPY it
        # then starts keeps taking rows while a backlog lasts, up to batch_size in all, so
        # it need not wait for a whole batch to queue up first while the server idles.
        self._wake_every = min(self.batch_size, max(1, self.max_queue // 2), WAKE_ROWS)
        self._buffer = Buffer(self.max_queue, self._wake_every, self._wake.set)
        # The deque itself, for log()'s inlined append.
        self._items = self._buffer.items
        # Guards every counter below and the move of rows out of the buffer; never held
        # across I/O, so callers that touch it (drops, rejections) never wait on the server.
        self._lock = threading.Lock()
        # flush() waiters sleep here until enough rows are resolved.
        self._resolved_cond = threading.Condition(self._lock)
        # Set by close() at its deadline: the sink stops retrying and hands rows back.
        self._abort = threading.Event()
        self._closed = False
        self._drain_all = False
        # Set by close() when the writer thread outlived its deadline (stuck connecting, say):
        # its in-flight rows were then counted as dead letters, and what the thread later
        # reports for them only corrects that count (or hands them to on_dead_letter).
        self._abandoned = False
        self._thread: threading.Thread | None = None
        self._taken = 0  # rows ever removed from the buffer (by the writer or close())
        self._inflight = 0  # taken but not yet resolved
        self._written = 0
        self._dead = 0
        self._unconfirmed = 0  # of those, rows whose commit was cut in flight at close()
        self._spooled = 0  # this writer's rows on disk, waiting for replay
        self._replayed = 0  # rows from other processes' spools that this writer wrote
        self._replay_dead = 0  # ... and those it dead-lettered
        self._dropped = 0
        self._rejected = 0
        self._batches = 0
        self._retries = 0
        self._last_error: str | None = None
        self._last_write_at: datetime | None = None
        # Rate-limited reporting: counts since the last line and when it was written.
        self._unreported_drops = 0
        self._unreported_rejects = 0
        self._last_reject_reason = ""
        self._unreported_dead = 0
        self._last_dead_reason = ""
        self._last_report = float("-inf")
        # Dead letters the dead-letter file had no room for, since the last report.
        self._unfiled_letters = 0
        self._watchdog = Watchdog(f"auditq-watchdog[{self.name}]")
        source: ConnectionSource
        if self._pool is not None:
            source = PoolSource(self._pool, timeout=self.connect_timeout)
        else:
            assert self._dsn is not None
            source = DsnSource(self._dsn)
        self._source = source
        # The disk spool (None when spool_dir is not set); the writer thread appends to it
        # during long outages and replays it once the database answers again.
        self._spool = (
            None
            if self.spool_dir is None
            else Spool(self.spool_dir, max_bytes=self.spool_max_bytes, fsync=self.spool_fsync)
        )
        # Replays the spool once the database answers again (None without a spool); made
        # again with the spool, so a forked child keeps none of the parent's progress.
        self._replayer = None if self._spool is None else SpoolReplayer(self, self._spool)
        # When the writer may next probe the database while it is spooling through an
        # outage (monotonic seconds); replays wait for it too.
        self._next_probe = 0.0
        self._sink = Sink(
            source,
            schema=self.schema,
            table=self.table,
            ledger=self,
            abort=self._abort,
            watchdog=self._watchdog,
            dsn=self._dsn,
            write_timeout=self.write_timeout,
            retry_backoff_max=self.retry_backoff_max,
        )
        self._bind_caller_path()

    def _bind_caller_path(self) -> None:
        """log() for the common call in C, as an instance attribute that shadows the method
        below; the method stays the reference and takes every other call (see _caller.c).
        Not for a subclass that overrides log(), nor without the extension. It copies the
        queue, max_queue and the wake-up count: made again whenever those change."""
        self.__dict__.pop("log", None)
        if native.speedups is not None and type(self).log is AuditWriter.log:
            self.__dict__["log"] = native.speedups.CallerPath(
                self,
                AuditWriter.log,
                self._items,
                self._wake.set,
                dump_metadata,
                _current_context,
                _otel,
                self.max_queue,
                self._wake_every,
            )

    # -- the caller's path -------------------------------------------------------------

    def log(
        self,
        action: str,
        /,
        *,
        tenant_id: Any = None,
        actor_id: Any = None,
        actor_type: Any = None,
        resource_type: Any = None,
        resource_id: Any = None,
        outcome: Any = None,
        ip: Any = None,
        user_agent: Any = None,
        request_id: Any = None,
        metadata: Mapping[str, Any] | None = None,
        occurred_at: datetime | None = None,
        id: Any = None,
    ) -> bool:
        """Queue one entry; True if accepted. Never blocks, never raises (unless strict)."""
        if self._forks != _FORKS[0]:  # a forked child: os.getpid() costs a system call
            self._after_fork()
        if type(action) is not str or not action:
            return self._reject(f"action must be a non-empty string, got {action!r:.80}")
        bound = _current_context.get()
        if bound is not None:
            if tenant_id is None:
                tenant_id = bound[0]
            if actor_id is None:
                actor_id = bound[1]
            if actor_type is None:
                actor_type = bound[2]
            if request_id is None:
                request_id = bound[3]
            if ip is None:
                ip = bound[4]
            if user_agent is None:
                user_agent = bound[5]
        if _otel.enabled:  # opentelemetry-api installed: add the active span's ids
            metadata = _otel.with_trace(metadata)
        if self.strict:
            return self._offer_validated(
                {
                    "action": action,
                    "tenant_id": tenant_id,
                    "actor_id": actor_id,
                    "actor_type": actor_type,
                    "resource_type": resource_type,
                    "resource_id": resource_id,
                    "outcome": outcome,
                    "ip": ip,
                    "user_agent": user_agent,
                    "request_id": request_id,
                    "metadata": metadata,
                    "occurred_at": occurred_at,
                    "id": id,
                }
            )
        # Buffer.offer, inlined: on this path each saved call is ~5% of the cost. The bound
        # is checked first so that an overloaded caller does not serialise what it drops.
        items = self._items
        size = len(items)
        if size >= self.max_queue or self._closed:
            return self._refuse()
        if metadata is not None:
            try:
                metadata = dump_metadata(metadata)  # type: ignore[assignment]
            except ValueError as exc:
                return self._reject(str(exc))
        items.append(
            (
                id,
                _time_ns() if occurred_at is None else occurred_at,
                action,
                tenant_id,
                actor_id,
                actor_type,
                resource_type,
                resource_id,
                outcome,
                ip,
                user_agent,
                request_id,
                metadata,
            )
        )
        if not (size + 1) % self._wake_every:
            self._wake.set()
        if self._thread is None:
            self._start()
        return True

    def write(self, entry: AuditEntry | Mapping[str, Any]) -> bool:
        """Queue an `AuditEntry` (already validated) or a mapping of its fields."""
        if isinstance(entry, AuditEntry):
            if self._pid != _getpid():
                self._after_fork()
            return self._offer(entry.to_row())
        if not isinstance(entry, Mapping):
            return self._reject(f"expected an AuditEntry or a mapping, got {type(entry).__name__}")
        fields = {_ALIASES.get(key, key): value for key, value in entry.items()}
        unknown = set(fields) - _FIELDS
        if unknown:
            return self._reject(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        action = fields.pop("action", None)
        return self.log(action, **fields)

    def write_many(self, entries: Iterable[AuditEntry | Mapping[str, Any]]) -> int:
        """Queue each entry; returns how many were accepted."""
        accepted = 0
        for entry in entries:
            accepted += self.write(entry)
        return accepted

    def _offer_validated(self, fields: dict[str, Any]) -> bool:
        present = {k: v for k, v in fields.items() if v is not None}
        try:
            entry = AuditEntry(**present)
        except ValidationError as exc:
            return self._reject(f"invalid entry: {exc}")
        return self._offer(entry.to_row())

    def _offer(self, row: Row) -> bool:
        if self._closed or not self._buffer.offer(row):
            return self._refuse()
        if self._thread is None:
            self._start()
        return True

    def _refuse(self) -> bool:
        """Count a call the queue could not take: closed (rejected) or full (dropped)."""
        if self._closed:
            return self._reject("the writer is closed", invalid=False)
        with self._lock:
            self._dropped += 1
            self._unreported_drops += 1
        return False

    def _reject(self, reason: str, *, invalid: bool = True) -> bool:
        with self._lock:
            self._rejected += 1
            self._unreported_rejects += 1
            self._last_reject_reason = reason
        if self.strict and invalid:
            raise InvalidEntry(reason)
        if self._thread is None and not self._closed:
            self._start()  # the writer thread is the one that reports rejections
        return False

    # -- flush, close, stats -----------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything accepted before this call is written, dead-lettered or
        spooled; False if `timeout` seconds pass first (None waits as long as it takes)."""
        if self._pid != _getpid():
            self._after_fork()
        if threading.current_thread() is self._thread:
            return False  # called from a dead-letter callback: waiting would deadlock
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._thread is None and self._spool is not None and not self._closed:
            self._start()  # its first wake-up replays what earlier processes left spooled
        with self._lock:
            target = self._taken + len(self._buffer)
            if self._resolved() >= target:
                return True
            self._drain_all = True
        self._wake.set()
        if self._thread is None:
            self._start()
        with self._resolved_cond:
            while self._resolved() < target:
                if deadline is None:
                    self._resolved_cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._resolved_cond.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting, drain within `timeout` (default `shutdown_timeout`), stop the
        thread. Entries still unwritten at the deadline are dead-lettered. True when every
        accepted entry was resolved in time. Idempotent."""
        if self._pid != _getpid():
            self._after_fork()
        timeout = self.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            self._closed = True
            self._drain_all = True
        self._wake.set()
        thread = self._thread
        if thread is None or not thread.is_alive():
            # No thread to drain (never started, or interpreter shutdown forbade it): drain
            # here, bounded by the same deadline.
            self._sink.deadline = deadline
            self._drain(drain_all=True)
        elif thread is not threading.current_thread():
            # Keep a slice of the budget to interrupt a hung operation and account for it.
            margin = min(0.25, timeout * 0.2)
            thread.join(max(0.0, deadline - margin - time.monotonic()))
            if thread.is_alive():
                self._abort.set()
                self._wake.set()
                self._watchdog.fire_now()
                thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                with self._lock:
                    self._abandoned = True
                    stuck, self._inflight = self._inflight, 0
                    self._dead += stuck
                    self._unreported_dead += stuck
                    if stuck:
                        self._last_dead_reason = "not written before close() timed out"
                    self._resolved_cond.notify_all()
        with self._lock:
            leftovers = self._buffer.take_all()
            self._taken += len(leftovers)
            self._inflight += len(leftovers)
        if leftovers:
            items, bad = make_items(leftovers)
            self.dead_rows(bad)
            self._give_up(items)
        if thread is None or not thread.is_alive():
            self._release_resources()
        self._report(final=True)
        with self._lock:
            return not self._abort.is_set() and self._inflight == 0 and len(self._buffer) == 0

    def stats(self) -> WriterStats:
        """A consistent snapshot of this writer's counters (see `WriterStats`)."""
        if self._pid != _getpid():
            self._after_fork()
        with self._lock:
            queued = len(self._buffer)
            return WriterStats(
                accepted=self._taken + queued,
                written=self._written,
                dropped_overflow=self._dropped,
                rejected=self._rejected,
                dead_lettered=self._dead,
                spooled=self._spooled,
                pending=self._inflight + queued,
                batches=self._batches,
                retries=self._retries,
                last_error=self._last_error,
                last_write_at=self._last_write_at,
                replayed=self._replayed,
                replay_dead_lettered=self._replay_dead,
                unconfirmed=self._unconfirmed,
            )

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        target = self._display_target
        state = "closed" if self._closed else "open"
        return (
            f"<AuditWriter {self.name!r} {state} target={target!r} "
            f"pending={len(self._buffer) + self._inflight}>"
        )

    # -- the Ledger the sink reports to ------------------------------------------------

    def committed(self, count: int) -> None:
        with self._lock:
            self._written += count
            if self._abandoned_report():
                self._dead -= count  # close() wrote these off, but they did commit
            else:
                self._inflight -= count
            self._batches += 1
            self._last_write_at = datetime.now(UTC)
            self._resolved_cond.notify_all()

    def dead(self, items: Sequence[Item], reason: str) -> None:
        self.dead_rows([(entry_view(item), reason) for item in items])

    def dead_rows(self, rows: Sequence[tuple[Row | dict[str, Any], str]]) -> None:
        """Resolve in-flight rows as dead letters, each with its reason."""
        if not rows:
            return
        with self._lock:
            if not self._abandoned_report():  # else close() has counted them already
                self._dead += len(rows)
                self._inflight -= len(rows)
                self._unreported_dead += len(rows)
            self._last_dead_reason = rows[-1][1]
            self._resolved_cond.notify_all()
        self._publish_dead_letters(rows)
        if threading.current_thread() is not self._thread:
            self._report()

    def _publish_dead_letters(self, rows: Sequence[tuple[Row | dict[str, Any], str]]) -> None:
        """Hand dead letters to the dead-letter file and the callback (never raises)."""
        now = datetime.now(UTC)
        letters = [
            DeadLetter(row if isinstance(row, dict) else binary.describe_row(row), reason, now)
            for row, reason in rows
        ]
        if self._spool is not None:
            records = [
                {"entry": d.entry, "reason": d.reason, "at": d.at.isoformat()} for d in letters
            ]
            try:
                kept = self._spool.write_dead_letters(records)
            except OSError:
                logger.exception("could not append to the dead-letter file")
            else:
                if kept < len(records):  # no room left in the file: said by _report()
                    with self._lock:
                        self._unfiled_letters += len(records) - kept
        handler = self.on_dead_letter
        if handler is not None:
            for letter in letters:
                try:
                    handler(letter)
                except Exception:
                    logger.exception("on_dead_letter callback failed")

    def rejected_rows(self, rows: Sequence[tuple[Row, str]]) -> None:
        """Rows that failed their checks on the writer side: dead letters, with reasons."""
        self.dead_rows(rows)

    def retrying(self, error: str) -> None:
        with self._lock:
            self._retries += 1
            self._last_error = error

    def _abandoned_report(self) -> bool:
        """True for a report from a writer thread that close() gave up on (lock held)."""
        return self._abandoned and threading.current_thread() is self._thread

    # -- the writer thread -------------------------------------------------------------

    def _resolved(self) -> int:
        return self._taken - self._inflight

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            if self.prefault_memory:
                # While the server is stopped the queue only grows, into fresh memory; see
                # native.prefault_arenas for why callers should not fault it in page by page.
                native.prefault_arenas()
            thread = threading.Thread(
                target=_run, args=(weakref.ref(self),), name=f"auditq[{self.name}]", daemon=True
            )
            self._thread = thread
        try:
            thread.start()
        except RuntimeError:
            # Interpreter shutdown forbids new threads; close() then drains inline.
            with self._lock:
                self._thread = None

    def _step(self) -> bool:
        """One wake-up of the writer thread; False when it should exit."""
        woken = self._wake.wait(self.flush_interval)
        self._wake.clear()
        with self._lock:
            drain_all = self._drain_all or not woken or self._closed
            self._drain_all = False
        self._drain(drain_all)
        self._spool_upkeep()
        self._report()
        with self._lock:
            return not (self._closed and len(self._buffer) == 0) and not self._abort.is_set()

    def _drain(self, drain_all: bool) -> None:
        """Write batches until the queue is empty (or below a full batch)."""
        while not self._abort.is_set():
            with self._lock:
                if not drain_all and len(self._buffer) < self._wake_every:
                    return
                rows = self._buffer.take(self.batch_size)
                if not rows:
                    return
                self._taken += len(rows)
                self._inflight += len(rows)
            self._deliver(rows)

    # -- delivery, spooling and replay (writer thread) ----------------------------------

    def _deliver(self, rows: list[Row]) -> None:
        """Write one batch. With a spool: a write that keeps failing for `spool_after` (or
        while the queue fills up, or at close) is diverted to disk; while this writer's own
        spool is not empty and the database was failing a moment ago, batches go straight to
        disk without waiting on it again; once it may be back, the spool is replayed before
        this batch is written (yielding to the queue only when that fills up)."""
        replayer = self._replayer
        if (
            replayer is not None
            and self._spooled
            and self._sink.outage_seconds() > 0
            and (
                self._closed or time.monotonic() < self._next_probe or replayer.replay() == "failed"
            )
        ):
            items, bad = make_items(rows)
            self.dead_rows(bad)
            self._to_spool(items)
            return
        handed = self._sink.deliver_rows(
            rows, divert=self._should_divert, more=self._follow_on(len(rows))
        )
        if handed.why == "divert":
            self._probe_later()
            self._to_spool(handed.items)
        elif handed.items:
            self._give_up(handed.items, unconfirmed=handed.unconfirmed)

    def _follow_on(self, taken: int) -> Callable[[], list[Row]]:
        """More rows for the COPY under way, up to `batch_size` rows in all, while at least
        a chunk of them is queued: a backlog streams through one COPY, but a trickle does
        not keep a COPY (and its transaction) open. Nothing once close() is cutting the
        writer short: what is still queued is then close()'s to account for."""
        budget = self.batch_size - taken

        def more() -> list[Row]:
            nonlocal budget
            want = min(CHUNK_ROWS, budget)
            with self._lock:
                if want <= 0 or len(self._buffer) < want or self._sink.stopping():
                    return []
                rows = self._buffer.take(want)
                self._taken += want
                self._inflight += want
            budget -= want
            return rows

        return more

    def _probe_later(self) -> None:
        self._next_probe = time.monotonic() + min(self.retry_backoff_max, PROBE_SECONDS)

    def _spool_upkeep(self) -> None:
        """At each wake-up of the writer thread: replay spooled segments once the database
        may be back (see `SpoolReplayer.due`), and fsync what the "interval" policy left
        unsynced. A closing writer replays nothing: what it spooled stays for the next
        writer."""
        spool, replayer = self._spool, self._replayer
        if spool is None or replayer is None:
            return
        if not self._closed and replayer.due():
            replayer.replay()
        try:
            spool.sync(due_only=True)
        except OSError:
            logger.exception("could not fsync the spool")

    def _should_divert(self) -> bool:
        """After a failed attempt (and during its backoff): stop retrying and spool? Only
        with a spool, and when the outage has lasted `spool_after`, the queue is half
        full, or the writer is closing."""
        if self._spool is None:
            return False
        return (
            self._closed
            or self._sink.outage_seconds() >= self.spool_after
            or len(self._buffer) >= self.max_queue // 2
        )

    def _to_spool(self, items: list[Item]) -> None:
        """Move in-flight rows to the spool (or, when it is full, to the dead letters)."""
        assert self._spool is not None
        if not items:
            return
        try:
            self._spool.append([item[DATA] for item in items])
        except (SpoolFull, OSError) as exc:
            self.dead(
                items,
                f"not written: the database is unavailable and the spool refused them ({exc})",
            )
            return
        with self._lock:
            if self._abandoned_report():
                self._dead -= len(items)  # close() wrote these off, but they are on disk
            else:
                self._inflight -= len(items)
            self._spooled += len(items)
            self._resolved_cond.notify_all()

    def _give_up(self, items: list[Item], *, unconfirmed: int = 0) -> None:
        """Rows close() could not get written in time: spool them if possible, else dead.
        The first `unconfirmed` had their commit cut in flight and may be in the table."""
        if not items:
            return
        if self._spool is not None:
            self._to_spool(items)  # a replay dedupes, so rows that did commit stay single
            return
        if unconfirmed:
            with self._lock:
                self._unconfirmed += unconfirmed
            self.dead(
                items[:unconfirmed],
                "close() timed out while the commit was in flight: the outcome is unknown,"
                " so this row may also be in the table",
            )
        if items[unconfirmed:]:
            self.dead(
                items[unconfirmed:],
                "not written before close() timed out"
                + (f" (last error: {self._last_error})" if self._last_error else ""),
            )

    def replay_spool(self, timeout: float | None = None) -> bool:
        """Replay every spooled segment no live writer holds, now, in the calling thread,
        retrying a failing database with backoff until `timeout` (`auditq spool replay`).
        For a writer whose thread is not running (a running one replays by itself). True
        when nothing is left that this writer could take."""
        replayer = self._replayer
        if replayer is None:
            raise ValueError("this writer has no spool_dir")
        thread = self._thread
        if thread is not None and thread.is_alive():
            raise RuntimeError("the writer thread is running: it replays the spool itself")
        deadline = None if timeout is None else time.monotonic() + timeout
        self._sink.deadline = deadline
        try:
            return replayer.replay(deadline, retry=True) == "done"
        finally:
            self._sink.deadline = None

    def _report(self, *, final: bool = False) -> None:
        """Rate-limited warnings for drops, rejections and dead letters (writer side);
        `final` (close()) says what is left whatever the interval, so nothing goes unsaid."""
        now = time.monotonic()
        with self._lock:
            if not final and now - self._last_report < self.warn_interval:
                return
            drops, self._unreported_drops = self._unreported_drops, 0
            rejects, self._unreported_rejects = self._unreported_rejects, 0
            dead, self._unreported_dead = self._unreported_dead, 0
            unfiled, self._unfiled_letters = self._unfiled_letters, 0
            if drops or rejects or dead or unfiled:
                self._last_report = now
        if drops:
            logger.warning(
                "queue full (max_queue=%d): dropped %d entries since the last report",
                self.max_queue,
                drops,
            )
        if rejects:
            logger.warning(
                "rejected %d invalid entries since the last report; last reason: %s",
                rejects,
                self._scrub(self._last_reject_reason),
            )
        if dead:
            logger.error(
                "dead-lettered %d entries since the last report; last reason: %s",
                dead,
                self._scrub(self._last_dead_reason),
            )
        if unfiled:
            logger.error(
                "%s in %s reached spool_max_bytes=%d: %d dead letters since the last report "
                "were not written to it (they are counted in stats() and passed to "
                "on_dead_letter); move the file aside to make room",
                DEAD_LETTER_FILE,
                self.spool_dir,
                self.spool_max_bytes,
                unfiled,
            )

    def _release_resources(self) -> None:
        self._watchdog.close()
        self._source.close()
        if self._spool is not None:
            self._spool.close()

    def _scrub(self, text: str) -> str:
        return self._dsn.scrub(text) if self._dsn is not None else text

    # -- fork --------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: start empty, with a new thread and connection, lazily.

        The parent still owns (and will write) everything queued before the fork.
        """
        self._forks = _FORKS[0]
        if self._pid == _getpid():
            return
        ids.reseed()  # uWSGI forks without the hooks: the id stream must still differ
        self._source.forget_after_fork()
        if self._spool is not None:
            self._spool.forget_after_fork()
        closed = self._closed
        self._init_state()
        self._closed = closed


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _run(ref: weakref.ref[AuditWriter]) -> None:
    # Holds the writer only while working, so an abandoned writer can be collected; a loop
    # step that fails is logged and the loop goes on, so one surprise never strands the queue.
    writer = ref()
    if writer is not None:
        try:
            writer._sink.warm_up()
        except Exception:  # e.g. no thread for the watchdog now: the first batch retries
            logger.exception("writer warm-up failed (continuing)")
    del writer
    while True:
        writer = ref()
        if writer is None:
            return
        try:
            if not writer._step():
                writer._release_resources()
                return
        except Exception:
            logger.exception("writer loop error (continuing)")
            time.sleep(0.1)
        finally:
            del writer


# Every live writer, for the exit drain and the fork reset; weak so it never keeps one alive.
_live_writers: weakref.WeakSet[AuditWriter] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for writer in list(_live_writers):
        if not writer.closed and writer._pid == _getpid():
            try:
                writer.close(writer.shutdown_timeout)
            except Exception:
                logger.exception("exit drain failed")


def _reset_all_after_fork() -> None:
    for writer in list(_live_writers):
        writer._after_fork()


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_reset_all_after_fork)
