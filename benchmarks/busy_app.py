"""The busy application (issue 16): 4 threads of pure-Python work that never call auditq,
plus one thread calling `log()` at a fixed rate. What rate does the writer sustain, and how
long after `log()` is each entry committed?

    python -m benchmarks.busy_app [--rates 25000,50000,...] [--seconds 10] [--dsn DSN]

For each rate, in ascending order, on an emptied table with a fresh writer (default
settings): the 4 spinners start, the producer calls `log()` at that rate for `--seconds`
(paced in bursts of 64, as the harness's frozen case does), then the spinners stop and the
writer is flushed. A rate counts as sustained when nothing was dropped, the producer
reached it (within 2 %), and every entry is in the table.

The lag of an entry is from the start of its `log()` call's burst to the first moment the
writer's `stats().written` covered it (one producer, entries written in order, polled every
2 ms on a sixth thread), measured while the spinners run; p50/p99/max over every 50th
entry. The table's `recorded_at` is not used: its default is the transaction's start, and
a streaming COPY starts before its later rows are logged. With no --dsn, an embedded
PostgreSQL started for the run.
"""

from __future__ import annotations

import argparse
import bisect
import sys
import threading
import time
from array import array
from contextlib import ExitStack
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auditq import AuditWriter
from auditq.benchjob import prepare_table
from auditq.embedded import embedded_postgres
from benchmarks.compare import CompareConfig, Harness, _produce_paced, spinning

SPINNERS = 4
POLL_SECONDS = 0.002
DEFAULT_RATES = "25000,50000,75000,100000,125000,150000,200000"


def _poll(writer: AuditWriter, stop: threading.Event, at: array[int], written: array[int]) -> None:
    clock = time.perf_counter_ns
    while not stop.is_set():
        at.append(clock())
        written.append(writer.stats().written)
        time.sleep(POLL_SECONDS)


def one_rate(harness: Harness, rate: float, seconds: float) -> dict[str, float]:
    harness.reset()
    writer = AuditWriter(harness.dsn, table=harness.cfg.table, schema=harness.cfg.schema)
    capacity = int(rate * seconds * 1.05) + 1_000
    starts = array("q", bytes(8 * capacity))
    costs = array("q", bytes(8 * capacity))
    done = [0]
    stop_producer, stop_poll = threading.Event(), threading.Event()
    polled_at, polled_written = array("q"), array("q")
    poller = threading.Thread(
        target=_poll, args=(writer, stop_poll, polled_at, polled_written), name="poller"
    )
    producer = threading.Thread(
        target=_produce_paced,
        args=(writer.log, rate, stop_producer, starts, costs, done),
        name="producer",
    )
    with spinning(SPINNERS):
        poller.start()
        began = time.perf_counter()
        producer.start()
        time.sleep(seconds)
        stop_producer.set()
        producer.join()
        produced_for = time.perf_counter() - began
        # The lag of the last entries is measured with the spinners still running.
        deadline = time.monotonic() + 30
        while writer.stats().written + writer.stats().dropped_overflow < done[0]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        stop_poll.set()
        poller.join()
    flushed = writer.flush(timeout=60)
    writer.close(timeout=30)
    stats = writer.stats()
    rows, _ = harness.count()
    calls = done[0]
    lags = array("q")
    if not stats.dropped_overflow:
        for n in range(0, calls, 50):
            k = bisect.bisect_right(polled_written, n)  # first poll with written > n
            if k < len(polled_at):
                lags.append(polled_at[k] - starts[n])
    ordered = sorted(lags)

    def mark(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6 if ordered else 0.0

    reached = calls / produced_for
    sustained = (
        flushed
        and stats.dropped_overflow == 0
        and reached >= 0.98 * rate
        and rows == stats.written == calls
    )
    return {
        "reached": reached,
        "dropped": float(stats.dropped_overflow),
        "sustained": float(sustained),
        "lag_p50_ms": mark(0.50),
        "lag_p99_ms": mark(0.99),
        "lag_max_ms": ordered[-1] / 1e6 if ordered else 0.0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.busy_app", description=__doc__)
    parser.add_argument("--rates", default=DEFAULT_RATES, help="log() calls/s to try, ascending")
    parser.add_argument("--seconds", type=float, default=10.0, help="per rate (10)")
    parser.add_argument("--dsn", help="a server whose bench table may be emptied (embedded)")
    parser.add_argument("--keep-going", action="store_true", help="try every rate")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    with ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(embedded_postgres())
        cfg = CompareConfig()
        prepare_table(dsn, cfg.schema, cfg.table)
        harness = Harness(dsn, cfg, server_owned=args.dsn is None, stream=sys.stderr)
        print(
            f"{SPINNERS} spinning threads + 1 thread logging at a fixed rate, "
            f"{args.seconds:g} s per rate, default writer settings",
            flush=True,
        )
        best = 0.0
        best_p99 = 0.0
        for rate in rates:
            r = one_rate(harness, rate, args.seconds)
            print(
                f"{rate:>9,.0f}/s  reached {r['reached']:>9,.0f}/s  dropped {r['dropped']:>9,.0f}"
                f"  lag p50 {r['lag_p50_ms']:>7.1f} ms  p99 {r['lag_p99_ms']:>7.1f} ms"
                f"  max {r['lag_max_ms']:>7.1f} ms  {'sustained' if r['sustained'] else 'NOT'}",
                flush=True,
            )
            if r["sustained"]:
                best, best_p99 = rate, r["lag_p99_ms"]
            elif not args.keep_going:
                break
        print(f"highest rate sustained: {best:,.0f}/s (lag p99 {best_p99:.1f} ms)", flush=True)


if __name__ == "__main__":
    main()
