"""`auditq bench`: push N entries from K producer threads through a real writer and account
for every one of them against `count(*)` in the database.

The figures: accepted / written / dropped, the deepest the queue got, entries per second (first
call until `flush()` returned and the table agrees), and the caller's per-call `log()` latency.

By default the producers are paced at a rate a writer sustains on a small machine, so the run
shows the writer keeping up, as it should in service. `rate=0` (`--flat-out`) offers entries as
fast as the callers can make them: more than any writer writes, so the queue fills and `log()`
refuses entries (counted drops, by design). The comparison harness (ceilings, alternatives,
frozen server, overload) lives in the repository's `benchmarks/`, not in the package.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import textwrap
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import psycopg

from .config import DEFAULT_BATCH_SIZE
from .dsn import Dsn
from .schema import create, qualified, regclass_text
from .stats import WriterStats
from .writer import AuditWriter

_USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"


#: The default pace, calls/s over all producers. A writer on a 2-core VM writes several times
#: this (benchmarks/README.md), and a full queue (100,000) would absorb it for seconds more: a
#: first run shows keeping up, not overload, on any machine one would run auditq on.
DEFAULT_RATE = 50_000.0
#: A paced producer sleeps after this many calls: the first call after a sleep pays for the
#: thread waking (tens of µs, not auditq's cost), so those calls are few and reported apart.
PACING_BURST = 500


@dataclass
class BenchConfig:
    entries: int = 200_000
    threads: int = 1
    rate: float = DEFAULT_RATE  # calls/s over all threads; 0 = flat out
    batch_size: int = DEFAULT_BATCH_SIZE
    max_queue: int = 100_000
    flush_interval: float = 1.0
    table: str = "auditq_bench"
    schema: str = "public"
    metadata: bool = True
    progress: bool = True


@dataclass
class BenchResult:
    config: dict[str, Any]
    calls: int
    accepted: int
    written: int
    dropped_overflow: int
    rejected: int
    dead_lettered: int
    rows_in_table: int
    distinct_ids: int
    seconds: float
    enqueue_seconds: float
    entries_per_second: float
    #: Calls per second the producers made (the pace when paced; all they could when not).
    offered_per_second: float
    #: The most entries waiting in the queue at once (sampled every 50 ms).
    peak_pending: int
    #: `log()` durations, the first call after each pacing sleep left out (reported apart).
    latency_ns: dict[str, float]
    latency_after_sleep_ns: dict[str, float]
    calls_after_sleep: int
    timer_overhead_ns: float
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def kept_up(self) -> bool:
        """Nothing refused: the queue absorbed whatever the writer had not written yet."""
        return self.dropped_overflow == 0

    @property
    def consistent(self) -> bool:
        """Every accepted entry committed and counted in the table, and nothing else."""
        return (
            self.rows_in_table == self.written == self.distinct_ids
            and self.accepted == self.written + self.dead_lettered
            and self.calls == self.accepted + self.dropped_overflow + self.rejected
        )


def machine_info() -> dict[str, Any]:
    import psycopg_pool
    import pydantic

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "psycopg": psycopg.__version__,
        "psycopg_impl": psycopg.pq.__impl__,
        "psycopg_pool": psycopg_pool.__version__,
        "pydantic": pydantic.__version__,
        "switch_interval_s": sys.getswitchinterval(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


#: The comment `prepare_table` puts on a table it creates: the bench empties only such a
#: table, or one that is already empty.
BENCH_MARK = "auditq bench scratch table: emptied before each run"


class NotBenchTable(Exception):
    """The table holds rows the bench did not write: it will not empty it."""


def prepare_table(dsn: str, schema: str, table: str) -> str:
    """Create the bench table if needed and empty it; returns the server version.

    It TRUNCATEs, so it refuses a table it did not make that holds rows: `--table` naming
    the application's audit table must never cost its rows."""
    target = qualified(schema, table)
    with psycopg.connect(dsn, autocommit=True) as conn:
        name = regclass_text(schema, table)
        found = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL, obj_description(to_regclass(%s), 'pg_class')",
            (name, name),
        ).fetchone()
        exists, ours = bool(found and found[0]), bool(found and found[1] == BENCH_MARK)
        if exists and not ours:
            rows = conn.execute(psycopg.sql.SQL("SELECT EXISTS (SELECT FROM {})").format(target))
            held = rows.fetchone()
            if held and held[0]:
                raise NotBenchTable(
                    f"{schema}.{table} holds rows the bench did not write; it empties its "
                    "table before each run, so pick another --table"
                )
    if not exists:
        create(dsn, schema=schema, table=table, guarded=False)  # emptied by the next run
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not exists:
            mark = psycopg.sql.Literal(BENCH_MARK)
            conn.execute(psycopg.sql.SQL("COMMENT ON TABLE {} IS {}").format(target, mark))
        elif ours:
            conn.execute(psycopg.sql.SQL("TRUNCATE {}").format(target))
        version = conn.execute("SHOW server_version").fetchone()
    return str(version[0]) if version else "?"


def percentiles(samples: array[int], marks: tuple[float, ...]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)
    last = len(ordered) - 1
    out = {f"p{m:g}": float(ordered[min(last, round(m / 100 * last))]) for m in marks}
    out["max"] = float(ordered[-1])
    out["mean"] = sum(ordered) / len(ordered)
    return out


def timer_overhead_ns() -> float:
    """The median cost of the two perf_counter_ns() calls that bracket each measured call."""
    clock = time.perf_counter_ns
    samples = array("q", bytes(8 * 20_000))
    for i in range(20_000):
        start = clock()
        samples[i] = clock() - start
    return float(sorted(samples)[10_000])


def metadata_for(n: int) -> dict[str, Any]:
    """The metadata of the n-th bench entry (built outside the timed call)."""
    return {"seq": n, "path": "/api/documents"}


#: A typical entry's fields from `action` to `request_id`, in `auditq.entry.Row` order (what
#: `timed_log` passes by keyword), for scripts that build rows without calling `log()`.
TYPICAL_FIELDS: tuple[str, ...] = (
    "document.read",
    "tenant-42",
    "user-1234",
    "user",
    "document",
    "doc-9",
    "success",
    "203.0.113.7",
    _USER_AGENT,
    "req-0001",
)


def timed_log(log: Callable[..., bool], metadata: dict[str, Any] | None) -> int:
    """One typical audit entry through `log`; returns the call's duration in ns."""
    clock = time.perf_counter_ns
    t0 = clock()
    log(
        "document.read",
        tenant_id="tenant-42",
        actor_id="user-1234",
        actor_type="user",
        resource_type="document",
        resource_id="doc-9",
        outcome="success",
        ip="203.0.113.7",
        user_agent=_USER_AGENT,
        request_id="req-0001",
        metadata=metadata,
    )
    return clock() - t0


def _producer(
    log: Callable[..., bool],
    count: int,
    offset: int,
    rate: float,
    metadata: bool,
    out: array[int],
    woke: array[int],
    start_gate: threading.Event,
) -> None:
    clock = time.perf_counter_ns
    interval_ns = 1e9 / rate if rate > 0 else 0.0
    start_gate.wait()
    began = clock()
    slept = False
    for i in range(count):
        if interval_ns and i % PACING_BURST == 0:
            ahead = began + i * interval_ns - clock()
            if ahead > 200_000:  # sleep only for gaps worth a syscall
                time.sleep(ahead / 1e9)
                slept = True
        out[i] = timed_log(log, metadata_for(offset + i) if metadata else None)
        if slept:
            woke[i] = 1
            slept = False


class _Monitor:
    """Samples the writer's queue depth every 50 ms (its peak is the "kept up" figure), and
    draws a progress line now and then when asked to. Not more often: each sample takes the
    GIL from the producers and the writer being measured."""

    def __init__(self, writer: AuditWriter, total: int, stream: TextIO | None) -> None:
        self.peak_pending = 0
        self._writer = writer
        self._total = total
        self._stream = stream
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auditq-bench-monitor", daemon=True)

    def __enter__(self) -> _Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        stream = self._stream
        tty = stream is not None and stream.isatty()
        every = 0.5 if tty else 2.0
        started = last = time.monotonic()
        while not self._done.wait(0.05):
            s = self._writer.stats()
            self.peak_pending = max(self.peak_pending, s.pending)
            now = time.monotonic()
            if stream is None or now - last < every:
                continue
            last = now
            elapsed = now - started
            line = (
                f"  {elapsed:6.1f}s  calls {s.calls:>9,}/{self._total:,}  written {s.written:>9,}"
                f"  queued {s.pending:>7,}  dropped {s.dropped_overflow:>7,}"
                f"  ({s.written / elapsed if elapsed else 0:,.0f}/s)"
            )
            stream.write(("\r" + line) if tty else (line + "\n"))
            stream.flush()
        if tty and stream is not None:
            stream.write("\n")


def run_bench(dsn: str, cfg: BenchConfig, *, stream: TextIO = sys.stderr) -> BenchResult:
    """Run one bench against `dsn` and check every figure against the table."""
    server_version = prepare_table(dsn, cfg.schema, cfg.table)
    overhead = timer_overhead_ns()
    writer = AuditWriter(
        dsn,
        table=cfg.table,
        schema=cfg.schema,
        batch_size=cfg.batch_size,
        max_queue=cfg.max_queue,
        flush_interval=cfg.flush_interval,
    )
    per_thread = [cfg.entries // cfg.threads] * cfg.threads
    per_thread[0] += cfg.entries - sum(per_thread)
    samples = [array("q", bytes(8 * n)) for n in per_thread]
    woke = [array("b", bytes(n)) for n in per_thread]
    gate = threading.Event()
    threads = [
        threading.Thread(
            target=_producer,
            args=(
                writer.log,
                n,
                sum(per_thread[:k]),
                cfg.rate / cfg.threads,
                cfg.metadata,
                samples[k],
                woke[k],
                gate,
            ),
            name=f"producer-{k}",
        )
        for k, n in enumerate(per_thread)
    ]
    for thread in threads:
        thread.start()
    with _Monitor(writer, cfg.entries, stream if cfg.progress else None) as monitor:
        started = time.perf_counter()
        gate.set()
        for thread in threads:
            thread.join()
        enqueue_seconds = time.perf_counter() - started
        writer.flush(timeout=600)
        seconds = time.perf_counter() - started
    writer.close(timeout=30)
    stats: WriterStats = writer.stats()
    rows = _count(dsn, cfg.schema, cfg.table)
    steady, after_sleep = array("q"), array("q")
    for part, flags in zip(samples, woke, strict=True):
        for cost, flag in zip(part, flags, strict=True):
            (after_sleep if flag else steady).append(cost)
    machine = machine_info()
    machine["server_version"] = server_version
    return BenchResult(
        config=asdict(cfg),
        calls=stats.calls,
        accepted=stats.accepted,
        written=stats.written,
        dropped_overflow=stats.dropped_overflow,
        rejected=stats.rejected,
        dead_lettered=stats.dead_lettered,
        rows_in_table=rows[0],
        distinct_ids=rows[1],
        seconds=seconds,
        enqueue_seconds=enqueue_seconds,
        entries_per_second=stats.written / seconds if seconds else 0.0,
        offered_per_second=stats.calls / enqueue_seconds if enqueue_seconds else 0.0,
        # A drop means the queue was full, whether or not a sample caught it.
        peak_pending=cfg.max_queue if stats.dropped_overflow else monitor.peak_pending,
        latency_ns=percentiles(steady, (50, 99, 99.9)),
        latency_after_sleep_ns=percentiles(after_sleep, (50, 99)),
        calls_after_sleep=len(after_sleep),
        timer_overhead_ns=overhead,
        machine=machine,
    )


def _count(dsn: str, schema: str, table: str) -> tuple[int, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            psycopg.sql.SQL("SELECT count(*), count(DISTINCT id) FROM {}").format(
                qualified(schema, table)
            )
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


#: What a drop is, printed with every result.
DROP_MEANING = (
    "log() returned False because max_queue entries were already waiting: the entry was "
    "counted (stats().dropped_overflow) and not written, and the caller was not blocked. "
    "Callers see drops when they log faster than the writer writes for longer than the queue "
    "absorbs; a writer that keeps up never drops."
)


def _line(label: str, text: str) -> str:
    """One labelled figure, wrapped under its label."""
    return textwrap.fill(
        text, width=100, initial_indent=f"  {label:<12}", subsequent_indent=" " * 14
    )


def format_result(result: BenchResult, target: str) -> str:
    lat = result.latency_ns
    cfg = result.config
    paced = bool(cfg["rate"])
    mode = f"paced at {cfg['rate']:,.0f}/s" if paced else "flat out (as fast as they can)"
    m = result.machine
    if result.kept_up:
        verdict = (
            f"yes: nothing dropped; the queue held at most {result.peak_pending:,} of "
            f"{cfg['max_queue']:,} entries, and the last entry was in the table "
            f"{result.seconds - result.enqueue_seconds:.2f}s after the last call"
        )
    else:
        verdict = (
            f"no: callers offered {result.offered_per_second:,.0f}/s, more than the writer "
            f"wrote; the queue filled ({cfg['max_queue']:,}) and "
            f"{result.dropped_overflow:,} calls were refused"
            + (" (what --flat-out shows: overload, by design)" if not paced else "")
        )
    written = f"{result.entries_per_second:,.0f} entries/s written"
    if not paced:
        written += f"; callers offered {result.offered_per_second:,.0f}/s"
    elif result.kept_up:
        written += f", as offered ({cfg['rate']:,.0f}/s); the writer's own limit: --flat-out"
    else:
        written += f" of {cfg['rate']:,.0f}/s offered"
    written += f" ({result.seconds:.2f}s end to end; callers done in {result.enqueue_seconds:.2f}s)"
    latency = (
        f"p50 {lat.get('p50', 0) / 1000:.2f} µs, p99 {lat.get('p99', 0) / 1000:.2f} µs, "
        f"p99.9 {lat.get('p99.9', 0) / 1000:.2f} µs, max {lat.get('max', 0) / 1e6:.2f} ms "
        f"(timer overhead {result.timer_overhead_ns:.0f} ns included)"
    )
    if result.calls_after_sleep:
        latency += (
            f"; the {result.calls_after_sleep:,} first calls after a pacing sleep apart "
            f"(the thread waking up): p50 "
            f"{result.latency_after_sleep_ns.get('p50', 0) / 1000:.2f} µs"
        )
    lines = [
        f"auditq bench: {result.calls:,} calls from {cfg['threads']} thread(s), {mode}",
        _line("target", f"{target} (PostgreSQL {m.get('server_version', '?')})"),
        _line(
            "machine",
            f"{m.get('cpus')} cpus, {m.get('cpu', m.get('machine'))}, Python "
            f"{m.get('python')}, psycopg {m.get('psycopg')} ({m.get('psycopg_impl')})",
        ),
        _line(
            "settings",
            f"batch_size={cfg['batch_size']:,} max_queue={cfg['max_queue']:,} "
            f"flush_interval={cfg['flush_interval']}s",
        ),
        f"  accepted    {result.accepted:>10,}",
        f"  written     {result.written:>10,}   rows in table {result.rows_in_table:,} "
        f"(distinct ids {result.distinct_ids:,})",
        f"  dropped     {result.dropped_overflow:>10,}   (refused at the call: queue full)",
        f"  rejected    {result.rejected:>10,}   dead-lettered {result.dead_lettered:,}",
        _line("kept up", verdict),
        _line("throughput", written),
        _line("log() call", latency),
        _line(
            "accounting",
            f"{'OK' if result.consistent else 'MISMATCH'}: written == rows in table == "
            "distinct ids; accepted == written + dead-lettered; "
            "calls == accepted + dropped + rejected",
        ),
        _line("a drop", DROP_MEANING),
    ]
    return "\n".join(lines)


def write_json(result: BenchResult, path: str, target: Dsn | str) -> None:
    payload = asdict(result)
    payload["target"] = str(target)
    payload["consistent"] = result.consistent
    payload["kept_up"] = result.kept_up
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
