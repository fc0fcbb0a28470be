"""How long the writer thread holds the GIL, and what a caller pays for it, with the server
frozen (issue 16):

    python -m benchmarks.gil_holds [--runs 3] [--freeze 4] [--rate 20000] [--switch-interval S]

An embedded PostgreSQL (owned by the run, so it may be frozen with SIGSTOP) and a writer
with its default settings. One producer thread calls `log()` at `--rate` calls/s (paced
in bursts of 64, each call timed), as the harness's frozen case does; a sampling thread
sleeps 1 ms at a time and records how late it woke: the time it waited for the GIL, that
is the longest stretch some other thread held it. After one second the server is
stopped for `--freeze` seconds, then continued; the run goes on until the writer has
written the backlog and one more second has passed.

Reported per run, for three windows (before the freeze, while frozen, after the thaw until
the end): the slowest `log()` call and the sampler's longest wait. The producer and the
sampler do almost nothing between their sleeps, so a wait of more than a fraction of a
millisecond is the writer thread's (or the garbage collector's, on whichever thread).

A hold by Python code ends at the switch interval (5 ms by default: the interpreter asks
the holder to let go after that long); a hold by one C call (a loop over a whole batch
without going back to the interpreter) lasts as long as the call. `--switch-interval
0.0005` separates the two: under it, a wait well past 0.5 ms is a C call that cannot be
interrupted. Garbage collections longer than 1 ms are listed too, with their thread: a
full collection is one C call over every tracked object of the process, whichever thread
(the writer, or a caller inside `log()`) allocated the object that set it off.

`--write-timeout 1 --spool` makes the writer's COPY be cut while the server is stopped, so
the failure path (Items cut from the blocks, the rest encoded, retries), the spool (the
batch diverted to disk) and, after the thaw, the replay run too.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auditq import AuditWriter
from auditq.benchjob import prepare_table
from auditq.embedded import embedded_postgres
from benchmarks.compare import CompareConfig, Harness, _produce_paced
from benchmarks.holds import HoldProbe, window_max
from benchmarks.system import ServerFreezer


def one_run(
    harness: Harness, freeze: float, rate: float, options: dict[str, Any]
) -> dict[str, Any]:
    harness.reset()
    writer = AuditWriter(harness.dsn, table=harness.cfg.table, schema=harness.cfg.schema, **options)
    capacity = int(rate * (freeze + 30)) + 10_000
    starts = array("q", bytes(8 * capacity))
    costs = array("q", bytes(8 * capacity))
    stop = threading.Event()
    done = [0]
    freezer = ServerFreezer(harness.dsn)
    producer = threading.Thread(
        target=_produce_paced, args=(writer.log, rate, stop, starts, costs, done), name="producer"
    )
    probe = HoldProbe(writer.name, freeze + 40)
    probe.start()  # before the writer thread exists: it forks its other-process sampler
    producer.start()
    time.sleep(1.0)
    frozen_at = time.perf_counter_ns()
    freezer.freeze()
    try:
        time.sleep(freeze)
    finally:
        freezer.thaw()
    thawed_at = time.perf_counter_ns()
    caught_up = harness.catch_up(writer, thawed_at)
    time.sleep(1.0)
    stop.set()
    producer.join()
    probe.stop()
    end = time.perf_counter_ns()
    flushed = writer.flush(timeout=60)
    writer.close(timeout=30)
    stats = writer.stats()
    rows, _ = harness.count()
    # Spooled rows are replayed by the writer before close() returns, or left for the next.
    assert flushed and stats.calls == done[0] and rows >= stats.written, (stats, rows)
    assert stats.accepted == stats.written + stats.spooled + stats.dead_lettered, stats
    calls = done[0]
    windows = {
        "before": (0, frozen_at),
        "frozen": (frozen_at, thawed_at),
        "after": (thawed_at, end),
    }
    holds = probe.figures(windows, frozen_at)
    out: dict[str, Any] = {"caught_up_s": caught_up, "dropped": float(stats.dropped_overflow)}
    for name, (lo, hi) in windows.items():
        figures = holds["windows"][name]
        out[f"log_max_ms_{name}"] = window_max(starts, costs, calls, lo, hi)
        out[f"hold_max_ms_{name}"] = figures["wait_max_ms"]
        out[f"noise_max_ms_{name}"] = figures["noise_max_ms"]
        out[f"writer_max_ms_{name}"] = figures["writer_max_ms"]
    out["gc_long"] = [(c["ms"], f"gen{c['generation']}", c["thread"]) for c in holds["gc_long"]]
    out["top_holds"] = [(h["ms"], h["at_s"]) for h in holds["top_writer_holds"]]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gil_holds", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--freeze", type=float, default=4.0, help="seconds of SIGSTOP (4)")
    parser.add_argument("--rate", type=float, default=20_000.0, help="log() calls/s (20000)")
    parser.add_argument(
        "--switch-interval", type=float, default=None, help="sys.setswitchinterval for the run"
    )
    parser.add_argument(
        "--write-timeout",
        type=float,
        default=None,
        help="the writer's write_timeout: below --freeze, the COPY in flight is cut while "
        "the server is stopped, so the failure path (retries, splits) runs",
    )
    parser.add_argument(
        "--spool",
        action="store_true",
        help="give the writer a spool (spool_after=1): the spool path runs while frozen",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() once everything is imported: what an application can do about "
        "full collections (they then skip every object made before)",
    )
    args = parser.parse_args(argv)
    options: dict[str, Any] = {}
    if args.write_timeout is not None:
        options["write_timeout"] = args.write_timeout
        options["connect_timeout"] = args.write_timeout
    spool = tempfile.TemporaryDirectory(prefix="auditq-gil-") if args.spool else None
    if spool is not None:
        options["spool_dir"] = spool.name
        options["spool_after"] = 1.0
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    print(
        f"switch interval {sys.getswitchinterval() * 1e3:g} ms, {args.rate:,.0f} calls/s, "
        f"{args.freeze:g} s frozen",
        flush=True,
    )
    with embedded_postgres() as dsn:
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
        cfg = CompareConfig()
        prepare_table(dsn, cfg.schema, cfg.table)
        harness = Harness(dsn, cfg, server_owned=True, stream=sys.stderr)
        print(
            f"{'run':>3}  {'slowest log() ms':>28}  {'longest GIL wait (sampler) ms':>30}"
            f"  {'same, other process (noise)':>28}  {'of it, writer CPU':>28}  {'caught up':>9}"
            "  top writer holds (ms, s after freeze)  garbage collections > 1 ms",
            flush=True,
        )
        head = "before frozen  after"
        print(f"{'':>3}  {head:>28}  {head:>30}  {head:>28}  {head:>28}", flush=True)
        for run in range(1, args.runs + 1):
            r = one_run(harness, args.freeze, args.rate, options)
            print(
                f"{run:>3}  {r['log_max_ms_before']:>8.2f} {r['log_max_ms_frozen']:>7.2f} "
                f"{r['log_max_ms_after']:>7.2f}    {r['hold_max_ms_before']:>10.2f} "
                f"{r['hold_max_ms_frozen']:>7.2f} {r['hold_max_ms_after']:>7.2f}"
                f"    {r['noise_max_ms_before']:>8.2f} {r['noise_max_ms_frozen']:>7.2f} "
                f"{r['noise_max_ms_after']:>7.2f}    {r['writer_max_ms_before']:>8.2f} "
                f"{r['writer_max_ms_frozen']:>7.2f} {r['writer_max_ms_after']:>7.2f}"
                f"  {r['caught_up_s']:>8.2f}s  {r['top_holds']}"
                f"  longest collections: {r['gc_long']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
