"""What the chain adds to `auditq retention`'s time under the partition's ACCESS EXCLUSIVE
lock: `checkpoint.purged_ranges` (the gaps-and-islands query over the partition's chain
positions) beside the `count(*)` the drop already ran there.

    AUDITQ_DSN=postgresql://... python -m benchmarks.retention_ranges [rows] [gap]

Fills one old month of a fresh partitioned table with `rows` (1,000,000) chained rows
straight from SQL, four streams; with `gap` N > 0 every Nth position of a stream is
missing (another month's: late or backdated events), so each stream has many runs (the
worst case); with 0 (the default) each stream is one run, as when events arrive in order.
It
times both queries in the same process, alternating, five rounds each, prints the medians,
and drops the table. Figures go in benchmarks/README.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from auditq import partitions
from auditq.chain_schema import create_chain_tables, q
from auditq.checkpoint import purged_ranges
from auditq.schema import create

ROUNDS = 5


def main() -> None:
    dsn = os.environ["AUDITQ_DSN"]
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    gap = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    table = f"bench_ret_{uuid.uuid4().hex[:8]}"
    month = datetime(2020, 1, 1, tzinfo=UTC)
    create(dsn, table=table, partitioned=True, ahead=0, guarded=False)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            create_chain_tables(conn, "public", table)
            with conn.transaction():
                partitions.ensure_months(conn, "public", table, [month])
            part = f"{table}_p{month:%Y%m}"
            streams = [str(uuid.uuid4()) for _ in range(4)]
            # With a gap N, position p of a stream lands elsewhere when p % N == 0.
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, occurred_at, action, tenant_id, metadata, "
                    "chain_stream, chain_pos) SELECT gen_random_uuid(), "
                    "{} + (g % 86400) * interval '1 second', 'user.login', 't' || (g % 7), "
                    "jsonb_build_object('n', g), ({}::uuid[])[1 + g % 4], "
                    "(g / 4) + 1 + {} FROM generate_series(0, {} - 1) g"
                ).format(
                    q("public", table),
                    sql.Literal(month),
                    sql.Literal(streams),
                    sql.SQL("(g / 4) / {}").format(sql.Literal(gap - 1))
                    if gap > 1
                    else sql.SQL("0"),
                    rows,
                )
            )
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(q("public", part)))
            counts: list[float] = []
            ranges: list[float] = []
            runs = 0
            for _ in range(ROUNDS):
                start = time.perf_counter()
                conn.execute(sql.SQL("SELECT count(*) FROM {}").format(q("public", part)))
                counts.append(time.perf_counter() - start)
                start = time.perf_counter()
                runs = len(purged_ranges(conn, "public", part))
                ranges.append(time.perf_counter() - start)
        print(
            f"{rows} rows, {runs} position runs: "
            f"count(*) {statistics.median(counts) * 1000:.0f} ms, "
            f"purged_ranges {statistics.median(ranges) * 1000:.0f} ms "
            f"(medians of {ROUNDS}, alternating)"
        )
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(q("public", table)))
            for suffix in ("_digests", "_checkpoints", "_retention"):
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(q("public", table + suffix)))


if __name__ == "__main__":
    main()
