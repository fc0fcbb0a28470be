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

ORIGIN = binary.origin_field("bench@host-1")
BATCH = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
ROUNDS = 15


def best(fn: Callable[[], object], rows: int) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) / rows * 1e6


def show(name: str, fn: Callable[[], object]) -> None:
    print(f"{name:<42} {best(fn, BATCH):6.3f} µs/row")


def main() -> None:
    rows = [typical_row(n) for n in range(BATCH)]
    block = binary.encode_block(rows, [], [], ORIGIN)
    stream = uuid.uuid4().bytes
    stamped, leaves = chain.stamp(block, stream, 1)
    tuples = binary.split_rows(stamped)
    print(f"{BATCH} typical rows per batch, {len(block) // BATCH} bytes per encoded row")
    print(f"C extension: {chain.ACCELERATED}, SHA-256 from: {chain.sha256_backend()}")
    show("encode_block (the writer's encoder)", lambda: binary.encode_block(rows, [], [], ORIGIN))
    show("stamp: chain fields + leaf", lambda: chain.stamp(block, stream, 1))
    show("root over the batch's leaves", lambda: chain.root(leaves))
    cs = ChainStream()

    def seal() -> None:
        record = cs.seal(leaves, cs.sealed_pos, BATCH)
        cs.committed(record)

    show("seal (root + digest record + hash)", seal)
    if native.speedups is not None:
        c = native.speedups
        c.chain_sha256_backend(True)
        try:
            show("stamp with the portable SHA-256", lambda: chain.stamp(block, stream, 1))
            show("root with the portable SHA-256", lambda: chain.root(leaves))
        finally:
            c.chain_sha256_backend(False)
        show("leaves only (verify's per-row work)", lambda: c.chain_leaves(stamped))
    sha = hashlib.sha256
    show("hashlib loop over the tuples (no canon)", lambda: [sha(t).digest() for t in tuples])
    show("pure-Python stamp (AUDITQ_NO_SPEEDUPS)", lambda: chain._stamp_python(block, stream, 1))


if __name__ == "__main__":
    main()
