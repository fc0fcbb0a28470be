"""What partitioning costs the server: one binary COPY of the same pre-encoded rows into a
plain guarded table, into a partitioned guarded table (rows routed by the parent), and
straight into the month's partition, in one process, cases interleaved.

Where `benchmarks/partitioned.py` times the whole writer (whose run-to-run spread on a 2-core
VM is larger than the effect it looks for), this times only what the server does differently.

Run: python -m benchmarks.partitioned_copy [DSN] [--rounds R] [--entries N]
(no DSN: an embedded PostgreSQL, created for the run and deleted after).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from contextlib import nullcontext
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from auditq.binary import COPY_COLUMNS, HEADER, TRAILER, encode_row, origin_field
from auditq.embedded import embedded_postgres
from auditq.partitions import list_partitions
from auditq.schema import create

SCHEMA = "auditq_bench_partitioned_copy"
CASES = ("plain", "parent", "partition")


def encoded(entries: int) -> bytes:
    origin = origin_field("bench@host")
    now = time.time_ns()
    rows = [
        encode_row(
            (
                None,
                now,
                "document.share",
                "t-42",
                f"u-{n % 1000}",
                "user",
                "document",
                f"doc-{n}",
                "success",
                "2001:db8::7",
                "Mozilla/5.0 (X11; Linux x86_64)",
                str(n),
                '{"shared_with": ["u-8"], "role": "viewer"}',
            ),
            origin,
        )[0]
        for n in range(entries)
    ]
    return HEADER + b"".join(rows) + TRAILER


def one(dsn: str, case: str, data: bytes, entries: int) -> float:
    table = f"copy_{case}_{uuid.uuid4().hex[:8]}"
    create(dsn, schema=SCHEMA, table=table, partitioned=case != "plain")
    columns = sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS))
    with psycopg.connect(dsn, autocommit=True) as conn:
        target = table
        if case == "partition":
            now = datetime.now(UTC)
            parts = list_partitions(conn, SCHEMA, table, exact=False)
            target = next(
                p.name
                for p in parts
                if p.range_from and p.range_to and p.range_from <= now < p.range_to
            )
        statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(SCHEMA, target), columns
        )
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy(statement) as copy:
            copy.write(data)
        rate = entries / (time.perf_counter() - started)
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(SCHEMA, table)))
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dsn", nargs="?", help="PostgreSQL DSN (default: embedded)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--entries", type=int, default=200_000)
    args = parser.parse_args()
    data = encoded(args.entries)
    with nullcontext(args.dsn) if args.dsn else embedded_postgres() as dsn:
        rates: dict[str, list[float]] = {case: [] for case in CASES}
        for round_ in range(args.rounds):
            order = CASES[round_ % 3 :] + CASES[: round_ % 3]
            for case in order:
                rates[case].append(one(dsn, case, data, args.entries))
        plain = statistics.median(rates["plain"])
        print(f"medians over {args.rounds} rounds of {args.entries:,} rows (all tables guarded):")
        for case in CASES:
            rate = statistics.median(rates[case])
            print(f"  {case:<10} {rate:>10,.0f} rows/s  {100 * rate / plain:5.1f}% of plain")


if __name__ == "__main__":
    main()
