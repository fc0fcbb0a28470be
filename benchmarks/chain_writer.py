"""Writer throughput with the hash chain on against off (issue 13's target: within 10 %),
alternating the two in one process, several rounds, medians.

Two cases per round and setting:
* drain: a queue of ENTRIES typical entries filled while the writer sleeps, then `flush()`
  timed (the writer alone: encode, stamp, COPY, digest, commit);
* callers: one producer thread logging ENTRIES entries flat out while the writer drains
  (the harness's single-producer case), timed from the first call to the end of `flush()`.

Run from the checkout: python -m benchmarks.chain_writer [DSN] [--rounds N] [--entries N]
[--no-chain-index] [--index-variant SQL] (embedded PostgreSQL without a DSN). Tables are
TRUNCATEd between rounds.

`--index-variant btree` adds a third setting, alternating with the two others: the chained
writer on a second table whose `(chain_stream, chain_pos)` BRIN is replaced by a btree on
the same columns (the index before this change), or `none`: no index at all.

`drain` also reports the CPU a row cost the writer process and this database's backends
(from /proc, so the server must run on this machine): a steadier measure than wall time
on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any

import psycopg

from auditq import AuditWriter
from auditq.benchjob import metadata_for, timed_log
from auditq.chain_schema import digests_table
from auditq.embedded import embedded_postgres
from auditq.schema import create

TABLE = "auditq_chain_bench"


VARIANT = TABLE + "_v"


def empty(dsn: str, table: str = TABLE) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {table}")
        conn.execute(f"TRUNCATE {digests_table(table)}")


def prepare(dsn: str, table: str) -> None:
    create(dsn, table=table, guarded=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A scratch table: its digests' insert-only guard would refuse the TRUNCATE.
        conn.execute(f"ALTER TABLE {digests_table(table)} DISABLE TRIGGER USER")


#: CPU µs a row of each `drain`: (the writer process, its database backends).
CPU: list[tuple[float, float]] = []
_TICK = os.sysconf("SC_CLK_TCK")


def backend_cpu(conn: psycopg.Connection[Any]) -> dict[int, float]:
    """CPU seconds so far of this database's other backends (the server's work for the
    writer; the machine's other databases are other people's)."""
    out: dict[int, float] = {}
    for (pid,) in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()"
    ).fetchall():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def drain(dsn: str, chain: bool, entries: int, table: str = TABLE) -> float:
    """Also records the CPU a row cost the writer process and the server (`CPU`): a
    steadier measure than wall time on a machine others share."""
    writer = AuditWriter(
        dsn,
        table=table,
        chain=chain,
        max_queue=entries * 2,
        wake_rows=entries * 2,
        flush_interval=3600,
    )
    for n in range(entries):
        timed_log(writer.log, metadata_for(n))
    with psycopg.connect(dsn, autocommit=True) as side:
        before = backend_cpu(side)
        cpu = time.process_time()
        started = time.perf_counter()
        writer.flush()
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        after = backend_cpu(side)
    server = sum(v - before.get(pid, 0.0) for pid, v in after.items())
    CPU.append((cpu / entries * 1e6, server / entries * 1e6))
    assert writer.stats().written == entries, writer.stats()
    writer.close()
    return entries / seconds


def callers(dsn: str, chain: bool, entries: int, table: str = TABLE) -> float:
    writer = AuditWriter(dsn, table=table, chain=chain, max_queue=entries * 2)
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
    parser.add_argument(
        "--index-variant",
        choices=("btree", "none"),
        help="also time the chained writer on a table with this instead of the btree",
    )
    args = parser.parse_args()
    target = nullcontext(args.dsn) if args.dsn else embedded_postgres()
    with target as dsn:
        prepare(dsn, TABLE)
        with psycopg.connect(dsn, autocommit=True) as conn:
            if args.no_chain_index:
                conn.execute(f"DROP INDEX IF EXISTS {TABLE}_chain_brin")
        # (name, chain, table): the settings alternated in each round.
        settings = [("off", False, TABLE), ("on", True, TABLE)]
        if args.index_variant:
            prepare(dsn, VARIANT)
            with psycopg.connect(dsn, autocommit=True) as conn:
                for (name,) in conn.execute(
                    "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass "
                    "AND pg_get_indexdef(indexrelid) LIKE '%%chain_stream, chain_pos%%'",
                    (VARIANT,),
                ).fetchall():
                    conn.execute(f"DROP INDEX {name}")
                if args.index_variant == "btree":
                    conn.execute(
                        f"CREATE INDEX {VARIANT}_chain_btree ON {VARIANT} (chain_stream, chain_pos)"
                    )
            settings.append((args.index_variant, True, VARIANT))
        results: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for case in (drain, callers):
                # Rotate which setting goes first, so drift favours none.
                shift = r % len(settings)
                for name, chain, table in settings[shift:] + settings[:shift]:
                    empty(dsn, table)
                    rate = case(dsn, chain, args.entries, table)
                    results.setdefault((case.__name__, name), []).append(rate)
                    extra = ""
                    if case is drain:
                        client, server = CPU[-1]
                        results.setdefault(("cpu", name), []).append(client + server)
                        extra = f"  CPU a row: writer {client:.2f} µs, server {server:.2f} µs"
                    print(
                        f"round {r + 1} {case.__name__:<8} chain={name:<5} "
                        f"{rate:>10,.0f} rows/s{extra}",
                        flush=True,
                    )
        print()
        for case_name in ("drain", "callers"):
            off = statistics.median(results[(case_name, "off")])
            line = f"{case_name:<8} median of {args.rounds}: off {off:,.0f} rows/s"
            for name, _chain, _table in settings[1:]:
                on = statistics.median(results[(case_name, name)])
                line += f", {name} {on:,.0f} rows/s ({on / off:.3f} of off)"
            print(line)
        off = statistics.median(results[("cpu", "off")])
        line = f"drain CPU a row (writer + server), median: off {off:.2f} µs"
        for name, _chain, _table in settings[1:]:
            on = statistics.median(results[("cpu", name)])
            line += f", {name} {on:.2f} µs ({off / on:.3f} of off's rows per CPU-second)"
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
