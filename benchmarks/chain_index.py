"""What the `(chain_stream, chain_pos)` index buys `auditq verify`: a full verify read
through the index against the same table read with index scans disabled (a sequential scan
and a sort, which spills to disk past `work_mem`), alternating, medians; with the plan of
each.

    AUDITQ_DSN=postgresql://... python -m benchmarks.chain_index [rows, default 500000]
        [--streams N, default 4] [--rounds N, default 3]

Writes chained rows (typical rows, batches of 1,000, the streams' batches interleaved as
several writers' would be) into a fresh table, and drops it at the end. Then times the
partial read `--since TIME` (the last tenth of the batches), the one the index serves, with
the table's BRIN (what `chain_schema` makes), with a `(chain_stream, chain_pos)` btree
instead, and with no index. Figures go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid

import psycopg
from psycopg import sql

from auditq import binary, chain
from auditq.chain import ChainStream
from auditq.chain_schema import (
    checkpoints_table,
    create_chain_tables,
    digests_table,
    insert_digest,
    q,
    retention_table,
)
from auditq.schema import create
from auditq.verify import Options, verify
from benchmarks.compare import typical_row

BATCH = 1000
#: What disabling the index means for verify's connections (libpq reads PGOPTIONS).
NO_INDEX = "-c enable_indexscan=off -c enable_bitmapscan=off -c enable_indexonlyscan=off"


def fill(dsn: str, schema: str, table: str, rows: int, streams: int) -> None:
    chains = [ChainStream() for _ in range(streams)]
    cols = sql.SQL(", ").join(map(sql.Identifier, chain.LEAF_COLUMNS_V1))
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(q(schema, table), cols)
    with psycopg.connect(dsn) as conn:
        for n, start in enumerate(range(0, rows, BATCH)):
            stream = chains[n % streams]
            block = binary.encode_block(
                [typical_row(i) for i in range(start, min(rows, start + BATCH))],
                [],
                [],
                binary.origin_field("bench@host-1"),
            )
            stamped, leaves, first = stream.stamp(block)
            record = stream.seal(leaves, first, len(leaves) // 32)
            with conn.transaction():
                with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                    copy.write(binary.HEADER + stamped + binary.TRAILER)
                insert_digest(conn, schema, table, record)
            stream.committed(record)
        conn.execute(sql.SQL("ANALYZE {}").format(q(schema, table)))
        conn.commit()


def plan(dsn: str, schema: str, table: str) -> str:
    cols = sql.SQL(", ").join(
        sql.SQL("t.{}").format(sql.Identifier(c)) for c in chain.LEAF_COLUMNS_V1
    )
    query = sql.SQL(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) SELECT {} FROM {} t "
        "WHERE t.chain_stream IS NOT NULL ORDER BY t.chain_stream, t.chain_pos, t.id"
    ).format(cols, q(schema, table))
    with psycopg.connect(dsn) as conn:
        return "\n".join("    " + r[0] for r in conn.execute(query))


def since_reads(dsn: str, schema: str, table: str, rounds: int) -> None:
    digests = q(schema, digests_table(table))
    target = q(schema, table)
    with psycopg.connect(dsn, autocommit=True) as conn:
        (count,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(digests)).fetchone() or (
            0,
        )
        (since,) = conn.execute(
            sql.SQL("SELECT recorded_at FROM {} ORDER BY recorded_at OFFSET %s LIMIT 1").format(
                digests
            ),
            (count * 9 // 10,),
        ).fetchone() or (None,)
        brin = sql.Identifier(table + "_chain_brin")
        btree = sql.Identifier(table + "_bench_btree")
        variants = {
            "brin": [],
            "btree": [
                sql.SQL("DROP INDEX {}").format(brin),
                sql.SQL("CREATE INDEX {} ON {} (chain_stream, chain_pos)").format(btree, target),
            ],
            "none": [sql.SQL("DROP INDEX {}").format(btree)],
        }
        for name, ddl in variants.items():
            for statement in ddl:
                conn.execute(statement)
            conn.execute(sql.SQL("ANALYZE {}").format(target))
            rates = []
            for _ in range(rounds):
                wall = time.perf_counter()
                summary = verify(Options(dsn, schema, table, since_time=since), lambda _f: None)
                wall = time.perf_counter() - wall
                assert not summary.damaged, summary
                rates.append(wall)
            print(
                f"--since TIME with {name:<5}: {summary.rows} rows, median "
                f"{statistics.median(rates):.3f} s",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="?", type=int, default=500_000)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dsn = os.environ.get("AUDITQ_DSN") or os.environ.get("AUDITQ_TEST_DSN")
    if not dsn:
        sys.exit("set AUDITQ_DSN")
    schema, table = "public", f"chain_index_bench_{uuid.uuid4().hex[:8]}"
    create(dsn, schema=schema, table=table)
    with psycopg.connect(dsn) as conn:
        create_chain_tables(conn, schema, table)
    saved = os.environ.get("PGOPTIONS")
    try:
        started = time.perf_counter()
        fill(dsn, schema, table, args.rows, args.streams)
        print(
            f"wrote {args.rows} chained rows in {args.streams} streams in "
            f"{time.perf_counter() - started:.1f} s"
        )
        results: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.rounds):
            for indexed in (r % 2 == 0, r % 2 == 1):
                if indexed:
                    os.environ.pop("PGOPTIONS", None)
                else:
                    os.environ["PGOPTIONS"] = NO_INDEX
                if r == 0:
                    print(("with the index (BRIN)" if indexed else "index scans off") + ":")
                    print(plan(dsn, schema, table))
                wall = time.perf_counter()
                summary = verify(Options(dsn, schema, table, jobs=1), lambda _f: None)
                wall = time.perf_counter() - wall
                assert not summary.damaged and summary.rows == args.rows, summary
                results[indexed].append(summary.rows / wall)
                print(
                    f"round {r + 1} index={'on ' if indexed else 'off'} "
                    f"{summary.rows / wall:9,.0f} rows/s wall",
                    flush=True,
                )
        for indexed in (True, False):
            print(
                f"index {'on ' if indexed else 'off'}: median "
                f"{statistics.median(results[indexed]):,.0f} rows/s wall"
            )
        os.environ.pop("PGOPTIONS", None)
        since_reads(dsn, schema, table, args.rounds)
    finally:
        if saved is None:
            os.environ.pop("PGOPTIONS", None)
        else:
            os.environ["PGOPTIONS"] = saved
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name in (
                table,
                digests_table(table),
                checkpoints_table(table),
                retention_table(table),
            ):
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(q(schema, name)))


if __name__ == "__main__":
    main()
