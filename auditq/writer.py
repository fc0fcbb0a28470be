"""AuditWriter: the facade callers use, and the writer's lifecycle (its thread, flush, close,
the exit hook, fork).

The caller's path (`log`) is a fork check, a cheap validity check, a timestamp, one tuple and
one append to the buffer: no I/O, no lock, no model, no uuid, no JSON unless metadata is
given (the C extension takes the common call, `_caller.c`). Everything else happens on one
daemon thread per writer, whose work on each batch is `delivery.py`'s; every outcome of a
row is counted by `ledger.py`.

    writer -> delivery -> sink / replay / spool -> ledger -> buffer, entry, binary, stats
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
import types
import weakref
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Final, Never

from psycopg_pool import ConnectionPool
from pydantic import ValidationError

from . import forks, ids, native, readiness
from . import otel as _otel
from .buffer import Buffer, Gate
from .config import (
    CHAIN_DEFAULT,
    DEFAULT_BATCH_SIZE,
    OPTION_NAMES,
    FsyncPolicy,
    OptionView,
    WriterOptions,
    check_options,
    unknown_option_message,
)
from .connection import (
    ConnectionSource,
    DsnSource,
    PoolSource,
    pool_conninfo,
    resolve_target,
)
from .context import current as _current_context
from .delivery import Delivery
from .dsn import Dsn
from .entry import AuditEntry, InvalidEntry, Row, dump_metadata, mapping_fields
from .hooks import BeforeWrite
from .ledger import DeadLetter, DeadLetterHandler, Ledger
from .readiness import CheckResult
from .sink import Sink
from .spool import DEAD_LETTER_FILE, Spool, spool_target
from .stats import WriterStats
from .tables import DEFAULT_SCHEMA, DEFAULT_TABLE
from .watchdog import Watchdog

__all__ = ["AuditWriter", "DeadLetter", "DeadLetterHandler", "live_writers"]

logger = logging.getLogger("auditq")

_time_ns: Final = time.time_ns


class AuditWriter:
    """Accepts audit entries without blocking and writes them to PostgreSQL in batches.

    The target is a connection string (`dsn`, or the first positional argument; its password
    never appears in logs, reprs or errors) or your own `psycopg_pool.ConnectionPool`
    (`pool`); with neither, `AUDITQ_DSN` then `DATABASE_URL` are read. Every option is
    keyword-only; the defaults suit a web worker.
    """

    table = OptionView[str]()
    schema = OptionView[str]()
    max_queue = OptionView[int]()
    batch_size = OptionView[int]()
    wake_rows = OptionView[int | None]()
    flush_interval = OptionView[float]()
    shutdown_timeout = OptionView[float]()
    write_timeout = OptionView[float]()
    connect_timeout = OptionView[float]()
    retry_backoff_max = OptionView[float]()
    warn_interval = OptionView[float]()
    spool_dir = OptionView[str | None]()
    spool_after = OptionView[float]()
    spool_max_bytes = OptionView[int]()
    spool_fsync = OptionView[FsyncPolicy]()
    chain = OptionView[bool]()

    def __init__(
        self,
        dsn_or_pool: str | Dsn | ConnectionPool[Any] | None = None,
        /,
        *,
        dsn: str | Dsn | None = None,
        pool: ConnectionPool[Any] | None = None,
        table: str = DEFAULT_TABLE,
        schema: str = DEFAULT_SCHEMA,
        max_queue: int = 100_000,
        batch_size: int = DEFAULT_BATCH_SIZE,
        wake_rows: int | None = None,
        flush_interval: float = 1.0,
        shutdown_timeout: float = 10.0,
        write_timeout: float = 15.0,
        connect_timeout: float = 5.0,
        retry_backoff_max: float = 5.0,
        warn_interval: float = 10.0,
        strict: bool = False,
        on_dead_letter: DeadLetterHandler | None = None,
        before_write: BeforeWrite | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_after: float = 5.0,
        spool_max_bytes: int = 1024**3,
        spool_fsync: FsyncPolicy = "interval",
        chain: bool = CHAIN_DEFAULT,
        origin: str | None = None,
        name: str | None = None,
        **unknown: Never,
    ) -> None:
        if unknown:
            raise TypeError(unknown_option_message(sorted(unknown)[0]))
        given = locals()
        self._options = check_options({name: given[name] for name in OPTION_NAMES})
        self._dsn, self._pool = resolve_target(
            dsn_or_pool, dsn, pool, self._options.connect_timeout
        )
        self._display_target = (
            f"pool {self._pool.name!r}" if self._pool is not None else str(self._dsn)
        )
        self._init_state()
        forks.reset_in_child(self._after_fork)
        _live_writers.add(self)

    def _init_state(self) -> None:
        """Fresh runtime state: at construction and in a forked child."""
        options = self._options
        self._mark = forks.ForkMark()
        # Wakes the writer thread early: a full batch, flush(), close().
        self._wake = threading.Event()
        self._gate = Gate()
        self._buffer = Buffer(options.max_queue, options.wake_every, self._wake.set)
        # Guards the thread's start and `_drain_all`; never held across I/O.
        self._lock = threading.Lock()
        # Set by flush() and close(): the next wake-up drains everything, not only full
        # batches.
        self._drain_all = False
        # Set by close() at its deadline: the sink stops retrying and hands rows back.
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog = Watchdog(f"auditq-watchdog[{self.name}]")
        source: ConnectionSource
        if self._pool is not None:
            source = PoolSource(self._pool, timeout=options.connect_timeout)
        else:
            assert self._dsn is not None
            source = DsnSource(self._dsn)
        self._source = source
        # The disk spool (None when spool_dir is not set), which also files dead letters.
        self._spool = (
            None
            if options.spool_dir is None
            else Spool(
                options.spool_dir,
                max_bytes=options.spool_max_bytes,
                fsync=options.spool_fsync,
                # Segments name the database and table they belong to: another writer's
                # spool directory never gets its rows replayed into this table.
                target=spool_target(
                    options.schema,
                    options.table,
                    self._dsn if self._dsn is not None else pool_conninfo(self._pool),
                ),
            )
        )
        self._ledger = Ledger(
            self._buffer,
            warn_interval=options.warn_interval,
            on_dead_letter=options.on_dead_letter,
            letter_file=self._spool,
            origin=options.origin_or_default,
            letter_file_note=f"{DEAD_LETTER_FILE} in {options.spool_dir} reached "
            f"spool_max_bytes={options.spool_max_bytes}",
            scrub=self._scrub,
        )
        self._sink = Sink(
            source,
            schema=options.schema,
            table=options.table,
            ledger=self._ledger,
            abort=self._abort,
            watchdog=self._watchdog,
            dsn=self._dsn,
            write_timeout=options.write_timeout,
            retry_backoff_max=options.retry_backoff_max,
            origin=options.origin_or_default,
            chain=options.chain,
        )
        self._delivery = Delivery(
            self._buffer,
            self._ledger,
            self._sink,
            self._spool,
            batch_size=options.batch_size,
            spool_after=options.spool_after,
            retry_backoff_max=options.retry_backoff_max,
            abort=self._abort,
            before_write=options.before_write,
        )
        self._bind_caller_path()

    def _bind_caller_path(self) -> None:
        """log() for the common call in C, as an instance attribute that shadows the method
        below; the method stays the reference and takes every other call (see _caller.c).
        Not for a subclass that overrides log(), nor for a strict writer, nor without the
        extension."""
        self.__dict__.pop("log", None)
        if native.speedups is None or type(self).log is not AuditWriter.log or self.strict:
            return
        self.__dict__["log"] = native.speedups.CallerPath(
            types.MethodType(AuditWriter.log, self),
            self._buffer.items,
            self._buffer.wake,
            self._gate,
            self._refuse,
            self._reject,
            self._start,
            dump_metadata,
            _current_context,
            _otel,
            self._buffer.max_queue,
            self._buffer.wake_rows,
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
        **unknown: Never,
    ) -> bool:
        """Queue one audit entry; True if accepted. Never blocks, never raises (unless the
        writer is strict).

        `action` (what happened, e.g. "invoice.paid") is required; the other fields are
        keywords: tenant_id, actor_id, actor_type, resource_type, resource_id, outcome,
        ip, user_agent, request_id, metadata (a JSON object, snapshotted now),
        occurred_at (default: now) and id (default: a UUIDv7 made on the writer thread).
        Fields bound with `auditq.context()` fill those left out. An unknown keyword is a
        rejection (counted, reported; `InvalidEntry` when strict), like any invalid entry.
        """
        if self._mark.forked():
            self._after_fork()
        if type(action) is not str or not action:
            return self._reject(f"action must be a non-empty string, got {action!r:.80}", action)
        if unknown:
            return self._reject(f"unknown field(s): {', '.join(sorted(unknown))}", action)
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
        # The bound is checked before the metadata is serialised, so that an overloaded
        # caller does not serialise what it drops.
        if self._gate.closed or len(self._buffer) >= self._buffer.max_queue:
            return self._refuse()
        if metadata is not None:
            try:
                metadata = dump_metadata(metadata)  # type: ignore[assignment]
            except ValueError as exc:
                return self._reject(str(exc), action)
        return self._offer(
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

    def write(self, entry: AuditEntry | Mapping[str, Any]) -> bool:
        """Queue an `AuditEntry` (already validated) or a mapping of its fields."""
        if isinstance(entry, AuditEntry):
            if self._mark.forked():
                self._after_fork()
            return self._offer(entry.to_row())
        if not isinstance(entry, Mapping):
            return self._reject(f"expected an AuditEntry or a mapping, got {type(entry).__name__}")
        fields, problem = mapping_fields(entry)
        if problem is not None:
            return self._reject(problem, fields.get("action"))
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
            return self._reject(f"invalid entry: {exc}", fields.get("action"))
        return self._offer(entry.to_row())

    def _offer(self, row: Row) -> bool:
        if self._gate.closed or not self._buffer.offer(row):
            return self._refuse()
        if not self._gate.started:
            self._start()
        return True

    def _refuse(self) -> bool:
        """Count a call the queue could not take: closed (rejected) or full (dropped)."""
        if self._gate.closed:
            return self._reject("the writer is closed", invalid=False)
        self._ledger.dropped()
        return False

    def _reject(self, reason: str, action: Any = None, *, invalid: bool = True) -> bool:
        self._ledger.rejected(reason, action)
        if self.strict and invalid:
            raise InvalidEntry(reason)
        if not self._gate.started and not self._gate.closed:
            self._start()  # the writer thread is the one that reports rejections
        return False

    # -- flush, close, stats -----------------------------------------------------------

    async def aflush(self, timeout: float | None = None) -> bool:
        """`flush()` for asyncio code: waits in a worker thread, never on the event loop."""
        return await asyncio.to_thread(self.flush, timeout)

    async def aclose(self, timeout: float | None = None) -> bool:
        """`close()` for asyncio code: waits in a worker thread, never on the event loop."""
        return await asyncio.to_thread(self.close, timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything accepted before this call is written, dead-lettered or
        spooled; False if `timeout` seconds pass first (None waits as long as it takes)."""
        if self._mark.forked():
            self._after_fork()
        if threading.current_thread() is self._thread:
            return False  # called from a dead-letter callback: waiting would deadlock
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._thread is None and self._spool is not None and not self._gate.closed:
            self._start()  # its first wake-up replays what earlier processes left spooled
        target = self._ledger.target()
        if self._ledger.wait_resolved(target, time.monotonic()):
            return True
        with self._lock:
            self._drain_all = True
        self._wake.set()
        if self._thread is None:
            self._start()
        return self._ledger.wait_resolved(target, deadline)

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting, drain within `timeout` (default `shutdown_timeout`), stop the
        thread. Entries still unwritten at the deadline are dead-lettered (or spooled, with
        a spool). True when every accepted entry was resolved in time. Idempotent."""
        if self._mark.forked():
            self._after_fork()
        timeout = self.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            self._gate.closed = True
            self._delivery.closing = True
            self._drain_all = True
        self._wake.set()
        thread = self._thread
        if thread is None or not thread.is_alive():
            # No thread to drain (never started, or interpreter shutdown forbade it): drain
            # here, bounded by the same deadline.
            self._delivery.drain_until(deadline)
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
                self._ledger.abandon()
        self._delivery.give_up_queued()
        if thread is None or not thread.is_alive():
            self._release_resources()
        self._ledger.report(final=True)
        return not self._abort.is_set() and self._ledger.settled()

    def replay_spool(self, timeout: float | None = None) -> bool:
        """Replay every spooled segment no live writer holds, now, in the calling thread,
        retrying a failing database with backoff until `timeout` (`auditq spool replay`).
        For a writer whose thread is not running (a running one replays by itself). True
        when nothing is left that this writer could take."""
        if self._spool is None:
            raise ValueError("this writer has no spool_dir")
        thread = self._thread
        if thread is not None and thread.is_alive():
            raise RuntimeError("the writer thread is running: it replays the spool itself")
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._delivery.replay_spool(deadline)

    def check(self) -> CheckResult:
        """Is the database ready for this writer (connection, table, columns, INSERT and
        what the replay needs)? For a deploy's health check: it connects (or borrows a pool
        connection) on the calling thread, so call it at start-up, not per request."""
        options = self._options
        if self._pool is not None:
            with self._pool.connection(timeout=options.connect_timeout) as conn:
                return readiness.check(conn, schema=options.schema, table=options.table)
        assert self._dsn is not None
        return readiness.check(
            self._dsn,
            schema=options.schema,
            table=options.table,
            connect_timeout=max(1, round(options.connect_timeout)),
        )

    def stats(self) -> WriterStats:
        """A consistent snapshot of this writer's counters (see `WriterStats`)."""
        if self._mark.forked():
            self._after_fork()
        return self._ledger.snapshot()

    @property
    def options(self) -> WriterOptions:
        """The checked options this writer was made with."""
        return self._options

    @property
    def strict(self) -> bool:
        """Validate every call through `AuditEntry` and raise `InvalidEntry` (tests,
        development). May be switched on a live writer."""
        return self._options.strict

    @strict.setter
    def strict(self, value: bool) -> None:
        self._options = check_options({**self._options.given(), "strict": value})
        self._bind_caller_path()  # a strict writer takes every call in Python

    @property
    def on_dead_letter(self) -> DeadLetterHandler | None:
        """Called on the writer thread with each `DeadLetter`. May be replaced on a live
        writer."""
        return self._options.on_dead_letter

    @on_dead_letter.setter
    def on_dead_letter(self, handler: DeadLetterHandler | None) -> None:
        self._options = check_options({**self._options.given(), "on_dead_letter": handler})
        self._ledger.on_dead_letter = handler

    @property
    def name(self) -> str:
        """The writer's name in thread names, metrics labels and reports."""
        return self._options.display_name

    @property
    def origin(self) -> str:
        """Where this writer's events occur (the `origin` column): service and host."""
        return self._options.origin_or_default

    @property
    def closed(self) -> bool:
        return self._gate.closed

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._gate.closed else "open"
        return (
            f"<AuditWriter {self.name!r} {state} target={self._display_target!r} "
            f"pending={self._ledger.pending()}>"
        )

    # -- the writer thread -------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            thread = threading.Thread(
                target=_run, args=(weakref.ref(self),), name=f"auditq[{self.name}]", daemon=True
            )
            self._thread = thread
            self._ledger.writer_thread = thread
            self._gate.started = True
        try:
            thread.start()
        except RuntimeError:
            # Interpreter shutdown forbids new threads; close() then drains inline.
            with self._lock:
                self._thread = None
                self._gate.started = False

    def _thread_ended(self) -> None:
        """The writer thread is about to end. Unless the writer is closing, that is a
        surprise (it should run until close()): say so, and let the next call start a new
        one instead of queueing for a thread that is gone."""
        with self._lock:
            if self._thread is not threading.current_thread() or self._gate.closed:
                return
            self._thread = None
            self._gate.started = False
        logger.error(
            "the writer thread of %s stopped unexpectedly; the next call starts a new one",
            self.name,
        )

    def _step(self) -> bool:
        """One wake-up of the writer thread; False when it should exit."""
        woken = self._wake.wait(self.flush_interval)
        self._wake.clear()
        with self._lock:
            drain_all = self._drain_all or not woken or self._gate.closed
            self._drain_all = False
        self._delivery.drain(drain_all)
        self._delivery.upkeep()
        self._ledger.report()
        return not (self._gate.closed and len(self._buffer) == 0) and not self._abort.is_set()

    def _release_resources(self) -> None:
        self._watchdog.close()
        self._source.close()
        if self._spool is not None:
            self._spool.close()

    def _scrub(self, text: str) -> str:
        return self._dsn.scrub(text) if self._dsn is not None else text

    def _after_fork(self) -> None:
        """In a forked child: start empty, with a new thread and connection, lazily (see
        forks.py). The parent still owns (and will write) everything queued before the
        fork."""
        if self._mark.here():
            return
        ids.reseed()  # uWSGI forks without the hooks: the id stream must still differ
        self._source.forget_after_fork()
        if self._spool is not None:
            self._spool.forget_after_fork()
        closed = self._gate.closed
        self._init_state()
        self._gate.closed = closed
        self._delivery.closing = closed


def _run(ref: weakref.ref[AuditWriter]) -> None:
    # Holds the writer only while working, so an abandoned writer can be collected. A loop
    # step that fails, with any exception at all (a caller's value whose __str__ raises
    # SystemExit, say), is logged and the loop goes on: one surprise never strands the queue.
    try:
        writer = ref()
        if writer is not None:
            try:
                writer._delivery.warm_up()
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
            except BaseException:
                logger.exception("writer loop error (continuing)")
                time.sleep(0.1)
            finally:
                del writer
    finally:
        writer = ref()
        if writer is not None:
            writer._thread_ended()


# Every live writer, for the exit drain; weak so it never keeps one alive.
_live_writers: weakref.WeakSet[AuditWriter] = weakref.WeakSet()


def live_writers() -> list[AuditWriter]:
    """Every writer of this process that is not yet garbage (for metrics and exit hooks)."""
    return list(_live_writers)


def _close_all_at_exit() -> None:
    for writer in list(_live_writers):
        if not writer.closed and writer._mark.here():
            try:
                writer.close(writer.shutdown_timeout)
            except Exception:
                logger.exception("exit drain failed")


atexit.register(_close_all_at_exit)
