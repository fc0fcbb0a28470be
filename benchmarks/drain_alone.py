"""How fast the writer drains with no caller competing for the GIL.

Fills a queue of 200k typical entries while the writer sleeps, then times `flush()`.
Run: python benchmarks/drain_alone.py  (embedded PostgreSQL; or pass a DSN as argument).
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext

from auditq import AuditWriter
from auditq.bench.run import metadata_for, timed_log
from auditq.embedded import embedded_postgres
from auditq.schema import create

ENTRIES = 200_000


def main() -> None:
    target = nullcontext(sys.argv[1]) if len(sys.argv) > 1 else embedded_postgres()
    with target as dsn:
        create(dsn, table="auditq_drain")
        for _ in range(3):
            writer = AuditWriter(
                dsn, table="auditq_drain", max_queue=ENTRIES * 2, flush_interval=3600
            )
            writer._wake_every = writer._buffer._batch_size = 10**9  # keep it asleep
            for n in range(ENTRIES):
                timed_log(writer.log, metadata_for(n))
            started = time.perf_counter()
            writer.flush()
            seconds = time.perf_counter() - started
            print(f"drain alone: {writer.stats().written / seconds:,.0f} rows/s")
            writer.close()


if __name__ == "__main__":
    main()
