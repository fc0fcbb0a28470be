"""Writer throughput with the hash chain on against off (issue 13's target: within 10 %),
alternating the two in one process, several rounds, medians.

Two cases per round and setting:
* drain: a queue of ENTRIES typical entries filled while the writer sleeps, then `flush()`
  timed (the writer alone: encode, stamp, COPY, digest, commit);
* callers: one producer thread logging ENTRIES entries flat out while the writer drains
  (the harness's single-producer case), timed from the first call to the end of `flush()`.

Run from the checkout: python -m benchmarks.chain_writer [DSN] [--rounds N] [--entries N]
[--no-chain-index] (embedded PostgreSQL without a DSN). Tables are TRUNCATEd between rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext

import psycopg

from auditq import AuditWriter
from auditq.benchjob import metadata_for, timed_log
from auditq.chain_schema import digests_table
from auditq.embedded import embedded_postgres
from auditq.schema import create

TABLE = "auditq_chain_bench"


def empty(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLE}")
        conn.execute(f"TRUNCATE {digests_table(TABLE)}")


def drain(dsn: str, chain: bool, entries: int) -> float:
    writer = AuditWriter(
        dsn,
        table=TABLE,
        chain=chain,
        max_queue=entries * 2,
        wake_rows=entries * 2,
        flush_interval=3600,
    )
    for n in range(entries):
        timed_log(writer.log, metadata_for(n))
    started = time.perf_counter()
    writer.flush()
    seconds = time.perf_counter() - started
    assert writer.stats().written == entries, writer.stats()
    writer.close()
    return entries / seconds


def callers(dsn: str, chain: bool, entries: int) -> float:
    writer = AuditWriter(dsn, table=TABLE, chain=chain, max_queue=entries * 2)
    writer.flush()  # thread and connection up before the clock starts
    started = time.perf_counter()
    for n in range(entries):
        timed_log(writer.log, metadata_for(n))
    writer.flush()
    seconds = time.perf_counter() - started
    assert writer.stats().written == entries, writer.stats()
    writer.close()
    return entries / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", nargs="?")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument(
        "--no-chain-index",
        action="store_true",
        help="drop the (chain_stream, chain_pos) index: what the server's index costs",
    )
    args = parser.parse_args()
    target = nullcontext(args.dsn) if args.dsn else embedded_postgres()
    with target as dsn:
        create(dsn, table=TABLE, guarded=False)
        with psycopg.connect(dsn, autocommit=True) as conn:
            # A scratch table: its digests' insert-only guard would refuse the TRUNCATE.
            conn.execute(f"ALTER TABLE {digests_table(TABLE)} DISABLE TRIGGER USER")
            if args.no_chain_index:
                conn.execute(f"DROP INDEX IF EXISTS {TABLE}_chain_idx")
        results: dict[tuple[str, bool], list[float]] = {}
        for r in range(args.rounds):
            for case in (drain, callers):
                # Alternate which setting goes first, so drift favours neither.
                for chain in (r % 2 == 0, r % 2 == 1):
                    empty(dsn)
                    rate = case(dsn, chain, args.entries)
                    results.setdefault((case.__name__, chain), []).append(rate)
                    print(
                        f"round {r + 1} {case.__name__:<8} chain={'on ' if chain else 'off'} "
                        f"{rate:>10,.0f} rows/s",
                        flush=True,
                    )
        print()
        for name in ("drain", "callers"):
            off = statistics.median(results[(name, False)])
            on = statistics.median(results[(name, True)])
            print(
                f"{name:<8} median of {args.rounds}: off {off:,.0f} rows/s, on {on:,.0f} rows/s, "
                f"on/off {on / off:.3f}"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
