"""How fast the writer drains with no caller competing for the GIL, and the CPU its thread
spends per row (Linux: read from /proc for the writer thread alone).

Fills a queue of 200k typical entries while the writer sleeps, then times `flush()`.
Run from the checkout: python -m benchmarks.drain_alone [DSN]  (embedded PostgreSQL without one).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import nullcontext

from auditq import AuditWriter
from auditq.benchjob import metadata_for, timed_log
from auditq.embedded import embedded_postgres
from auditq.schema import create
from benchmarks.system import writer_thread

ENTRIES = 200_000


def thread_cpu_seconds(thread: threading.Thread | None) -> float | None:
    """User + system CPU of one thread of this process, or None where /proc cannot tell."""
    if thread is None or thread.native_id is None:
        return None
    try:
        with open(f"/proc/self/task/{thread.native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    target = nullcontext(sys.argv[1]) if len(sys.argv) > 1 else embedded_postgres()
    with target as dsn:
        create(dsn, table="auditq_drain")
        for _ in range(3):
            # Asleep while the queue fills: no wake-up by count, none by time.
            writer = AuditWriter(
                dsn,
                table="auditq_drain",
                max_queue=ENTRIES * 2,
                wake_rows=ENTRIES * 2,
                flush_interval=3600,
            )
            for n in range(ENTRIES):
                timed_log(writer.log, metadata_for(n))
            thread = writer_thread(writer.name)
            cpu_before = thread_cpu_seconds(thread)
            started = time.perf_counter()
            writer.flush()
            seconds = time.perf_counter() - started
            cpu_after = thread_cpu_seconds(thread)
            written = writer.stats().written
            line = f"drain alone: {written / seconds:,.0f} rows/s"
            if cpu_before is not None and cpu_after is not None and written:
                per_row = (cpu_after - cpu_before) / written * 1e6
                line += f", writer thread CPU {per_row:.2f} µs a row"
            print(line)
            writer.close()


if __name__ == "__main__":
    main()
