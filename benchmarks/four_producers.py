"""Where the time goes when 4 threads call `log()` flat out: the CPU each side used.

    python -m benchmarks.four_producers [DSN]   (from the checkout; embedded PostgreSQL without one)

Writer options come from `AUDITQ_*` variables, as `auditq.configure()` reads them (e.g.
`AUDITQ_BATCH_SIZE=200000`); the defaults otherwise.

Four producer threads call `log()` as fast as they can until 200k entries are accepted, and
the writer (default settings) writes them. Printed per run: rows/s, then CPU as a share of
one core over the run, read from /proc (Linux): the writer thread, the whole auditq process,
every `postgres` process on the machine, and the machine's idle time out of 2 cores.

Why: on the 2-core VMs this project is measured on, neither side is saturated in this case.
The process runs Python ~50-75 % of the time with four threads that want to run all the
time, because the GIL passes between five threads and each hand-off wakes a thread and waits
for it. The writer gets the GIL for ~10 % of the time. The server idles while its socket is
empty. Compare `auditq-drain-4spin` in `python -m benchmarks.harness`: four threads that never call
auditq slow the writer even more.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import nullcontext

import psycopg
from psycopg import sql

from auditq import AuditWriter
from auditq.benchjob import metadata_for, timed_log
from auditq.config import options_from_env
from auditq.embedded import embedded_postgres
from auditq.schema import create
from benchmarks.system import writer_thread

ENTRIES = 200_000
THREADS = 4
TABLE = "auditq_four_producers"
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_cpu(path: str) -> float:
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def postgres_cpu() -> float:
    """CPU seconds used so far by every process named postgres (all the server's)."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if not f.read().startswith("postgres"):
                    continue
            total += _stat_cpu(f"/proc/{pid}/stat")
        except OSError:
            continue
    return total


def machine_idle() -> float:
    """Idle + iowait seconds of all CPUs so far."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / TICK


def one_run(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(TABLE)))
    writer = AuditWriter(dsn, **{**options_from_env(), "table": TABLE})
    writer.log("warm-up")  # the thread and its connection, outside the timing
    writer.flush()
    base = writer.stats().calls
    gate = threading.Event()

    def produce() -> None:
        log = writer.log
        gate.wait()
        n = 0
        while writer.stats().accepted - base < ENTRIES:
            for _ in range(1000):
                timed_log(log, metadata_for(n))
                n += 1

    producers = [threading.Thread(target=produce) for _ in range(THREADS)]
    for thread in producers:
        thread.start()
    thread = writer_thread(writer.name)
    assert thread is not None and thread.native_id is not None
    writer_stat = f"/proc/self/task/{thread.native_id}/stat"
    before = (_stat_cpu(writer_stat), time.process_time(), postgres_cpu(), machine_idle())
    started = time.perf_counter()
    gate.set()
    for thread in producers:
        thread.join()
    writer.flush()
    seconds = time.perf_counter() - started
    after = (_stat_cpu(writer_stat), time.process_time(), postgres_cpu(), machine_idle())
    stats = writer.stats()
    writer.close()
    share = [(b - a) / seconds * 100 for a, b in zip(before, after, strict=True)]
    return (
        f"{(stats.written - 1) / seconds:>9,.0f} rows/s  dropped {stats.dropped_overflow:>9,}  "
        f"CPU (% of a core): writer {share[0]:3.0f}  process {share[1]:3.0f}  "
        f"postgres {share[2]:3.0f}  machine idle {share[3]:3.0f} of {100 * (os.cpu_count() or 1)}"
    )


def main() -> None:
    target = nullcontext(sys.argv[1]) if len(sys.argv) > 1 else embedded_postgres()
    with target as dsn:
        create(dsn, table=TABLE, guarded=False)  # emptied with TRUNCATE
        for _ in range(3):
            print(one_run(dsn), flush=True)


if __name__ == "__main__":
    main()
