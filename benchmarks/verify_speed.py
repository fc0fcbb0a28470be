"""`auditq verify` throughput: rows per second of wall time and per CPU-second of the
verifier process (its per-core speed; the server works on the other core).

    AUDITQ_DSN=postgresql://... python -m benchmarks.verify_speed [rows, default 300000]

Writes chained rows (typical rows, batches of 1,000) into a fresh table, verifies it with
one job and with two, and drops the table. Figures go in benchmarks/README.md.
"""

from __future__ import annotations

import os
import resource
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


def fill(dsn: str, schema: str, table: str, rows: int) -> None:
    stream = ChainStream()
    cols = sql.SQL(", ").join(map(sql.Identifier, chain.LEAF_COLUMNS_V1))
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(q(schema, table), cols)
    with psycopg.connect(dsn) as conn:
        for start in range(0, rows, BATCH):
            block = binary.encode_block(
                [typical_row(n) for n in range(start, min(rows, start + BATCH))],
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


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    dsn = os.environ.get("AUDITQ_DSN") or os.environ.get("AUDITQ_TEST_DSN")
    if not dsn:
        sys.exit("set AUDITQ_DSN")
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
    schema, table = "public", f"verify_bench_{uuid.uuid4().hex[:8]}"
    create(dsn, schema=schema, table=table)
    with psycopg.connect(dsn) as conn:
        create_chain_tables(conn, schema, table)
    try:
        started = time.perf_counter()
        fill(dsn, schema, table, rows)
        print(f"wrote {rows} chained rows in {time.perf_counter() - started:.1f} s")
        print(f"C extension: {chain.ACCELERATED}, SHA-256 from: {chain.sha256_backend()}")
        for jobs in (1, 2):
            found: list[object] = []
            cpu, wall = cpu_seconds(), time.perf_counter()
            summary = verify(Options(dsn, schema, table, jobs=jobs), found.append)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            damage = summary.damaged
            print(
                f"jobs={jobs}: {summary.rows / wall:9,.0f} rows/s wall, "
                f"{summary.rows / cpu:9,.0f} rows per verifier CPU-second "
                f"({summary.rows} rows, {summary.digests} batches, damaged={damage})"
            )
    finally:
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
