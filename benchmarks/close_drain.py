"""close() under fire (issue 16): how long a writer takes to drain 50,000 queued rows while
8 threads keep calling `log()` flat out, every call refused because the writer is closing.

    python -m benchmarks.close_drain [--runs 3] [--dsn DSN] [--batch-size 1000]

The writer (`batch_size` 1000 by default, as in the issue's report) sleeps while 50,000
rows are queued (no wake-up by count or by time), then 8 threads start calling `log()` as
fast as they can and `close(timeout=10)` is timed. Reported per run: the seconds close()
took, what it wrote and dead-lettered, the calls the 8 threads made while it ran, and
whether the accounting holds (`calls == accepted + dropped + rejected`,
`accepted == written + dead_lettered`, the table's count). With no --dsn, an embedded
PostgreSQL started for the run.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auditq import AuditWriter
from auditq.benchjob import prepare_table
from auditq.embedded import embedded_postgres
from benchmarks.compare import CompareConfig, Harness

QUEUED = 50_000
HAMMERS = 8


def _hammer(log: object, stop: threading.Event, calls: list[int], k: int) -> None:
    n = 0
    call = log  # a bound log(): looked up once, as a hot loop would
    while not stop.is_set():
        for _ in range(100):
            call("bench.closing", tenant_id="t", actor_id="a")  # type: ignore[operator]
        n += 100
    calls[k] = n


def one_run(harness: Harness, batch_size: int, timeout: float) -> dict[str, float]:
    harness.reset()
    writer = AuditWriter(
        harness.dsn,
        table=harness.cfg.table,
        schema=harness.cfg.schema,
        batch_size=batch_size,
        max_queue=QUEUED,
        wake_rows=QUEUED + 1,
        flush_interval=3600,
    )
    for n in range(QUEUED):
        writer.log("bench.queued", tenant_id="t", actor_id=f"a{n}", resource_id=str(n))
    time.sleep(0.5)  # the writer thread is up and connected, asleep
    stop = threading.Event()
    calls = [0] * HAMMERS
    hammers = [
        threading.Thread(target=_hammer, args=(writer.log, stop, calls, k), name=f"hammer-{k}")
        for k in range(HAMMERS)
    ]
    for thread in hammers:
        thread.start()
    started = time.perf_counter()
    clean = writer.close(timeout=timeout)
    seconds = time.perf_counter() - started
    stop.set()
    for thread in hammers:
        thread.join()
    stats = writer.stats()
    rows, _ = harness.count()
    exact = (
        stats.calls == QUEUED + sum(calls)
        and stats.accepted == stats.written + stats.dead_lettered + stats.spooled
        and rows == stats.written
    )
    return {
        "seconds": seconds,
        "clean": float(clean),
        "written": float(stats.written),
        "dead": float(stats.dead_lettered),
        "refused": float(stats.rejected + stats.dropped_overflow),
        "exact": float(exact),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.close_drain", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dsn", help="a server whose bench table may be emptied (embedded)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=10.0, help="close()'s timeout (10)")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(embedded_postgres())
        cfg = CompareConfig()
        prepare_table(dsn, cfg.schema, cfg.table)
        harness = Harness(dsn, cfg, server_owned=args.dsn is None, stream=sys.stderr)
        print(
            f"{QUEUED:,} rows queued, batch_size {args.batch_size:,}, {HAMMERS} threads "
            f"calling log() flat out during close(timeout={args.timeout:g})",
            flush=True,
        )
        for run in range(1, args.runs + 1):
            r = one_run(harness, args.batch_size, args.timeout)
            print(
                f"run {run}: close() {r['seconds']:6.2f} s  returned {bool(r['clean'])!s:5}  "
                f"written {r['written']:>8,.0f}  dead-lettered {r['dead']:>6,.0f}  "
                f"refused calls meanwhile {r['refused']:>11,.0f}  "
                f"accounting {'exact' if r['exact'] else 'MISMATCH'}",
                flush=True,
            )


if __name__ == "__main__":
    main()
