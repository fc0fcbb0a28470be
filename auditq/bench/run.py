"""`auditq bench`: push N entries from K producer threads through a real writer and account
for every one of them against `count(*)` in the database.

The figures: accepted / written / dropped, end-to-end entries per second (first call until
`flush()` returned and the table agrees), and the caller's per-call `log()` latency.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import psycopg

from ..dsn import Dsn
from ..entry import Row, dump_metadata
from ..schema import create, qualified
from ..stats import WriterStats
from ..writer import DEFAULT_BATCH_SIZE, AuditWriter

_USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"


@dataclass
class BenchConfig:
    entries: int = 200_000
    threads: int = 1
    rate: float = 0.0  # entries/s over all threads; 0 = as fast as possible
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
    latency_ns: dict[str, float]
    timer_overhead_ns: float
    machine: dict[str, Any] = field(default_factory=dict)

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


def prepare_table(dsn: str, schema: str, table: str) -> str:
    """Create the bench table if needed and empty it; returns the server version."""
    create(dsn, schema=schema, table=table, guarded=False)  # emptied with TRUNCATE
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("TRUNCATE {}").format(qualified(schema, table)))
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


#: A typical entry's fields from `action` to `request_id`, in Row order (what `timed_log`
#: passes by keyword).
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


def typical_row(n: int) -> Row:
    """The n-th typical entry as the queue holds it (what `timed_log` logs), for the cases
    and scripts that encode rows without calling `log()`."""
    return (None, time.time_ns(), *TYPICAL_FIELDS, dump_metadata(metadata_for(n)))


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
    writer: AuditWriter,
    count: int,
    offset: int,
    rate: float,
    metadata: bool,
    out: array[int],
    start_gate: threading.Event,
) -> None:
    log = writer.log
    clock = time.perf_counter_ns
    interval_ns = int(1e9 / rate) if rate > 0 else 0
    start_gate.wait()
    began = clock()
    for i in range(count):
        if interval_ns:
            due = began + i * interval_ns
            now = clock()
            if due > now + 200_000:  # sleep only for gaps worth a syscall
                time.sleep((due - now) / 1e9)
        n = offset + i
        out[i] = timed_log(log, metadata_for(n) if metadata else None)


def _progress(writer: AuditWriter, total: int, done: threading.Event, stream: TextIO) -> None:
    tty = stream.isatty()
    started = time.monotonic()
    while not done.wait(0.5 if tty else 2.0):
        s = writer.stats()
        elapsed = time.monotonic() - started
        line = (
            f"  {elapsed:6.1f}s  calls {s.calls:>9,}/{total:,}  written {s.written:>9,}  "
            f"queued {s.pending:>7,}  dropped {s.dropped_overflow:>7,}  "
            f"({s.written / elapsed if elapsed else 0:,.0f}/s)"
        )
        stream.write(("\r" + line) if tty else (line + "\n"))
        stream.flush()
    if tty:
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
    gate = threading.Event()
    threads = [
        threading.Thread(
            target=_producer,
            args=(
                writer,
                n,
                sum(per_thread[:k]),
                cfg.rate / cfg.threads,
                cfg.metadata,
                samples[k],
                gate,
            ),
            name=f"producer-{k}",
        )
        for k, n in enumerate(per_thread)
    ]
    for thread in threads:
        thread.start()
    done = threading.Event()
    reporter = None
    if cfg.progress:
        reporter = threading.Thread(
            target=_progress, args=(writer, cfg.entries, done, stream), daemon=True
        )
        reporter.start()
    started = time.perf_counter()
    gate.set()
    for thread in threads:
        thread.join()
    enqueue_seconds = time.perf_counter() - started
    writer.flush(timeout=600)
    seconds = time.perf_counter() - started
    done.set()
    if reporter is not None:
        reporter.join()
    writer.close(timeout=30)
    stats: WriterStats = writer.stats()
    rows = _count(dsn, cfg.schema, cfg.table)
    merged = array("q")
    for part in samples:
        merged.extend(part)
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
        latency_ns=percentiles(merged, (50, 99, 99.9)),
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


def format_result(result: BenchResult, target: str) -> str:
    lat = result.latency_ns
    cfg = result.config
    mode = f"paced at {cfg['rate']:,.0f}/s" if cfg["rate"] else "as fast as possible"
    m = result.machine
    lines = [
        f"auditq bench: {result.calls:,} calls from {cfg['threads']} thread(s), {mode}",
        f"  target      {target} (PostgreSQL {m.get('server_version', '?')})",
        f"  machine     {m.get('cpus')} cpus, {m.get('cpu', m.get('machine'))}, "
        f"Python {m.get('python')}, psycopg {m.get('psycopg')} ({m.get('psycopg_impl')})",
        f"  settings    batch_size={cfg['batch_size']:,} max_queue={cfg['max_queue']:,} "
        f"flush_interval={cfg['flush_interval']}s",
        f"  accepted    {result.accepted:>10,}",
        f"  written     {result.written:>10,}   rows in table {result.rows_in_table:,} "
        f"(distinct ids {result.distinct_ids:,})",
        f"  dropped     {result.dropped_overflow:>10,}   (queue full)",
        f"  rejected    {result.rejected:>10,}   dead-lettered {result.dead_lettered:,}",
        f"  throughput  {result.entries_per_second:>10,.0f} entries/s written "
        f"({result.seconds:.2f}s end to end; callers done in {result.enqueue_seconds:.2f}s)",
        f"  log() latency  p50 {lat.get('p50', 0) / 1000:.2f} µs"
        f"   p99 {lat.get('p99', 0) / 1000:.2f} µs"
        f"   p99.9 {lat.get('p99.9', 0) / 1000:.2f} µs   max {lat.get('max', 0) / 1e6:.2f} ms"
        f"   (timer overhead {result.timer_overhead_ns:.0f} ns included)",
        f"  accounting  {'OK' if result.consistent else 'MISMATCH'}: "
        "written == rows in table == distinct ids; accepted == written + dead-lettered; "
        "calls == accepted + dropped + rejected",
    ]
    return "\n".join(lines)


def write_json(result: BenchResult, path: str, target: Dsn | str) -> None:
    payload = asdict(result)
    payload["target"] = str(target)
    payload["consistent"] = result.consistent
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
