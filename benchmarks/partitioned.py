"""Writer throughput into a partitioned, guarded table against the plain one, in one process.

Cases (interleaved, order rotated each round, medians reported):
  plain        the unpartitioned table without guards (the shape before issue 12)
  guarded      the unpartitioned table with its append-only guards
  partitioned  monthly partitions with guards on the parent and on every partition; the
               writer copies each batch straight into its month (auditq.routes)
  via-parent   the same table, every other row a month ahead: each batch spans two months
               and goes through the parent, which finds each row's partition (the cost
               that routing avoids)
The guards add no per-row work on INSERT (there is no INSERT trigger, so COPY keeps its
multi-row inserts); partition routing is what is measured. The target: partitioned within
10% of plain.

Each case fills the writer's queue while its thread waits (flush_interval and batch_size
out of reach), then times `flush()`: the drain, COPY and routing, without the callers'
cost, which is the same in every case. Every round uses fresh tables (guarded tables
cannot be emptied), dropped afterwards.

Run: python benchmarks/partitioned.py [DSN] [--entries N] [--rounds R]
(no DSN: an embedded PostgreSQL, created for the run and deleted after).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from auditq import AuditWriter
from auditq.benchjob import metadata_for
from auditq.embedded import embedded_postgres
from auditq.schema import create, qualified

SCHEMA = "auditq_bench_partitioned"
Maker = Callable[[str, str], None]


def _plain(dsn: str, table: str) -> None:
    create(dsn, schema=SCHEMA, table=table, guarded=False)


def _guarded(dsn: str, table: str) -> None:
    create(dsn, schema=SCHEMA, table=table)


def _partitioned(dsn: str, table: str) -> None:
    create(dsn, schema=SCHEMA, table=table, partitioned=True)


CASES: dict[str, Maker] = {
    "plain": _plain,
    "guarded": _guarded,
    "partitioned": _partitioned,
    "via-parent": _partitioned,
}


def _checkpoint(dsn: str) -> None:
    """Flush the server's dirty pages before each timing, so that a checkpoint the previous
    case's WAL made due does not land in this one's (it needs a superuser; skipped if not)."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        pass


def one_case(dsn: str, maker: Maker, entries: int, *, two_months: bool = False) -> float:
    """Rows per second drained into a fresh table made by `maker`."""
    table = f"bench_{uuid.uuid4().hex[:10]}"
    maker(dsn, table)
    try:
        writer = AuditWriter(
            dsn,
            schema=SCHEMA,
            table=table,
            max_queue=entries * 4,
            batch_size=entries + 1,
            wake_rows=entries + 1,  # the writer sleeps until flush(): its drain is timed alone
            flush_interval=3600,
        )
        try:
            writer.log("warm-up")  # the thread and its connection, outside the timing
            writer.flush()
            now = datetime.now(UTC)
            later = now + timedelta(days=32)
            for n in range(entries):
                writer.log(
                    "bench.partitioned",
                    tenant_id=f"tenant-{n % 50}",
                    actor_id=f"user-{n % 1000}",
                    resource_type="document",
                    resource_id=str(n),
                    outcome="success",
                    metadata=metadata_for(n),
                    occurred_at=later if two_months and n % 2 else now,
                )
            _checkpoint(dsn)
            started = time.perf_counter()
            if not writer.flush(timeout=600):
                raise RuntimeError("flush timed out")
            seconds = time.perf_counter() - started
            stats = writer.stats()
            if stats.written != entries + 1 or stats.dead_lettered:
                raise RuntimeError(f"rows unaccounted for: {stats}")
        finally:
            writer.close(timeout=30)
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(qualified(SCHEMA, table))
            ).fetchone()
            if row is None or row[0] != entries + 1:
                raise RuntimeError(f"table holds {row}, expected {entries + 1}")
        return entries / seconds
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(qualified(SCHEMA, table)))


def run(dsn: str, entries: int, rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in CASES}
    names = list(CASES)
    for round_no in range(rounds):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in order:
            rate = one_case(dsn, CASES[name], entries, two_months=name == "via-parent")
            results[name].append(rate)
            print(f"  round {round_no + 1} {name:<12} {rate:>12,.0f} rows/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("dsn", nargs="?", help="PostgreSQL DSN (default: embedded)")
    parser.add_argument("--entries", type=int, default=200_000, help="rows per case (200000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    args = parser.parse_args()
    target = nullcontext(args.dsn) if args.dsn else embedded_postgres()
    with target as dsn:
        results = run(dsn, args.entries, args.rounds)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    base = statistics.median(results["plain"])
    print(f"medians over {args.rounds} rounds of {args.entries:,} rows:")
    for name, rates in results.items():
        median = statistics.median(rates)
        paired = statistics.median(r / p for r, p in zip(rates, results["plain"], strict=True))
        print(
            f"  {name:<12} {median:>12,.0f} rows/s  {median / base:6.1%} of plain"
            f"  (median of the rounds' ratios {paired:6.1%})"
        )
    ratio = statistics.median(results["partitioned"]) / base
    verdict = "met" if ratio >= 0.9 else "NOT met"
    print(f"target (partitioned within 10% of plain): {verdict}")


if __name__ == "__main__":
    main()
