"""How long a thread that gave the GIL up waits to get it back, with 0, 1 and 4 other threads
spinning in pure Python (no database, no auditq).

    python -m benchmarks.gil_turns [--waits 300] [--spinners 0 1 4]

A probe thread sleeps 2 ms at a time (a wait without the GIL, as the writer's COPY start,
end and high-water waits are) and records how late it wakes: the time it then waited for
its turn at the GIL. Printed per spinner count: p50, p90, p99 and the longest wait.

Why: every wait the writer thread makes without the GIL ends in such a turn. Behind busy
threads the interpreter hands the GIL over only every switch interval (5 ms), and the thread
that asked is not always the one that gets it: the writer's share of the GIL, not the
server or the client library, is what bounds it behind 4 busy callers (benchmarks/README.md,
"Session 7").
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.compare import spinning

SLEEP_SECONDS = 0.002


def waits(count: int, spinners: int) -> list[float]:
    """`count` lateness figures (seconds) of a thread sleeping SLEEP_SECONDS at a time."""
    late: list[float] = []

    def probe() -> None:
        clock = time.perf_counter
        for _ in range(count):
            started = clock()
            time.sleep(SLEEP_SECONDS)
            late.append(clock() - started - SLEEP_SECONDS)

    with spinning(spinners):
        thread = threading.Thread(target=probe, name="bench-gil-probe")
        thread.start()
        thread.join()
    return sorted(late)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gil_turns", description=__doc__)
    parser.add_argument("--waits", type=int, default=300, help="sleeps per spinner count")
    parser.add_argument("--spinners", type=int, nargs="+", default=[0, 1, 4])
    args = parser.parse_args(argv)
    print(f"switch interval {sys.getswitchinterval() * 1000:g} ms; a thread sleeping 2 ms:")
    for spinners in args.spinners:
        late = waits(args.waits, spinners)
        n = len(late)

        def ms(q: float, late: list[float] = late, n: int = n) -> str:
            return f"{late[min(n - 1, int(q * n))] * 1000:7.2f}"

        print(
            f"  {spinners} spinning: wait for the GIL p50 {ms(0.5)} ms  p90 {ms(0.9)} ms"
            f"  p99 {ms(0.99)} ms  max {late[-1] * 1000:7.2f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
