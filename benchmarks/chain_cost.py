"""What chaining costs the writer thread per row: stamping (chain fields + leaf), the batch
root, the digest, against encoding the row itself.

    python -m benchmarks.chain_cost [rows per batch, default 1000]

Prints µs per row, best of several rounds (figures go in benchmarks/README.md). Compares the
two ways issue 13 allowed: the leaf hashed in C with libcrypto's SHA256 (found at run time),
with the bundled portable SHA-256, and the alternative of C canonical bytes hashed by hashlib
in Python (timed here as the hashlib loop alone, its lower bound).
"""

from __future__ import annotations

import hashlib
import sys
import time
import uuid
from collections.abc import Callable

from auditq import binary, chain, native
from auditq.chain import ChainStream
from benchmarks.compare import typical_row

BATCH = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
ROUNDS = 15


def best(fn: Callable[[], object], rows: int) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) / rows * 1e6


def main() -> None:
    rows = [typical_row(n) for n in range(BATCH)]
    block = binary.encode_block(rows, [], [])
    stream = uuid.uuid4().bytes
    stamped, leaves = chain.stamp(block, stream, 1)
    tuples = binary.split_rows(stamped)
    print(f"{BATCH} typical rows per batch, {len(block) // BATCH} bytes per encoded row")
    print(f"C extension: {chain.ACCELERATED}, SHA-256 from: {chain.sha256_backend()}")
    print(
        f"encode_block (the writer's encoder)     {best(lambda: binary.encode_block(rows, [], []), BATCH):6.3f} µs/row"
    )
    print(
        f"stamp: chain fields + leaf              {best(lambda: chain.stamp(block, stream, 1), BATCH):6.3f} µs/row"
    )
    print(
        f"root over the batch's leaves            {best(lambda: chain.root(leaves), BATCH):6.3f} µs/row"
    )
    cs = ChainStream()

    def seal() -> None:
        record = cs.seal(leaves, cs.sealed_pos, BATCH)
        cs.committed(record)

    print(f"seal (root + digest record + hash)      {best(seal, BATCH):6.3f} µs/row")
    if native.speedups is not None:
        c = native.speedups
        c.chain_sha256_backend(True)
        try:
            print(
                f"stamp with the portable SHA-256         {best(lambda: chain.stamp(block, stream, 1), BATCH):6.3f} µs/row"
            )
            print(
                f"root with the portable SHA-256          {best(lambda: chain.root(leaves), BATCH):6.3f} µs/row"
            )
        finally:
            c.chain_sha256_backend(False)
        print(
            f"leaves only (verify's per-row work)     {best(lambda: c.chain_leaves(stamped), BATCH):6.3f} µs/row"
        )
    sha = hashlib.sha256
    print(
        f"hashlib loop over the tuples (no canon) {best(lambda: [sha(t).digest() for t in tuples], BATCH):6.3f} µs/row"
    )
    print(
        f"pure-Python stamp (AUDITQ_NO_SPEEDUPS)  {best(lambda: chain._stamp_python(block, stream, 1), BATCH):6.3f} µs/row"
    )


if __name__ == "__main__":
    main()
