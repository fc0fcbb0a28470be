"""close() under fire (issue 16), as many runs as wanted and with other settings than the
harness's: how long a writer takes to drain 50,000 queued rows while 8 threads keep calling
`log()` flat out, every call refused because the queue is full or the writer is closing.

    python -m benchmarks.close_drain [--runs 3] [--dsn DSN] [--batch-size 1000]

The measurement is the harness's (`Harness.close_drain` in benchmarks/compare.py). Reported
per run: the seconds close() took, what it wrote and dead-lettered, the calls refused while it
ran, and whether the accounting holds (`calls == accepted + dropped + rejected`,
`accepted == written + dead_lettered + spooled`, the table's count). With no --dsn, an
embedded PostgreSQL started for the run.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auditq.benchjob import prepare_table
from auditq.embedded import embedded_postgres
from benchmarks.compare import CLOSE_THREADS, CompareConfig, Harness


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.close_drain", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dsn", help="a server whose bench table may be emptied (embedded)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=50_000, help="rows queued (50000)")
    parser.add_argument("--timeout", type=float, default=10.0, help="close()'s timeout (10)")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(embedded_postgres())
        cfg = replace(
            CompareConfig(),
            close_rows=args.rows,
            close_batch_size=args.batch_size,
            close_timeout=args.timeout,
        )
        prepare_table(dsn, cfg.schema, cfg.table)
        harness = Harness(dsn, cfg, server_owned=args.dsn is None, stream=sys.stderr)
        print(
            f"{args.rows:,} rows queued, batch_size {args.batch_size:,}, {CLOSE_THREADS} threads "
            f"calling log() flat out during close(timeout={args.timeout:g})",
            flush=True,
        )
        for run in range(1, args.runs + 1):
            r = harness.close_drain()
            print(
                f"run {run}: close() {r['seconds']:6.2f} s  returned {r['returned']!s:5}  "
                f"written {r['written']:>8,}  dead-lettered {r['dead_lettered']:>6,}  "
                f"refused calls {r['refused']:>11,}  "
                f"accounting {'exact' if r['consistent'] else 'MISMATCH'}",
                flush=True,
            )


if __name__ == "__main__":
    main()
