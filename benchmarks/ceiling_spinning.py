"""The `ceiling` case (pre-encoded rows, psycopg `copy.write`, no queue) alone and while 4
threads that never touch the database spin in pure Python, alternating, 3 rounds.

    python -m benchmarks.ceiling_spinning   (from the checkout; embedded PostgreSQL)

Why: it separates the two costs of a Python writer under busy threads. This path does no
per-row work at all, yet it collapses: psycopg releases the GIL whenever the socket is full
and needs it back at every wake-up, waiting up to the switch interval behind the spinners
each time. A writer that keeps up under contention must send without the GIL, not only
encode without it.
"""

from __future__ import annotations

import sys

from auditq.benchjob import prepare_table
from auditq.embedded import embedded_postgres
from benchmarks.compare import CompareConfig, Harness, encode_ceiling, spinning

SPINNERS = 4


def main() -> None:
    with embedded_postgres() as dsn:
        cfg = CompareConfig()
        prepare_table(dsn, cfg.schema, cfg.table)
        harness = Harness(dsn, cfg, server_owned=True, stream=sys.stderr)
        chunks = encode_ceiling(cfg)
        for round_ in range(1, 4):
            for spinners in (0, SPINNERS):
                harness.reset()
                with spinning(spinners):
                    run = harness.ceiling(round_, chunks)
                print(f"ceiling, {spinners} spinning threads: {run.rows_per_second:>9,.0f} rows/s")


if __name__ == "__main__":
    main()
