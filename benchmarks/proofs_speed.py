"""`auditq export --proofs` and `verify_export`: rows per second, and the file's size per row.

    AUDITQ_DSN=postgresql://... python -m benchmarks.proofs_speed [rows, default 100000]

Writes chained typical rows (one tenant, batches of 1,000: every row of every batch is the
tenant's, the most paths per batch), signs a checkpoint, exports the tenant with proofs to
a temporary file and checks it offline, and drops the table. Figures go in
benchmarks/README.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

from auditq.chain_schema import (
    checkpoints_table,
    create_chain_tables,
    digests_table,
    q,
    retention_table,
)
from auditq.checkpoint import keygen, make_checkpoint
from auditq.proofs import export_proofs, verify_export
from auditq.schema import create
from benchmarks.verify_speed import fill


def main() -> None:
    dsn = os.environ.get("AUDITQ_DSN") or os.environ.get("AUDITQ_TEST_DSN")
    if not dsn:
        sys.exit("set AUDITQ_DSN")
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    schema, table = "public", f"proofs_bench_{uuid.uuid4().hex[:8]}"
    create(dsn, schema=schema, table=table)
    with psycopg.connect(dsn) as conn:
        create_chain_tables(conn, schema, table)
    key = keygen("bench")
    try:
        fill(dsn, schema, table, rows)
        with psycopg.connect(dsn) as conn:
            make_checkpoint(conn, schema, table, key)
            found = conn.execute(
                sql.SQL("SELECT tenant_id FROM {} LIMIT 1").format(q(schema, table))
            )
            (tenant,) = found.fetchone() or ("",)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "proofs.jsonl"
            started = time.perf_counter()
            with open(path, "wb") as out:
                written = export_proofs(dsn, schema, table, str(tenant), out)
            exported = time.perf_counter() - started
            size = path.stat().st_size
            findings: list[object] = []
            started = time.perf_counter()
            with open(path, "rb") as source:
                summary = verify_export(source, [key.verifier()], findings.append)
            checked = time.perf_counter() - started
        print(
            f"{written} rows: export --proofs {written / exported:,.0f} rows/s, "
            f"{size / written:,.0f} bytes a row; verify_export {summary.rows / checked:,.0f} "
            f"rows/s ({summary.proven} proven, {len(findings)} findings)"
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
