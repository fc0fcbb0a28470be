"""The server's share of chaining: COPY 50,000 typical rows pre-encoded, unchained against
stamped (two more columns, and entries in the `(chain_stream, chain_pos)` index), alternating,
6 rounds, medians; also the writer-side `stamp` of the batch.

    PYTHONPATH=. python benchmarks/chain_copy.py DSN    (run benchmarks/chain_writer.py first:
                                                         it makes the table)
"""

import statistics
import sys
import time
import uuid

import psycopg
from psycopg import sql

from auditq import binary, chain
from auditq.chainlink import CHAINED_COLUMNS
from benchmarks.compare import typical_row

DSN = sys.argv[1]
T = "auditq_chain_bench"


def main() -> None:
    rows = [typical_row(n) for n in range(50000)]
    plain = binary.encode_block(rows, [], [], binary.origin_field("bench@h"))
    res: dict[bool, list[tuple[float, float]]] = {}
    with psycopg.connect(DSN, autocommit=True) as conn:
        for r in range(6):
            for chained in (r % 2 == 0, r % 2 == 1):
                conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(T)))
                t0 = time.perf_counter()
                if chained:
                    data, _leaves = chain.stamp(plain, uuid.uuid4().bytes, 1)
                    cols = CHAINED_COLUMNS
                else:
                    data, cols = plain, binary.COPY_COLUMNS
                t1 = time.perf_counter()
                stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                    sql.Identifier(T), sql.SQL(", ").join(map(sql.Identifier, cols))
                )
                with conn.cursor() as cur, cur.copy(stmt) as cp:
                    cp.write(binary.HEADER + data + binary.TRAILER)
                res.setdefault(chained, []).append((time.perf_counter() - t1, t1 - t0))
    for chained, v in res.items():
        print(
            "chained" if chained else "plain  ",
            f"COPY median {statistics.median(x for x, _ in v):.3f} s,",
            f"stamp median {statistics.median(y for _, y in v):.3f} s",
        )


if __name__ == "__main__":
    main()
