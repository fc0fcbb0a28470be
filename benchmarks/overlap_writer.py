"""A measured prototype for issue 16's pipelined delivery (item 4): the writer's own per-batch
work, with each COPY's result read late on a second connection. Not the writer: the protocol
is driven by hand with psycopg's low-level `pq` interface, as `ceiling_overlap.py` does.

    python -m benchmarks.overlap_writer [--c-path] [--rounds 3]   (from the checkout)

With `--c-path` the pieces go through the writer's own C path (`auditq.pqcopy`: each piece
handed to libpq with the GIL held, a wait without it only at the COPY's start, a 1 MiB high
water and, with one connection, its end); with two connections the end is sent without
waiting, the other connection's unsent tail is pushed on between pieces, and the result is
read before that connection's next COPY (issue 16's two designs together).

Where `ceiling_overlap.py` sends rows encoded before timing, this loop does what the writer
thread does for each batch: take 50,000 queued rows (the `Row` tuples `log()` queues), encode
them 1,000 at a time with the C encoder (`encode_block`, with an origin) and hand each piece
to libpq (`put_copy_data`, flushed by waiting on the socket with the GIL released, as
psycopg's copy does), end the COPY, and free the rows a piece at a time. With one
connection each COPY's result is read before the next COPY starts (the writer today); with
two, the wait for a COPY's result moves to just before that connection's next COPY, so the
server has the other connection's rows while this thread waits for the GIL. Rows count
only once their COPY's result is read, as the writer would count them. Run with nothing
else busy and with 4 threads spinning in pure Python (the busy application).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg import generators, pq, waiting
from psycopg.abc import PQGen
from psycopg.generators import WAIT_W

from auditq import pqcopy
from auditq.benchjob import prepare_table
from auditq.binary import HEADER, TRAILER, encode_block, origin_field
from auditq.buffer import PIECE_ROWS, release
from auditq.connection import widen_send_buffer
from auditq.embedded import embedded_postgres
from auditq.entry import Row
from auditq.native import speedups
from benchmarks.compare import CompareConfig, Harness, spinning, typical_row
from benchmarks.libpq_copy import read_late_result

SPINNERS = 4
ROUNDS = 3
BATCH = 50_000
ORIGIN = origin_field("bench-overlap")


def _finish(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    pgconn = conn.pgconn
    for result in waiting.wait(generators.fetch_many(pgconn), pgconn.socket):
        assert result.status == pq.ExecStatus.COMMAND_OK, result.error_message


def _put(pgconn: pq.abc.PGconn, data: bytes) -> None:
    """One CopyData message, flushed, waiting for the socket with the GIL released (what
    psycopg's copy.write does)."""
    waiting.wait(generators.copy_to(pgconn, data), pgconn.socket)


def _end(pgconn: pq.abc.PGconn) -> PQGen[None]:
    """The end of the data, flushed; its result is read later (`_finish`)."""
    while pgconn.put_copy_end(None) == 0:
        while not (yield WAIT_W):
            continue
    while True:
        while not (yield WAIT_W):
            continue
        if pgconn.flush() == 0:
            break


def write_all(harness: Harness, queued: deque[Row], connections: int) -> float:
    """rows/s of writing every queued row, batch by batch, over `connections`."""
    total = len(queued)
    conns = [psycopg.connect(harness.dsn, autocommit=True) for _ in range(connections)]
    statement = harness.copy_sql.as_bytes(conns[0])
    for conn in conns:
        widen_send_buffer(conn.pgconn.socket)
        conn.pgconn.nonblocking = 1
    pending = [0] * connections  # rows of the COPY whose result is not read yet
    written = 0
    started = time.perf_counter()
    n = 0
    while queued:
        k = n % connections
        n += 1
        conn, pgconn = conns[k], conns[k].pgconn
        if pending[k]:
            _finish(conn)
            written += pending[k]
            pending[k] = 0
        rows = [queued.popleft() for _ in range(min(BATCH, len(queued)))]
        pgconn.send_query(statement)
        (result,) = waiting.wait(generators.fetch_many(pgconn), pgconn.socket)
        assert result.status == pq.ExecStatus.COPY_IN, result.error_message
        _put(pgconn, HEADER)
        for start in range(0, len(rows), PIECE_ROWS):
            kept: list[Row] = []
            bad: list[tuple[Row, str]] = []
            _put(pgconn, encode_block(rows[start : start + PIECE_ROWS], kept, bad, ORIGIN))
            assert not bad, bad[:1]
        _put(pgconn, TRAILER)
        waiting.wait(_end(pgconn), pgconn.socket)
        pending[k] = len(rows)
        release(rows)
        if connections == 1:
            _finish(conn)
            written += pending[k]
            pending[k] = 0
    for k, conn in enumerate(conns):
        if pending[k]:
            _finish(conn)
            written += pending[k]
    seconds = time.perf_counter() - started
    for conn in conns:
        conn.close()
    assert written == total, (written, total)
    return total / seconds


def write_all_c(harness: Harness, queued: deque[Row], connections: int) -> float:
    """`write_all` through the C path (see the module's docstring)."""
    assert speedups is not None and pqcopy.available()
    total = len(queued)
    conns = [psycopg.connect(harness.dsn, autocommit=True) for _ in range(connections)]
    statement = harness.copy_sql.as_bytes(conns[0])
    for conn in conns:
        widen_send_buffer(conn.pgconn.socket)
        conn.execute("SELECT 1")
    pending = [0] * connections
    written = 0
    started = time.perf_counter()
    n = 0
    while queued:
        k = n % connections
        n += 1
        conn, other = conns[k], conns[(k + 1) % connections]
        if pending[k]:
            read_late_result(conn)
            written += pending[k]
            pending[k] = 0
        ptr: int = getattr(conn.pgconn, "pgconn_ptr")  # noqa: B009 - not in the protocol
        rows = [queued.popleft() for _ in range(min(BATCH, len(queued)))]
        opened = speedups.pq_copy(ptr, statement, (), False)
        assert opened[2] is None, opened
        unsent = 0
        pieces = [HEADER]
        for start in range(0, len(rows), PIECE_ROWS):
            kept: list[Row] = []
            bad: list[tuple[Row, str]] = []
            pieces.append(encode_block(rows[start : start + PIECE_ROWS], kept, bad, ORIGIN))
            assert not bad, bad[:1]
            piece = pieces.pop(0)
            if connections > 1 and pending[(k + 1) % connections]:
                other.pgconn.flush()
            waiting_, error = speedups.pq_put(ptr, piece, unsent + len(piece) >= pqcopy.HIGH_WATER)
            assert error is None, error
            unsent = unsent + len(piece) if waiting_ else 0
        pieces.append(TRAILER)
        if connections == 1:
            ended = speedups.pq_copy(ptr, None, tuple(pieces), True)
            assert ended[2] is None, ended
            written += len(rows)
        else:
            for piece in pieces:
                conn.pgconn.put_copy_data(piece)
            conn.pgconn.put_copy_end(None)
            conn.pgconn.flush()
            pending[k] = len(rows)
        release(rows)
    for k, conn in enumerate(conns):
        if pending[k]:
            read_late_result(conn)
            written += pending[k]
    seconds = time.perf_counter() - started
    for conn in conns:
        conn.close()
    assert written == total, (written, total)
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overlap_writer")
    parser.add_argument("--c-path", action="store_true", help="the writer's C path")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    write = write_all_c if args.c_path else write_all
    with embedded_postgres() as dsn:
        cfg = CompareConfig(entries=400_000)
        prepare_table(dsn, cfg.schema, cfg.table)
        harness = Harness(dsn, cfg, server_owned=True, stream=sys.stderr)
        for _ in range(args.rounds):
            for busy in (0, SPINNERS):
                for connections in (1, 2):
                    harness.reset()
                    queued: deque[Row] = deque(typical_row(i) for i in range(cfg.entries))
                    with spinning(busy):
                        rate = write(harness, queued, connections)
                    rows, _ = harness.count()
                    assert rows == cfg.entries, rows
                    label = f"{busy} spinning threads" if busy else "nothing else busy"
                    print(f"{connections} connection(s), {label}: {rate:>9,.0f} rows/s", flush=True)


if __name__ == "__main__":
    main()
