"""The comparison harness (`python -m benchmarks.harness`): auditq against PostgreSQL's own COPY
ceiling and the usual alternatives, in one process, cases interleaved over several rounds,
medians reported. It runs from a checkout and uses auditq's public API only.

Throughput cases (each starts on an emptied table, after a CHECKPOINT when allowed):
  ceiling      rows encoded with `auditq.binary.encode_row` before timing; timed: binary COPY of
               HEADER, the rows in ~1 MB writes, TRAILER, one commit per writer batch_size rows
  ceiling-4spin  the same pre-encoded COPYs while 4 threads spin in pure Python, each COPY
               sent by one C call through libpq with the GIL released throughout: what 4 busy
               threads leave of the server's COPY on this machine, whatever the client; the
               bound of auditq-4t and auditq-drain-4spin
  auditq-1t    1 producer thread calling `writer.log()` as fast as it can, default settings;
               timed from the first call until `flush()` returned (then `count(*)` must agree)
  auditq-4t    the same with 4 producer threads
  auditq-4t-si1ms  a diagnostic, not a target: auditq-4t under sys.setswitchinterval(0.001),
               to show what the interpreter's 5 ms GIL hand-off costs the writer thread
  auditq-drain the writer alone: a queue filled while it sleeps, then flush() timed (no
               caller competes for the GIL: what the writer itself can do)
  auditq-drain-4spin  auditq-drain while 4 threads that never call auditq spin in pure
               Python: what any 4 busy threads cost the writer by holding the GIL (compare
               with auditq-4t; issue 16 made it a target)
  naive        one INSERT per call, autocommit (the original service's design)
  executemany  INSERTs batched 1,000 per `executemany` + commit
Then, once each: the caller's `log()` latency with the server frozen (SIGSTOP, only for a server
the harness started), with the writer thread's GIL holds sampled meanwhile (`holds.py`),
overload (producers offered ~10x the ceiling: the memory in flight), an idle writer's CPU,
the busy application (4 spinning threads and one thread logging at fixed rates, with its
control), close() under fire (a queue drained while 8 threads keep calling `log()`), and
last the frozen server again with `auditq.prefault_memory()` in effect (the hook is
process-wide and cannot be taken out, so it comes after every case that runs without it).
Every writer runs with its defaults (except where a case says why not); the hook is off
until that last case.

`report.py` turns the result into the table, the target verdicts, JSON and the chart.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import statistics
import sys
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from auditq import AuditWriter, WriterStats, native, otel, pqcopy, prefault_memory
from auditq.benchjob import (
    TYPICAL_FIELDS,
    machine_info,
    metadata_for,
    percentiles,
    prepare_table,
    timed_log,
    timer_overhead_ns,
)
from auditq.binary import COPY_COLUMNS, HEADER, TRAILER, encode_row
from auditq.config import DEFAULT_BATCH_SIZE
from auditq.connection import widen_send_buffer
from auditq.entry import COLUMNS, Row, dump_metadata
from auditq.schema import qualified

from .holds import HoldProbe, window_max
from .system import ServerFreezer, rss_bytes

THROUGHPUT_CASES = (
    "ceiling",
    "ceiling-4spin",
    "auditq-1t",
    "auditq-4t",
    "auditq-4t-si1ms",
    "auditq-drain",
    "auditq-drain-4spin",
    "naive",
    "executemany",
)
#: The switch interval of the diagnostic case (the interpreter's default is 5 ms).
DIAGNOSTIC_SWITCH_INTERVAL = 0.001
#: Threads spinning in pure Python during the auditq-drain-4spin diagnostic.
DIAGNOSTIC_SPINNERS = 4
LATENCY_MARKS = (50, 99, 99.9)
MiB = 1 << 20
#: Threads of pure-Python work beside the one logging thread in the busy application.
BUSY_SPINNERS = 4
#: How often the busy application's poller reads `stats().written` to date each entry's write.
BUSY_POLL_SECONDS = 0.002
#: The busy application's control runs this long at most (its queue keeps every entry).
BUSY_CONTROL_SECONDS = 3.0
#: A rate counts as reached within this fraction.
BUSY_REACHED = 0.98
#: Threads calling `log()` flat out while close() drains.
CLOSE_THREADS = 8
#: After the thaw, the frozen case waits at most this long for the backlog to be written.
CATCH_UP_SECONDS = 30.0


@dataclass
class CompareConfig:
    rounds: int = 3
    #: Rows for `ceiling` and for each auditq case, per round.
    entries: int = 200_000
    naive_entries: int = 5_000
    executemany_entries: int = 50_000
    executemany_batch: int = 1_000
    #: Rows per COPY transaction in `ceiling` (the writer's default batch_size, so both
    #: pay for as many commits), and the size of each write() inside it.
    ceiling_chunk: int = DEFAULT_BATCH_SIZE
    copy_block_bytes: int = 1 * MiB
    freeze_seconds: float = 3.0
    overload_seconds: float = 10.0
    #: Overload offers this multiple of the ceiling's rows/s (as far as a caller can).
    overload_factor: float = 10.0
    idle_seconds: float = 10.0
    #: The frozen-server case once more at the end, with `auditq.prefault_memory()` on.
    frozen_with_prefault: bool = True
    #: The busy application: the rates asked of the logging thread, seconds per rate.
    busy_app: bool = True
    busy_rates: tuple[float, ...] = (50_000.0, 100_000.0, 150_000.0)
    busy_seconds: float = 10.0
    #: close() under fire: runs (0 skips), rows queued, the writer's batch_size (issue 16's
    #: report used 1,000), close()'s timeout.
    close_runs: int = 2
    close_rows: int = 50_000
    close_batch_size: int = 1_000
    close_timeout: float = 10.0
    table: str = "auditq_bench"
    schema: str = "public"
    progress: bool = True


@dataclass
class CaseRun:
    """One case in one round."""

    case: str
    round: int
    rows: int
    seconds: float
    rows_per_second: float
    rows_in_table: int
    consistent: bool
    stats: dict[str, Any] = field(default_factory=dict)
    latency_ns: dict[str, float] = field(default_factory=dict)


@dataclass
class CompareResult:
    config: dict[str, Any]
    machine: dict[str, Any]
    writer_settings: dict[str, Any]
    server_owned: bool
    timer_overhead_ns: float
    runs: list[CaseRun]
    #: case -> {"median", "min", "max", "rows"} in rows/s.
    throughput: dict[str, dict[str, float]]
    #: scenario -> percentiles in ns (p50/p99/p99.9 median over rounds; max the worst).
    latency_ns: dict[str, dict[str, float]]
    #: The frozen server with the interpreter's default allocator (as auditq leaves it).
    frozen: dict[str, Any]
    overload: dict[str, Any]
    idle: dict[str, Any]
    seconds: float
    #: The same with `auditq.prefault_memory()` in effect (empty when not run).
    frozen_prefault: dict[str, Any] = field(default_factory=dict)
    #: The writer thread's GIL holds, sampled during the frozen case (`holds.HoldProbe`).
    gil_holds: dict[str, Any] = field(default_factory=dict)
    #: The busy application per rate, its control and the highest rate sustained.
    busy_app: dict[str, Any] = field(default_factory=dict)
    #: close() under fire: each run, median and max seconds.
    close_drain: dict[str, Any] = field(default_factory=dict)

    @property
    def consistent(self) -> bool:
        """Every run's rows accounted for in the table."""
        return (
            all(run.consistent for run in self.runs)
            and bool(self.frozen.get("consistent", True))
            and bool(self.frozen_prefault.get("consistent", True))
            and bool(self.overload.get("consistent", True))
            and bool(self.idle.get("consistent", True))
            and bool(self.busy_app.get("consistent", True))
            and bool(self.close_drain.get("consistent", True))
        )

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["consistent"] = self.consistent
        return payload


# -- the rows every case writes -------------------------------------------------------------


def copy_blocks(
    conn: psycopg.Connection[tuple[object, ...]], copy_sql: sql.Composed, blocks: list[bytes]
) -> None:
    """One COPY of pre-encoded `blocks` through psycopg's `copy.write()`."""
    with conn.cursor() as cur, cur.copy(copy_sql) as copy:
        copy.write(HEADER)
        for block in blocks:
            copy.write(block)
        copy.write(TRAILER)


def typical_row(n: int) -> Row:
    """The n-th typical entry as the queue holds it (what `timed_log` logs), for the cases
    and scripts that encode rows without calling `log()`."""
    return (None, time.time_ns(), *TYPICAL_FIELDS, dump_metadata(metadata_for(n)))


def _insert_params(n: int) -> tuple[Any, ...]:
    """What a naive service binds per call: a fresh uuid, a datetime, a JSON-dumped dict."""
    return (uuid.uuid4(), datetime.now(UTC), *TYPICAL_FIELDS, Jsonb(metadata_for(n)))


def encode_ceiling(cfg: CompareConfig) -> list[list[bytes]]:
    """The ceiling's pre-encoded input: per transaction, its ~1 MB blocks of binary tuples."""
    chunks: list[list[bytes]] = []
    blocks: list[bytes] = []
    pending: list[bytes] = []
    size = 0
    for n in range(cfg.entries):
        data, _ = encode_row(typical_row(n))
        pending.append(data)
        size += len(data)
        last_in_chunk = (n + 1) % cfg.ceiling_chunk == 0 or n + 1 == cfg.entries
        if size >= cfg.copy_block_bytes or last_in_chunk:
            blocks.append(b"".join(pending))
            pending, size = [], 0
        if last_in_chunk:
            chunks.append(blocks)
            blocks = []
    return chunks


# -- the harness ------------------------------------------------------------------------------


class Harness:
    def __init__(self, dsn: str, cfg: CompareConfig, *, server_owned: bool, stream: TextIO) -> None:
        self.dsn = dsn
        self.cfg = cfg
        self.server_owned = server_owned
        self.stream = stream
        self.target = qualified(cfg.schema, cfg.table)
        columns = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        # encode_row sends the columns in its own order.
        copy_columns = sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS))
        self.copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            self.target, copy_columns
        )
        self.insert_sql = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            self.target, columns, sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS))
        )
        self.can_checkpoint = True
        #: The default settings every auditq case runs with, as the writer reports them.
        self.writer_settings: dict[str, Any] = {}

    def writer(self) -> AuditWriter:
        writer = AuditWriter(self.dsn, table=self.cfg.table, schema=self.cfg.schema)
        if not self.writer_settings:  # as the first case found them: the main cases' settings
            self.writer_settings = {
                "max_queue": writer.max_queue,
                "batch_size": writer.batch_size,
                "flush_interval": writer.flush_interval,
                # What the caller's path runs: C or Python, with the OpenTelemetry hook or not.
                "c_extension": native.speedups is not None,
                "otel_hook": otel.enabled,
                # Whether new memory is taken an arena at a time (auditq.prefault_memory()).
                "prefault_hook": prefault_in_effect(),
            }
        return writer

    def say(self, text: str) -> None:
        if self.cfg.progress:
            self.stream.write(f"  {text}\n")
            self.stream.flush()

    # -- table state

    def reset(self) -> None:
        """Empty the table and checkpoint, so no case pays for the previous one's writes."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("TRUNCATE {}").format(self.target))
            if self.can_checkpoint:
                try:
                    conn.execute("CHECKPOINT")
                except psycopg.Error:
                    self.can_checkpoint = False  # needs superuser or pg_checkpoint
        gc.collect()

    def count(self, distinct: bool = False) -> tuple[int, int]:
        what = "count(*), count(DISTINCT id)" if distinct else "count(*), 0"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                sql.SQL("SELECT " + what + " FROM {}").format(self.target)
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    # -- throughput cases

    def ceiling(self, round_: int, chunks: list[list[bytes]]) -> CaseRun:
        rows = self.cfg.entries
        with psycopg.connect(self.dsn) as conn:
            conn.execute("SELECT 1")
            conn.commit()
            started = time.perf_counter()
            for blocks in chunks:
                copy_blocks(conn, self.copy_sql, blocks)
                conn.commit()
            seconds = time.perf_counter() - started
        in_table, _ = self.count()
        return CaseRun("ceiling", round_, rows, seconds, rows / seconds, in_table, in_table == rows)

    def ceiling_spinning(self, round_: int, chunks: list[list[bytes]]) -> CaseRun:
        """The ceiling's COPYs while DIAGNOSTIC_SPINNERS threads spin, each COPY (start, every
        block, end, result) sent by one C call through libpq with the GIL released for all of
        it (`_pqcopy.c`'s `pq_copy`, the writer's own binding), so the client waits for the
        GIL once per COPY and never while the server has data to take: what 4 busy threads
        leave of the server's COPY on this machine, the bound of auditq-4t and
        auditq-drain-4spin. Without the C path, psycopg's `copy.write()`, which needs the GIL
        back after every flush (then the figure is psycopg's behind 4 threads, not the
        server's). Each COPY its own transaction on an autocommit connection with the
        writer's widened send buffer."""
        rows = self.cfg.entries
        speedups = native.speedups
        through_c = pqcopy.available() and speedups is not None
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            widen_send_buffer(conn.pgconn.socket)
            conn.execute("SELECT 1")
            query = self.copy_sql.as_bytes(conn)
            ptr: int = getattr(conn.pgconn, "pgconn_ptr")  # noqa: B009 - not in the protocol
            with spinning(DIAGNOSTIC_SPINNERS):
                started = time.perf_counter()
                for blocks in chunks:
                    if through_c and speedups is not None:
                        outcome = speedups.pq_copy(ptr, query, (HEADER, *blocks, TRAILER), True)
                        if outcome[2] is not None:
                            raise psycopg.OperationalError(f"ceiling-4spin COPY: {outcome[2]!r}")
                        continue
                    copy_blocks(conn, self.copy_sql, blocks)
                seconds = time.perf_counter() - started
        in_table, _ = self.count()
        return CaseRun(
            "ceiling-4spin",
            round_,
            rows,
            seconds,
            rows / seconds,
            in_table,
            in_table == rows,
            stats={"through_c": through_c},
        )

    def auditq(self, round_: int, threads: int, *, switch_interval: float | None = None) -> CaseRun:
        if switch_interval is not None:
            default = sys.getswitchinterval()
            sys.setswitchinterval(switch_interval)
            try:
                run = self.auditq(round_, threads)
            finally:
                sys.setswitchinterval(default)
            run.case += f"-si{switch_interval * 1000:g}ms"
            return run
        total = self.cfg.entries
        per_thread = [total // threads] * threads
        per_thread[0] += total - sum(per_thread)
        samples = [array("q", bytes(8 * n)) for n in per_thread]
        gate = threading.Event()
        writer = self.writer()
        workers = [
            threading.Thread(
                target=_produce,
                args=(writer.log, n, sum(per_thread[:k]), samples[k], gate),
                name=f"bench-producer-{k}",
            )
            for k, n in enumerate(per_thread)
        ]
        for worker in workers:
            worker.start()
        started = time.perf_counter()
        gate.set()
        for worker in workers:
            worker.join()
        enqueue_seconds = time.perf_counter() - started
        flushed = writer.flush(timeout=600)
        seconds = time.perf_counter() - started
        writer.close(timeout=30)
        stats = writer.stats()
        in_table, distinct = self.count(distinct=True)
        merged = array("q")
        for part in samples:
            merged.extend(part)
        consistent = (
            flushed
            and stats.calls == total
            and in_table == stats.written == distinct
            and stats.accepted == stats.written + stats.dead_lettered
            and stats.calls == stats.accepted + stats.dropped_overflow + stats.rejected
        )
        return CaseRun(
            f"auditq-{threads}t",
            round_,
            total,
            seconds,
            stats.written / seconds,
            in_table,
            consistent,
            stats=_stats_view(
                stats, distinct_ids=distinct, flushed=flushed, enqueue_seconds=enqueue_seconds
            ),
            latency_ns=percentiles(merged, LATENCY_MARKS),
        )

    def drain(self, round_: int, *, spinners: int = 0) -> CaseRun:
        """The writer alone on a full queue; with `spinners`, that many threads that never
        call auditq keep the GIL busy meanwhile (as an application's own threads would)."""
        total = self.cfg.entries
        # The writer sleeps while the queue fills: no wake-up by count, none by time.
        writer = AuditWriter(
            self.dsn,
            table=self.cfg.table,
            schema=self.cfg.schema,
            max_queue=total + 1,
            wake_rows=total + 1,
            flush_interval=3600,
        )
        samples = array("q", bytes(8 * total))
        for n in range(total):
            samples[n] = timed_log(writer.log, metadata_for(n))
        with spinning(spinners):
            started = time.perf_counter()
            flushed = writer.flush(timeout=600)
            seconds = time.perf_counter() - started
        writer.close(timeout=30)
        stats = writer.stats()
        in_table, distinct = self.count(distinct=True)
        consistent = flushed and in_table == stats.written == distinct == stats.calls == total
        return CaseRun(
            "auditq-drain-4spin" if spinners else "auditq-drain",
            round_,
            total,
            seconds,
            stats.written / seconds,
            in_table,
            consistent,
            stats=_stats_view(stats, distinct_ids=distinct, flushed=flushed),
            # The callers' cost with the writer asleep: the baseline for the saturated case.
            latency_ns=percentiles(samples, LATENCY_MARKS),
        )

    def naive(self, round_: int) -> CaseRun:
        rows = self.cfg.naive_entries
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT 1")
            execute = conn.execute
            statement = self.insert_sql
            started = time.perf_counter()
            for n in range(rows):
                execute(statement, _insert_params(n))
            seconds = time.perf_counter() - started
        in_table, _ = self.count()
        return CaseRun("naive", round_, rows, seconds, rows / seconds, in_table, in_table == rows)

    def executemany(self, round_: int) -> CaseRun:
        rows = self.cfg.executemany_entries
        batch = self.cfg.executemany_batch
        with psycopg.connect(self.dsn) as conn:
            conn.execute("SELECT 1")
            conn.commit()
            started = time.perf_counter()
            with conn.cursor() as cur:
                for first in range(0, rows, batch):
                    params = [_insert_params(n) for n in range(first, min(rows, first + batch))]
                    cur.executemany(self.insert_sql, params)
                    conn.commit()
            seconds = time.perf_counter() - started
        in_table, _ = self.count()
        return CaseRun(
            "executemany", round_, rows, seconds, rows / seconds, in_table, in_table == rows
        )

    # -- once-only scenarios

    def frozen(self, *, prefault: bool = False) -> dict[str, Any]:
        """log() latency while every server process is stopped for `freeze_seconds`; with
        `prefault`, after `auditq.prefault_memory()` (process-wide and for good: run it last).
        After the thaw the case lasts until the backlog is written, plus a second.

        Without `prefault`, the writer thread's GIL holds are sampled meanwhile (under
        "gil_holds": before the freeze, while frozen, after the thaw): the freeze and the
        catch-up that follows are where the writer's long holds were seen (issue 16). The
        sampler wakes every millisecond, so it competes with the producer for the GIL a
        little; the prefault case runs without it."""
        if not self.server_owned:
            return {"skipped": "n/a (server not owned)"}
        try:
            freezer = ServerFreezer(self.dsn)
        except ImportError:
            return {"skipped": "n/a (psutil not installed: pip install -e '.[bench]')"}
        except Exception as exc:
            return {"skipped": f"n/a (cannot find the server's processes: {exc})"}
        freeze = self.cfg.freeze_seconds
        warm, after = 1.0, 1.0
        hook = prefault_memory() if prefault else prefault_in_effect()
        writer = self.writer()
        # Paced so the queue holds everything offered during the freeze: the figure is the
        # caller's cost while the writer is stuck, not the cost of dropping.
        rate = min(50_000.0, 0.5 * writer.max_queue / max(freeze, 0.1))
        # The catch-up after the thaw takes a second or two; the producer stops at capacity.
        capacity = int(rate * (warm + freeze + after + 10.0) * 1.2) + 1_000
        starts = array("q", bytes(8 * capacity))
        costs = array("q", bytes(8 * capacity))
        woke = array("b", bytes(capacity))
        stop = threading.Event()
        done: list[int] = [0]
        producer = threading.Thread(
            target=_produce_paced,
            args=(writer.log, rate, stop, starts, costs, done, woke),
            name="bench-producer-frozen",
        )
        probe = None
        if not prefault:
            probe = HoldProbe(writer.name, warm + freeze + CATCH_UP_SECONDS + after + 5.0)
            probe.start()  # before the writer thread exists: it forks its other sampler
        began = time.perf_counter_ns()
        producer.start()
        processes = 0
        try:
            time.sleep(warm)
            frozen_at = time.perf_counter_ns()
            processes = freezer.freeze()
            time.sleep(freeze)
        finally:
            freezer.thaw()
            thawed_at = time.perf_counter_ns()
        caught_up = self.catch_up(writer, thawed_at)
        time.sleep(after)
        stop.set()
        producer.join()
        ended = time.perf_counter_ns()
        if probe is not None:
            probe.stop()
        flushed = writer.flush(timeout=120)
        writer.close(timeout=30)
        stats = writer.stats()
        in_table, _ = self.count()
        calls = done[0]
        window = [i for i in range(calls) if frozen_at <= starts[i] <= thawed_at]
        # The first call after each pacing sleep (1 in 64) pays for the thread waking up
        # (~35 µs at p50, measured the same with the server running), not for auditq: it
        # is reported apart and left out of the steady figure the target is checked on.
        during = array("q", (costs[i] for i in window if not woke[i]))
        waking = array("q", (costs[i] for i in window if woke[i]))
        # The control: the same paced calls in the seconds before and after the freeze,
        # with the server running (a p99 that is no better there is the pacing's, not the
        # frozen server's).
        running = array(
            "q",
            (
                costs[i]
                for i in range(calls)
                if not woke[i] and not frozen_at <= starts[i] <= thawed_at
            ),
        )
        consistent = (
            flushed
            and stats.calls == calls
            and in_table == stats.written
            and stats.accepted == stats.written + stats.dead_lettered
        )
        windows = {
            "before": (began, frozen_at),
            "frozen": (frozen_at, thawed_at),
            "after": (thawed_at, ended),
        }
        # Every call, the first after a pacing sleep included: the slowest log() of issue 16.
        slowest = {
            name: window_max(starts, costs, calls, lo, hi) for name, (lo, hi) in windows.items()
        }
        holds: dict[str, Any] = {}
        if probe is not None:
            holds = probe.figures(windows, frozen_at)
            holds["slowest_log_ms"] = slowest
            holds["switch_interval_s"] = sys.getswitchinterval()
        return {
            "prefault_hook": hook,
            "freeze_seconds": (thawed_at - frozen_at) / 1e9,
            "caught_up_seconds": caught_up,
            "slowest_log_ms": slowest,
            "gil_holds": holds,
            "server_processes_stopped": processes,
            "paced_rate": rate,
            "calls": calls,
            "calls_while_frozen": len(during),
            "latency_ns": percentiles(during, LATENCY_MARKS),
            "latency_after_sleep_ns": percentiles(waking, LATENCY_MARKS),
            "calls_after_sleep": len(waking),
            "latency_all_ns": percentiles(costs[:calls], LATENCY_MARKS),
            "latency_running_ns": percentiles(running, LATENCY_MARKS),
            "calls_running": len(running),
            "written": stats.written,
            "dropped_overflow": stats.dropped_overflow,
            "retries": stats.retries,
            "rows_in_table": in_table,
            "consistent": consistent,
        }

    def catch_up(self, writer: AuditWriter, since_ns: int) -> float:
        """Wait until the writer's backlog is down to a batch's worth of rows (at most
        CATCH_UP_SECONDS); the seconds since `since_ns`."""
        deadline = time.monotonic() + CATCH_UP_SECONDS
        while writer.stats().pending > 5_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        return (time.perf_counter_ns() - since_ns) / 1e9

    def overload(self, ceiling_rows_per_second: float) -> dict[str, Any]:
        """Producers offered `overload_factor` x the ceiling: RSS growth and drops."""
        seconds = self.cfg.overload_seconds
        offered_rate = self.cfg.overload_factor * ceiling_rows_per_second
        gc.collect()
        baseline = rss_bytes()
        writer = self.writer()
        stop = threading.Event()
        done: list[int] = [0]
        producer = threading.Thread(
            target=_produce_paced,
            args=(writer.log, offered_rate, stop, None, None, done),
            name="bench-producer-overload",
        )
        samples: list[tuple[float, int, int, int]] = []  # (s, rss, pending, dropped)
        started = time.perf_counter()
        producer.start()
        while (elapsed := time.perf_counter() - started) < seconds:
            s = writer.stats()
            samples.append((elapsed, rss_bytes(), s.pending, s.dropped_overflow))
            time.sleep(0.05)
        stop.set()
        producer.join()
        offered_seconds = time.perf_counter() - started
        calls = done[0]
        at_stop = writer.stats()
        flushed = writer.flush(timeout=300)
        writer.close(timeout=30)
        stats = writer.stats()
        in_table, _ = self.count()
        peak = max((rss for _, rss, _, _ in samples), default=baseline)
        fill = next((i for i, sample in enumerate(samples) if sample[3] > 0), None)
        trend_after_fill: int | None = None
        if fill is not None:
            at_fill = samples[fill][1]
            after = [rss for _, rss, _, _ in samples[fill:]]
            growth_after_fill: int | None = max(after) - at_fill
            fill_seconds: float | None = samples[fill][0]
            # Flat means no trend: the writer's batch in flight fills and empties (a sawtooth
            # of up to batch_size rows), so the peaks of the two halves after the fill are
            # compared rather than the fill with the highest point.
            half = len(after) // 2
            if half:
                trend_after_fill = max(after[half:]) - max(after[:half])
        else:
            growth_after_fill = fill_seconds = None
        max_queue = writer.max_queue
        return {
            "seconds": offered_seconds,
            "target_rate": offered_rate,
            "offered_rate": calls / offered_seconds,
            "calls": calls,
            "accepted": stats.accepted,
            "dropped_overflow": stats.dropped_overflow,
            "drop_fraction": stats.dropped_overflow / calls if calls else 0.0,
            "written_while_offered": at_stop.written,
            "absorbed_rate": at_stop.written / offered_seconds,
            "written": stats.written,
            "rows_in_table": in_table,
            "rss_baseline_bytes": baseline,
            "rss_peak_bytes": peak,
            "rss_growth_bytes": peak - baseline,
            "rss_bound_bytes": max_queue * 1024 + 32 * MiB,
            "queue_full_after_seconds": fill_seconds,
            "rss_growth_after_fill_bytes": growth_after_fill,
            "rss_trend_after_fill_bytes": trend_after_fill,
            "flat_tolerance_bytes": FLAT_TOLERANCE,
            "max_queue": max_queue,
            "rss_samples": [(round(t, 3), rss) for t, rss, _, _ in samples],
            "consistent": flushed
            and stats.calls == calls
            and in_table == stats.written
            and stats.accepted == stats.written + stats.dead_lettered
            and stats.calls == stats.accepted + stats.dropped_overflow + stats.rejected,
        }

    def idle(self) -> dict[str, Any]:
        """Process CPU time of a connected, idle writer while the main thread sleeps."""
        writer = self.writer()
        timed_log(writer.log, metadata_for(0))
        flushed = writer.flush(timeout=30)
        gc.collect()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        time.sleep(self.cfg.idle_seconds)
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        writer.close(timeout=30)
        stats = writer.stats()
        return {
            "seconds": wall,
            "cpu_seconds": cpu,
            "cpu_fraction_of_core": cpu / wall if wall else 0.0,
            "consistent": flushed and stats.written == 1,
        }

    # -- the busy application (issue 16)

    def busy_rate(self, rate: float, seconds: float) -> dict[str, Any]:
        """4 threads of pure-Python work that never call auditq, and one thread calling
        `log()` at `rate` for `seconds` (paced in bursts of 64, as the frozen case), on an
        emptied table with a fresh writer (default settings). Sustained: nothing dropped,
        the rate reached (within 2 %), every entry in the table.

        The lag of an entry is from the start of its `log()` call's burst to the first poll
        (every 2 ms, on a sixth thread) at which `stats().written` covered it (one producer:
        entries are written in order), measured while the spinners run; p50/p99/max over
        every 50th entry, only when nothing was dropped. The table's `recorded_at` is not
        used: its default is the transaction's start, and a streaming COPY starts before its
        later rows are logged."""
        self.reset()
        writer = self.writer()
        # One entry written before the load starts: an application's writer has opened its
        # connection and met its table long before its busy hours, and behind 4 spinning
        # threads each of those round trips would wait for the GIL (seconds in all), which
        # the first entries' lag would then show.
        warm = 1
        writer.log("bench.warm_up")
        writer.flush(timeout=30)
        capacity = int(rate * seconds * 1.05) + 1_000
        starts = array("q", bytes(8 * capacity))
        costs = array("q", bytes(8 * capacity))
        done = [0]
        stop_producer, stop_poll = threading.Event(), threading.Event()
        polled_at, polled_written = array("q"), array("q")
        poller = threading.Thread(
            target=_poll_written,
            args=(writer, stop_poll, polled_at, polled_written),
            name="bench-busy-poller",
        )
        producer = threading.Thread(
            target=_produce_paced,
            args=(writer.log, rate, stop_producer, starts, costs, done),
            name="bench-busy-producer",
        )
        with spinning(BUSY_SPINNERS):
            poller.start()
            began = time.perf_counter()
            producer.start()
            time.sleep(seconds)
            stop_producer.set()
            producer.join()
            produced_for = time.perf_counter() - began
            # The lag of the last entries is measured with the spinners still running.
            deadline = time.monotonic() + 30
            while True:
                now = writer.stats()
                caught_up = now.written + now.dropped_overflow >= done[0] + warm
                if caught_up or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            stop_poll.set()
            poller.join()
        flushed = writer.flush(timeout=60)
        writer.close(timeout=30)
        stats = writer.stats()
        in_table, _ = self.count()
        calls = done[0]  # the producer's, without the warm-up entry
        lags = array("q")
        if not stats.dropped_overflow:
            for n in range(0, calls, 50):
                # The first poll with entry n written (after the warm-up entry).
                k = bisect.bisect_right(polled_written, n + warm)
                if k < len(polled_at):
                    lags.append(polled_at[k] - starts[n])
        ordered = sorted(lags)

        def mark(q: float) -> float | None:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6 if ordered else None

        # The poller waits for the GIL too (behind 4 spinners, tens of ms at times): a lag is
        # overstated by up to the gap before the poll that saw it, reported with the lags.
        gaps = sorted(b - a for a, b in itertools.pairwise(polled_at))
        reached = calls / produced_for
        consistent = (
            flushed
            and stats.calls == calls + warm
            and in_table == stats.written
            and stats.accepted == stats.written + stats.dead_lettered
            and stats.calls == stats.accepted + stats.dropped_overflow + stats.rejected
        )
        return {
            "rate": rate,
            "seconds": produced_for,
            "reached": reached,
            "calls": calls,
            "warm_up_entries": warm,
            "written": stats.written,
            "dropped_overflow": stats.dropped_overflow,
            "rows_in_table": in_table,
            "lag_p50_ms": mark(0.50),
            "lag_p99_ms": mark(0.99),
            "lag_max_ms": ordered[-1] / 1e6 if ordered else None,
            "lag_samples": len(ordered),
            "poll_gap_p50_ms": gaps[len(gaps) // 2] / 1e6 if gaps else None,
            "poll_gap_max_ms": gaps[-1] / 1e6 if gaps else None,
            # Every entry seen written within 30 s of the last call, spinners still running
            # (else its lag is unknown and left out: the run cannot count as sustained).
            "caught_up": caught_up,
            "sustained": consistent
            and caught_up
            and stats.dropped_overflow == 0
            and reached >= BUSY_REACHED * rate
            and in_table == calls + warm,
            "consistent": consistent,
        }

    def busy_control(self, rate: float, seconds: float) -> dict[str, Any]:
        """The busy application's producer with no writer working: the same 4 spinners, the
        same pacing loop asked for `rate`, the same `log()` calls, but the writer thread
        sleeps (no wake-up by count or time, a queue that keeps every entry) until the
        spinners have stopped. The rate reached is the producer thread's own ceiling on this
        machine: its share of the GIL against 4 busy threads, spent on the pacing loop and
        on `log()`'s own work on the caller's thread. No writer design can make the busy
        application log faster than that.

        Why `log()` on a sleeping writer rather than a trivial C call in the same loop:
        `log()`'s caller-side work (checks, metadata to JSON, the row tuple, the append) is
        paid on the producer's GIL share whatever the writer does, so leaving it out would
        give a ceiling the target could never reach for reasons that are not the writer's;
        a writer that refuses every call (closed, or a full queue) is cheaper still, since a
        refused call skips the metadata. The one cost the control adds is a queue that only
        grows (fresh pages, see benchmarks/queue_growth.py): a few per cent at most, which
        makes the figure a slight understatement."""
        self.reset()
        expected = int(rate * seconds * 1.2) + 1_000
        writer = AuditWriter(
            self.dsn,
            table=self.cfg.table,
            schema=self.cfg.schema,
            max_queue=expected,
            wake_rows=expected + 1,
            flush_interval=3600,
        )
        # Warmed as the measured writers are (see `busy_rate`): its thread then sleeps.
        warm = 1
        writer.log("bench.warm_up")
        writer.flush(timeout=30)
        stop = threading.Event()
        done = [0]
        producer = threading.Thread(
            target=_produce_paced,
            args=(writer.log, rate, stop, None, None, done),
            name="bench-busy-control",
        )
        with spinning(BUSY_SPINNERS):
            began = time.perf_counter()
            producer.start()
            time.sleep(seconds)
            stop.set()
            producer.join()
            produced_for = time.perf_counter() - began
        flushed = writer.flush(timeout=120)
        writer.close(timeout=30)
        stats = writer.stats()
        in_table, _ = self.count()
        calls = done[0]
        return {
            "rate": rate,
            "seconds": produced_for,
            "reached": calls / produced_for,
            "calls": calls,
            "warm_up_entries": warm,
            "dropped_overflow": stats.dropped_overflow,
            "rows_in_table": in_table,
            "consistent": flushed
            and stats.calls == calls + warm
            and in_table == stats.written
            and stats.accepted == stats.written + stats.dead_lettered
            and stats.calls == stats.accepted + stats.dropped_overflow + stats.rejected,
        }

    def busy_app(self) -> dict[str, Any]:
        """Every rate of `cfg.busy_rates` (ascending, each on its own), then the control at
        the highest; the highest rate sustained and its lag p99."""
        rates = sorted(self.cfg.busy_rates)
        seconds = self.cfg.busy_seconds
        runs = []
        for rate in rates:
            run = self.busy_rate(rate, seconds)
            runs.append(run)
            self.say(
                f"busy application {rate:>9,.0f}/s: reached {run['reached']:,.0f}/s, dropped "
                f"{run['dropped_overflow']:,}, lag p99 {_ms(run['lag_p99_ms'])}"
                f"{'' if run['sustained'] else '  (not sustained)'}"
            )
        control_seconds = min(seconds, BUSY_CONTROL_SECONDS)
        control = self.busy_control(max(rates), control_seconds)
        self.say(
            f"busy application control (writer asleep) asked {max(rates):,.0f}/s: reached "
            f"{control['reached']:,.0f}/s"
        )
        best = max((r for r in runs if r["sustained"]), key=lambda r: r["rate"], default=None)
        return {
            "spinners": BUSY_SPINNERS,
            "seconds": seconds,
            "rates": runs,
            "control": control,
            "sustained_rate": best["rate"] if best else 0.0,
            "sustained_lag_p99_ms": best["lag_p99_ms"] if best else None,
            "consistent": all(r["consistent"] for r in runs) and control["consistent"],
        }

    # -- close() under fire (issue 16)

    def close_drain(self) -> dict[str, Any]:
        """`cfg.close_rows` rows queued while the writer sleeps (no wake-up by count or by
        time; `batch_size` `cfg.close_batch_size`), then 8 threads call `log()` as fast as
        they can (refused: the queue is full, then the writer is closing) while
        `close(timeout=cfg.close_timeout)` is timed: what a rejected call costs the writer,
        and whether a drain at close starves."""
        self.reset()
        queued = self.cfg.close_rows
        writer = AuditWriter(
            self.dsn,
            table=self.cfg.table,
            schema=self.cfg.schema,
            batch_size=self.cfg.close_batch_size,
            max_queue=queued,
            wake_rows=queued + 1,
            flush_interval=3600,
        )
        for n in range(queued):
            writer.log("bench.queued", tenant_id="t", actor_id=f"a{n}", resource_id=str(n))
        time.sleep(0.5)  # the writer thread is up and connected, asleep
        stop = threading.Event()
        calls = [0] * CLOSE_THREADS
        hammers = [
            threading.Thread(
                target=_hammer, args=(writer.log, stop, calls, k), name=f"bench-hammer-{k}"
            )
            for k in range(CLOSE_THREADS)
        ]
        for thread in hammers:
            thread.start()
        started = time.perf_counter()
        clean = writer.close(timeout=self.cfg.close_timeout)
        seconds = time.perf_counter() - started
        stop.set()
        for thread in hammers:
            thread.join()
        stats = writer.stats()
        in_table, _ = self.count()
        return {
            "seconds": seconds,
            "returned": clean,
            "queued": queued,
            "written": stats.written,
            "dead_lettered": stats.dead_lettered,
            "spooled": stats.spooled,
            "refused": stats.rejected + stats.dropped_overflow,
            "hammer_calls": sum(calls),
            "rows_in_table": in_table,
            "consistent": stats.calls == queued + sum(calls)
            and stats.calls == stats.accepted + stats.dropped_overflow + stats.rejected
            and stats.accepted == stats.written + stats.dead_lettered + stats.spooled
            and in_table == stats.written,
        }

    def close_drains(self) -> dict[str, Any]:
        """`cfg.close_runs` runs of `close_drain`, median and max seconds."""
        runs = []
        for k in range(self.cfg.close_runs):
            run = self.close_drain()
            runs.append(run)
            self.say(
                f"close() under fire {k + 1}/{self.cfg.close_runs}: {run['seconds']:.2f}s, "
                f"written {run['written']:,}, dead-lettered {run['dead_lettered']:,}"
            )
        seconds = [run["seconds"] for run in runs]
        return {
            "rows": self.cfg.close_rows,
            "batch_size": self.cfg.close_batch_size,
            "threads": CLOSE_THREADS,
            "timeout": self.cfg.close_timeout,
            "runs": runs,
            "median_seconds": statistics.median(seconds),
            "max_seconds": max(seconds),
            "consistent": all(run["consistent"] for run in runs),
        }


def prefault_in_effect() -> bool:
    """Whether `auditq.prefault_memory()`'s hook is in this process's arena allocator."""
    return native.speedups is not None and bool(native.speedups.prefault_installed())


#: The peaks of RSS in the two halves after the queue filled may differ this much and still
#: count as flat (allocator noise: pymalloc arenas, the COPY buffer).
FLAT_TOLERANCE = 8 * MiB


def _spin(stop: threading.Event) -> None:
    """Pure-Python work that never calls auditq, until `stop` is set."""
    total = 0
    while not stop.is_set():
        for i in range(1000):
            total += i


@contextmanager
def spinning(count: int) -> Iterator[None]:
    """`count` threads doing pure-Python work that never calls auditq, for the duration:
    what an application's own busy threads do to a writer that needs the GIL."""
    stop = threading.Event()
    busy = [
        threading.Thread(target=_spin, args=(stop,), name=f"spinner-{k}", daemon=True)
        for k in range(count)
    ]
    for thread in busy:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in busy:
            thread.join()


def _poll_written(
    writer: AuditWriter, stop: threading.Event, at: array[int], written: array[int]
) -> None:
    """Every 2 ms until `stop`: when, and how many rows the writer had written by then. One
    poll more once `stop` is set (set when every row was seen written), so that the last
    rows are dated too."""
    clock = time.perf_counter_ns
    while True:
        last = stop.is_set()
        at.append(clock())
        written.append(writer.stats().written)
        if last:
            return
        time.sleep(BUSY_POLL_SECONDS)


def _hammer(log: Callable[..., bool], stop: threading.Event, calls: list[int], k: int) -> None:
    """`log()` flat out until `stop`, 100 calls between looks at it; the count in calls[k]."""
    n = 0
    while not stop.is_set():
        for _ in range(100):
            log("bench.closing", tenant_id="t", actor_id="a")
        n += 100
    calls[k] = n


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def _produce(
    log: Callable[..., bool], count: int, offset: int, out: array[int], gate: threading.Event
) -> None:
    gate.wait()
    for i in range(count):
        out[i] = timed_log(log, metadata_for(offset + i))


def _stats_view(stats: WriterStats, **extra: Any) -> dict[str, Any]:
    """A run's writer counters for the JSON, with what the case adds."""
    return {
        "calls": stats.calls,
        "accepted": stats.accepted,
        "written": stats.written,
        "dropped_overflow": stats.dropped_overflow,
        "rejected": stats.rejected,
        "dead_lettered": stats.dead_lettered,
        "batches": stats.batches,
        "retries": stats.retries,
        **extra,
    }


def _produce_paced(
    log: Callable[..., bool],
    rate: float,
    stop: threading.Event,
    starts: array[int] | None,
    costs: array[int] | None,
    done: list[int],
    woke: array[int] | None = None,
) -> None:
    """Call `log` at up to `rate` calls/s until `stop`; record (start, cost) when given
    arrays, and in `woke` which calls came first after a pacing sleep."""
    clock = time.perf_counter_ns
    interval_ns = 1e9 / rate if rate > 0 else 0.0
    capacity = len(costs) if costs is not None else sys.maxsize
    began = clock()
    n = 0
    slept = False
    while not stop.is_set() and n < capacity:
        if woke is not None and slept:
            woke[n] = 1
        slept = False
        for _ in range(64):
            t0 = clock()
            cost = timed_log(log, metadata_for(n))
            if costs is not None and starts is not None:
                costs[n] = cost
                starts[n] = t0
            n += 1
            if n >= capacity:
                break
        if interval_ns:
            ahead = began + n * interval_ns - clock()
            if ahead > 200_000:
                time.sleep(ahead / 1e9)
                slept = True
    done[0] = n


def _median_latency(runs: list[CaseRun]) -> dict[str, float]:
    """Per-round percentiles: the median of each mark over rounds; `max` is the worst."""
    marks = [run.latency_ns for run in runs if run.latency_ns]
    if not marks:
        return {}
    out = {key: float(statistics.median(m[key] for m in marks)) for key in marks[0] if key != "max"}
    out["max"] = max(m["max"] for m in marks)
    return out


def run_compare(
    dsn: str, cfg: CompareConfig, *, server_owned: bool, stream: TextIO = sys.stderr
) -> CompareResult:
    """Run every case against `dsn` (the caller's table is emptied, as `auditq bench` does).
    Unless `cfg.frozen_with_prefault` is False, this process ends with the allocator hook of
    `auditq.prefault_memory()` installed."""
    wall = time.perf_counter()
    server_version = prepare_table(dsn, cfg.schema, cfg.table)
    harness = Harness(dsn, cfg, server_owned=server_owned, stream=stream)
    overhead = timer_overhead_ns()
    harness.say(f"encoding {cfg.entries:,} rows for the ceiling (not timed)")
    chunks = encode_ceiling(cfg)
    steps: dict[str, Callable[[int], CaseRun]] = {
        "ceiling": lambda r: harness.ceiling(r, chunks),
        "ceiling-4spin": lambda r: harness.ceiling_spinning(r, chunks),
        "auditq-1t": lambda r: harness.auditq(r, 1),
        "auditq-4t": lambda r: harness.auditq(r, 4),
        "auditq-4t-si1ms": lambda r: harness.auditq(
            r, 4, switch_interval=DIAGNOSTIC_SWITCH_INTERVAL
        ),
        "auditq-drain": harness.drain,
        "auditq-drain-4spin": lambda r: harness.drain(r, spinners=DIAGNOSTIC_SPINNERS),
        "naive": harness.naive,
        "executemany": harness.executemany,
    }
    runs: list[CaseRun] = []
    for round_ in range(cfg.rounds):
        # Rotate the order each round so no case always runs first (or after the same one).
        shift = round_ % len(THROUGHPUT_CASES)
        order = THROUGHPUT_CASES[shift:] + THROUGHPUT_CASES[:shift]
        for case in order:
            harness.reset()
            run = steps[case](round_ + 1)
            runs.append(run)
            flag = "" if run.consistent else "  ACCOUNTING MISMATCH"
            if run.stats.get("dropped_overflow"):
                flag += f"  ({run.stats['dropped_overflow']:,} dropped: queue full)"
            harness.say(
                f"round {round_ + 1}/{cfg.rounds}  {case:<12} {run.rows_per_second:>10,.0f} rows/s"
                f"  ({run.rows:,} rows in {run.seconds:.2f}s){flag}"
            )
    chunks.clear()  # ~70 MB the once-only cases need not carry
    throughput: dict[str, dict[str, float]] = {}
    for case in THROUGHPUT_CASES:
        rates = [run.rows_per_second for run in runs if run.case == case]
        throughput[case] = {
            "median": statistics.median(rates),
            "min": min(rates),
            "max": max(rates),
            "rows": float(next(run.rows for run in runs if run.case == case)),
        }
    latency = {
        "saturating-1t": _median_latency([r for r in runs if r.case == "auditq-1t"]),
        "saturating-4t": _median_latency([r for r in runs if r.case == "auditq-4t"]),
        "writer-asleep": _median_latency([r for r in runs if r.case == "auditq-drain"]),
    }

    harness.reset()
    harness.say(f"frozen server: {cfg.freeze_seconds:g}s of SIGSTOP, GIL holds sampled")
    frozen = harness.frozen()
    gil_holds = frozen.pop("gil_holds", None) or {"skipped": frozen.get("skipped", "n/a")}
    if "latency_ns" in frozen:
        latency["frozen"] = frozen["latency_ns"]
        latency["frozen-control"] = frozen["latency_running_ns"]

    harness.reset()
    harness.say(
        f"overload: {cfg.overload_seconds:g}s offered at {cfg.overload_factor:g}x the ceiling"
    )
    overload = harness.overload(throughput["ceiling"]["median"])

    harness.reset()
    harness.say(f"idle writer: {cfg.idle_seconds:g}s")
    idle = harness.idle()

    busy: dict[str, Any] = {"skipped": "n/a (--no-busy-app)"}
    if cfg.busy_app and cfg.busy_rates:
        harness.say(
            f"busy application: {BUSY_SPINNERS} spinning threads + 1 logging at "
            f"{', '.join(f'{r:,.0f}' for r in sorted(cfg.busy_rates))}/s, "
            f"{cfg.busy_seconds:g}s each, then the control"
        )
        busy = harness.busy_app()

    close: dict[str, Any] = {"skipped": "n/a (--close-runs 0)"}
    if cfg.close_runs > 0:
        harness.say(
            f"close() under fire: {cfg.close_rows:,} rows queued, {CLOSE_THREADS} threads "
            f"calling log(), {cfg.close_runs} run(s)"
        )
        close = harness.close_drains()

    frozen_prefault: dict[str, Any] = {}
    if cfg.frozen_with_prefault:
        harness.reset()
        harness.say(f"frozen server again, with auditq.prefault_memory(): {cfg.freeze_seconds:g}s")
        frozen_prefault = harness.frozen(prefault=True)
        frozen_prefault.pop("gil_holds", None)  # not sampled: see Harness.frozen
        if "latency_ns" in frozen_prefault:
            latency["frozen-prefault"] = frozen_prefault["latency_ns"]
            latency["frozen-prefault-control"] = frozen_prefault["latency_running_ns"]

    machine = machine_info()
    machine["server_version"] = server_version
    settings = {**harness.writer_settings, "checkpoint_between_cases": harness.can_checkpoint}
    return CompareResult(
        config=asdict(cfg),
        machine=machine,
        writer_settings=settings,
        server_owned=server_owned,
        timer_overhead_ns=overhead,
        runs=runs,
        throughput=throughput,
        latency_ns=latency,
        frozen=frozen,
        overload=overload,
        idle=idle,
        seconds=time.perf_counter() - wall,
        frozen_prefault=frozen_prefault,
        gil_holds=gil_holds,
        busy_app=busy,
        close_drain=close,
    )
