"""psycopg's `copy.write()` against the whole COPY driven from C with the GIL released
(`auditq.pqcopy`), pre-encoded rows (the `ceiling` input: 50,000 rows per COPY, ~1 MB
pieces), autocommit (the writer's own-connection path: a lone COPY is its transaction),
with nothing else running and with 4 threads spinning in pure Python. Alternating, medians.

    python -m benchmarks.libpq_copy [--rounds 5] [--dsn DSN] [--entries 200000]

Then the real writer draining a filled queue (`auditq-drain` and `auditq-drain-4spin` of the
harness) with `pqcopy.enabled` off and on, alternating in the same process.

"two" (pre-encoded only): the C path's stream over two connections in turn, each COPY's end
sent without waiting for its result, which is read only before that connection's next COPY
(issue 16's first design on top of its second): the COPY's start and end no longer leave the
server waiting for the writer's turn at the GIL, whatever that is worth behind busy threads.

Why: each GIL re-acquisition of the writer thread (the COPY's start, each piece's flush, the
end, the result) waits behind busy threads for up to the switch interval while the server
idles (benchmarks/README.md, issue 16). The C path needs one per group of pieces.
"""

from __future__ import annotations

import argparse
import select
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from auditq import pqcopy
from auditq.benchjob import prepare_table
from auditq.binary import HEADER, TRAILER
from auditq.connection import widen_send_buffer
from auditq.embedded import embedded_postgres
from auditq.native import speedups
from benchmarks.compare import CompareConfig, Harness, copy_blocks, encode_ceiling, spinning

SPINNERS = 4
#: psycopg's copy.write(); the C path sending a group of pieces per call without the GIL;
#: the C path handing each piece over with the GIL held and waiting only at a high water
#: (pqcopy.HIGH_WATER, or 4 MiB: "stream4m").
PATHS = ("psycopg", "stream", "stream4m", "two")


def copy_psycopg(
    conn: psycopg.Connection[tuple[object, ...]], harness: Harness, blocks: list[bytes]
) -> None:
    copy_blocks(conn, harness.copy_sql, blocks)


def copy_c(conn: psycopg.Connection[tuple[object, ...]], query: bytes, blocks: list[bytes]) -> None:
    pqcopy.copy(conn, query, [HEADER, *blocks, TRAILER])


def read_late_result(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Send what libpq still holds of an ended COPY, then read its results (waits in
    select(), without the GIL)."""
    pgconn = conn.pgconn
    while pgconn.flush() > 0:
        select.select([pgconn.socket], [pgconn.socket], [])
        pgconn.consume_input()
    while True:
        while pgconn.is_busy():
            select.select([pgconn.socket], [], [])
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            return
        assert result.status == psycopg.pq.ExecStatus.COMMAND_OK, result.error_message


def copy_two(
    conns: list[psycopg.Connection[tuple[object, ...]]], query: bytes, chunks: list[list[bytes]]
) -> None:
    """Each chunk a COPY on the two connections in turn, ended without waiting for its
    result; between pieces the other connection's unsent tail is pushed on."""
    assert speedups is not None
    pending = [False, False]
    for n, blocks in enumerate(chunks):
        mine, other = conns[n % 2], conns[1 - n % 2]
        if pending[n % 2]:
            read_late_result(mine)
        ptr: int = getattr(mine.pgconn, "pgconn_ptr")  # noqa: B009 - not in the typed protocol
        pieces = [HEADER, *blocks, TRAILER]
        started = speedups.pq_copy(ptr, query, (), False)
        assert started[2] is None, started
        unsent = 0
        for piece in pieces[:-1]:
            if pending[1 - n % 2]:
                other.pgconn.flush()
            waiting, error = speedups.pq_put(ptr, piece, unsent + len(piece) >= pqcopy.HIGH_WATER)
            assert error is None, error
            unsent = unsent + len(piece) if waiting else 0
        mine.pgconn.put_copy_data(pieces[-1])
        mine.pgconn.put_copy_end(None)
        mine.pgconn.flush()
        pending[n % 2] = True
    for k, conn in enumerate(conns):
        if pending[k]:
            read_late_result(conn)


def ceiling(harness: Harness, chunks: list[list[bytes]], path: str) -> float:
    conns = [
        psycopg.connect(harness.dsn, autocommit=True) for _ in range(2 if path == "two" else 1)
    ]
    for conn in conns:
        # As the writer's own connection has it (auditq.connection.widen_send_buffer).
        widen_send_buffer(conn.pgconn.socket)
        conn.execute("SELECT 1")
    conn = conns[0]
    query = harness.copy_sql.as_bytes(conn)
    try:
        started = time.perf_counter()
        if path == "two":
            copy_two(conns, query, chunks)
        for blocks in chunks if path != "two" else ():
            if path != "psycopg":
                copy_c(conn, query, blocks)
            else:
                copy_psycopg(conn, harness, blocks)
        seconds = time.perf_counter() - started
    finally:
        for conn in conns:
            conn.close()
    rows, _ = harness.count()
    assert rows == harness.cfg.entries, rows
    return harness.cfg.entries / seconds


@contextmanager
def c_path(path: str) -> Iterator[None]:
    """psycopg's path, or the C path ("stream", with its high water, or "stream4m" with a
    4 MiB high water instead). The "groups" variant measured in benchmarks/README.md was
    removed from the library once it lost."""
    saved = pqcopy.enabled, pqcopy.HIGH_WATER
    pqcopy.enabled = path != "psycopg"
    if path == "stream4m":
        pqcopy.HIGH_WATER = 4 * 1024 * 1024  # type: ignore[misc]
    try:
        yield
    finally:
        pqcopy.enabled, pqcopy.HIGH_WATER = saved  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.libpq_copy", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--dsn", help="a server whose bench table may be emptied (else embedded)")
    parser.add_argument("--no-writer", action="store_true", help="only the pre-encoded COPYs")
    parser.add_argument("--no-ceiling", action="store_true", help="only the writer's drain")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument(
        "--producers",
        type=int,
        nargs="*",
        default=[],
        help="also the harness's auditq-Nt cases (N threads calling log()) for these N",
    )
    parser.add_argument(
        "--spinners", type=int, nargs="+", default=[0, SPINNERS], help="threads spinning"
    )
    args = parser.parse_args()
    assert pqcopy.available(), "the C path is not available here"
    with embedded_postgres() if args.dsn is None else _given(args.dsn) as dsn:
        cfg = CompareConfig(entries=args.entries, progress=False)
        prepare_table(dsn, cfg.schema, cfg.table)
        harness = Harness(dsn, cfg, server_owned=args.dsn is None, stream=sys.stderr)
        chunks = encode_ceiling(cfg)
        results: dict[str, list[float]] = {}
        for round_ in range(1, args.rounds + 1):
            for spinners in args.spinners:
                for path in () if args.no_ceiling else args.paths:
                    harness.reset()
                    with c_path(path), spinning(spinners):
                        rate = ceiling(harness, chunks, path)
                    key = f"pre-encoded COPY, {path:7}, {spinners} spinning"
                    results.setdefault(key, []).append(rate)
                    print(f"round {round_}: {key}: {rate:>9,.0f} rows/s", flush=True)
                if args.no_writer:
                    continue
                for path in (p for p in args.paths if p != "two"):
                    harness.reset()
                    with c_path(path):
                        run = harness.drain(round_, spinners=spinners)
                    assert run.consistent, run
                    key = f"writer drain,       {path:7}, {spinners} spinning"
                    results.setdefault(key, []).append(run.rows_per_second)
                    print(f"round {round_}: {key}: {run.rows_per_second:>9,.0f} rows/s", flush=True)
            for producers in args.producers:
                for path in (p for p in args.paths if p != "two"):
                    harness.reset()
                    with c_path(path):
                        run = harness.auditq(round_, producers)
                    key = f"auditq-{producers}t,          {path:7}"
                    results.setdefault(key, []).append(run.rows_per_second)
                    print(f"round {round_}: {key}: {run.rows_per_second:>9,.0f} rows/s", flush=True)
        print(f"\nmedians of {args.rounds} rounds (rows/s):")
        for key, rates in results.items():
            each = ", ".join(f"{rate:,.0f}" for rate in rates)
            print(f"  {key}: {statistics.median(rates):>9,.0f}   ({each})")


@contextmanager
def _given(dsn: str) -> Iterator[str]:
    yield dsn


if __name__ == "__main__":
    main()
