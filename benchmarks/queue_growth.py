"""What bounds `log()`'s p99 while the server is frozen: a queue that only grows.

    python benchmarks/queue_growth.py [rounds]

Calls `log()` at the harness's frozen-case pace (bursts of 64, then a sleep) with no writer
thread, once letting the queue grow (as it does while the server is stopped and nothing is
written) and once taking as many entries off it as were added (as a running writer does).
Same calls, same pacing, same process: the difference is fresh memory. A growing queue
touches new pages (a minor page fault each: the kernel zeroes and charges a page), one that
is drained reuses freed memory. No database is involved; the DSN is never connected.

It runs twice, each time in a fresh interpreter: once as the interpreter comes, and once with
the hook of `auditq.prefault_memory()` installed (an application's opt-in; auditq never
installs it by itself), where each new arena is populated in one call. The hook's page faults
still count as minor faults, but are taken in bulk, one call in ~3,500 instead of one in ~15.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from array import array

from auditq import AuditWriter, prefault_memory
from auditq.benchjob import metadata_for, timed_log

CALLS = 48_000
BURST = 64
PAUSE = 0.0037  # the frozen case's pace: ~16.7k calls/s in bursts of 64


def run(drained: bool) -> tuple[float, float, int]:
    """(p50 ns, p99 ns, minor page faults) of CALLS paced calls; the first call after each
    pause is left out, as the harness does."""
    writer = AuditWriter(
        "postgresql://auditq@127.0.0.1:9/never", max_queue=10 * CALLS, flush_interval=3600
    )
    writer._thread = threading.current_thread()  # "started": no thread, no connection
    queue = writer._items
    costs = array("q", bytes(8 * CALLS))
    first = array("b", bytes(CALLS))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    n = 0
    while n < CALLS:
        first[n] = 1
        for _ in range(BURST):
            costs[n] = timed_log(writer.log, metadata_for(n))
            n += 1
        if drained:
            for _ in range(BURST):
                queue.popleft()
        time.sleep(PAUSE)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    steady = sorted(cost for cost, after_pause in zip(costs, first, strict=True) if not after_pause)
    queue.clear()
    writer._thread = None
    writer.close(timeout=0)
    return steady[len(steady) // 2], steady[int(len(steady) * 0.99)], faults


def child(rounds: int, prefault: bool) -> None:
    if prefault and not prefault_memory():
        print("prefault hook not available (no C extension, or Linux < 5.14)")
        return
    for _ in range(rounds):
        for drained in (False, True):
            p50, p99, faults = run(drained)
            label = f"{'drained' if drained else 'growing'}, {'prefault' if prefault else 'plain'}"
            print(f"{label:<20}{p50 / 1000:>8.2f}µs{p99 / 1000:>8.2f}µs{faults:>14,}", flush=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[2] == "--child":
        child(int(sys.argv[1]), prefault=sys.argv[3] == "prefault")
        return
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    print(
        f"{CALLS:,} paced log() calls per run, {rounds} round(s), each variant in its own process"
    )
    print(f"{'queue':<20}{'p50':>10}{'p99':>10}{'minor faults':>14}")
    for variant in ("plain", "prefault"):
        subprocess.run(
            [sys.executable, __file__, str(rounds), "--child", variant], check=True, env=os.environ
        )


if __name__ == "__main__":
    main()
