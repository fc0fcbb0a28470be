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
import multiprocessing
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
from benchmarks.system import ServerFreezer, writer_thread

SAMPLE_SECONDS = 0.001


def _sample(
    stop: threading.Event,
    at: array[int],
    late: array[int],
    done: list[int],
    writer_cpu: array[int] | None = None,
    writer_name: str | None = None,
) -> None:
    """Sleep 1 ms at a time; record when each sleep began and how late it ended (ns), and,
    given a writer's name, how much CPU its thread used meanwhile (`writer_cpu`): on a
    shared machine a late wake-up may be the scheduler's, but the writer's CPU time in that
    window is what it can have held the GIL for."""
    clock = time.perf_counter_ns
    want = int(SAMPLE_SECONDS * 1e9)
    clock_id: int | None = None
    n = 0
    cpu0 = 0
    while not stop.is_set() and n < len(at):
        if writer_cpu is not None and clock_id is None and writer_name is not None:
            thread = writer_thread(writer_name)
            if thread is not None and thread.ident is not None:
                clock_id = time.pthread_getcpuclockid(thread.ident)
        if clock_id is not None:
            cpu0 = time.clock_gettime_ns(clock_id)
        t0 = clock()
        time.sleep(SAMPLE_SECONDS)
        t1 = clock()
        at[n] = t0
        late[n] = t1 - t0 - want
        if clock_id is not None and writer_cpu is not None:
            try:
                writer_cpu[n] = time.clock_gettime_ns(clock_id) - cpu0
            except OSError:  # the writer thread ended
                clock_id = None
        n += 1
    done[0] = n


class _Collections:
    """Garbage collections longer than 1 ms, with the thread they ran on (`gc.callbacks`):
    a collection holds the GIL for all of its time, on whichever thread allocated last."""

    def __init__(self) -> None:
        self.long: list[tuple[float, int, str, int]] = []  # (ms, generation, thread, at)
        self._began: dict[int, int] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter_ns()
        ident = threading.get_ident()
        if phase == "start":
            self._began[ident] = now
            return
        took = (now - self._began.pop(ident, now)) / 1e6
        if took > 1.0:
            name = threading.current_thread().name
            self.long.append((took, info["generation"], name, now))


def _control(stop: object, conn: object, seconds: float) -> None:
    """The same sampler in a process of its own, which shares no GIL: how late a 1 ms
    sleep ends on this machine anyway (the scheduler, other processes), the noise floor."""
    at = array("q", bytes(8 * int(seconds / SAMPLE_SECONDS)))
    late = array("q", bytes(8 * len(at)))
    done = [0]
    _sample(stop, at, late, done)  # type: ignore[arg-type]
    conn.send((at[: done[0]].tobytes(), late[: done[0]].tobytes()))  # type: ignore[attr-defined]


def _window_max(at: array[int], values: array[int], count: int, lo: int, hi: int) -> float:
    best = 0
    for i in range(count):
        if lo <= at[i] < hi and values[i] > best:
            best = values[i]
    return best / 1e6


def one_run(
    harness: Harness, freeze: float, rate: float, options: dict[str, Any]
) -> dict[str, float]:
    harness.reset()
    writer = AuditWriter(harness.dsn, table=harness.cfg.table, schema=harness.cfg.schema, **options)
    capacity = int(rate * (freeze + 30)) + 10_000
    starts = array("q", bytes(8 * capacity))
    costs = array("q", bytes(8 * capacity))
    stop = threading.Event()
    done = [0]
    samples = int((freeze + 40) / SAMPLE_SECONDS)
    at = array("q", bytes(8 * samples))
    late = array("q", bytes(8 * samples))
    writer_cpu = array("q", bytes(8 * samples))
    sampled = [0]
    freezer = ServerFreezer(harness.dsn)
    producer = threading.Thread(
        target=_produce_paced, args=(writer.log, rate, stop, starts, costs, done), name="producer"
    )
    sampler = threading.Thread(
        target=_sample, args=(stop, at, late, sampled, writer_cpu, writer.name), name="sampler"
    )
    control_stop = multiprocessing.Event()
    receive, send = multiprocessing.Pipe(duplex=False)
    control = multiprocessing.Process(
        target=_control, args=(control_stop, send, freeze + 40), daemon=True
    )
    control.start()
    collections = _Collections()
    gc.callbacks.append(collections)
    sampler.start()
    producer.start()
    time.sleep(1.0)
    frozen_at = time.perf_counter_ns()
    freezer.freeze()
    try:
        time.sleep(freeze)
    finally:
        freezer.thaw()
    thawed_at = time.perf_counter_ns()
    # Until the backlog is written (pending back to a batch's worth), then one second more.
    deadline = time.monotonic() + 30
    while writer.stats().pending > 5_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    caught_up = (time.perf_counter_ns() - thawed_at) / 1e9
    time.sleep(1.0)
    stop.set()
    producer.join()
    sampler.join()
    end = time.perf_counter_ns()
    gc.callbacks.remove(collections)
    control_stop.set()
    control_at, control_late = array("q"), array("q")
    raw_at, raw_late = receive.recv()
    control_at.frombytes(raw_at)
    control_late.frombytes(raw_late)
    control.join()
    flushed = writer.flush(timeout=60)
    writer.close(timeout=30)
    stats = writer.stats()
    rows, _ = harness.count()
    # Spooled rows are replayed by the writer before close() returns, or left for the next.
    assert flushed and stats.calls == done[0] and rows >= stats.written, (stats, rows)
    assert stats.accepted == stats.written + stats.spooled + stats.dead_lettered, stats
    calls, count = done[0], sampled[0]
    windows = {
        "before": (0, frozen_at),
        "frozen": (frozen_at, thawed_at),
        "after": (thawed_at, end),
    }
    out: dict[str, float] = {"caught_up_s": caught_up, "dropped": float(stats.dropped_overflow)}
    for name, (lo, hi) in windows.items():
        out[f"log_max_ms_{name}"] = _window_max(starts, costs, calls, lo, hi)
        out[f"hold_max_ms_{name}"] = _window_max(at, late, count, lo, hi)
        out[f"noise_max_ms_{name}"] = _window_max(control_at, control_late, len(control_at), lo, hi)
    # What the writer can have held the GIL for in each window: the sampler's wait, at most
    # the CPU time the writer thread used meanwhile.
    held = array("q", (min(late[i], writer_cpu[i]) for i in range(count)))
    for name, (lo, hi) in windows.items():
        out[f"writer_max_ms_{name}"] = _window_max(at, held, count, lo, hi)
    gcs = sorted(collections.long, reverse=True)
    out["gc_max_ms"] = gcs[0][0] if gcs else 0.0
    out["gc_long"] = [  # type: ignore[assignment]
        (round(ms, 1), f"gen{gen}", "writer" if name.startswith("auditq[") else name)
        for ms, gen, name, _ in gcs[:3]
    ]
    holds = sorted(((held[i], at[i]) for i in range(count)), reverse=True)[:5]
    out["top_holds"] = [  # type: ignore[assignment]
        (round(v / 1e6, 2), round((t - frozen_at) / 1e9, 3)) for v, t in holds
    ]
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
