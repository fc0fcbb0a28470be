"""An experiment for the next step of the 4-producer target: can a writer keep the server busy
while 4 other threads hold the GIL, if it waits for nothing it does not have to? And is it
the GIL at all, or only a busy core (one spinning process, which shares no GIL)?

    python -m benchmarks.ceiling_overlap   (from the checkout; embedded PostgreSQL)

Pre-encoded rows (as the `ceiling` case), 50,000 per COPY, sent raw as one CopyData message by
a blocking `sendall` (one GIL release per COPY). With one connection, each COPY's result is
awaited before the next starts; with two, the wait for a COPY's result moves to just before
that connection's next COPY, so the server always has the other connection's COPY to work on
while this thread waits for the GIL. The writer does not work this way (yet): this measures
whether it should. Not a test of auditq's code; the protocol is driven by hand with psycopg's
low-level `pq` interface.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Event

import psycopg
from psycopg import generators, pq, waiting

from auditq.benchjob import prepare_table
from auditq.binary import HEADER, TRAILER
from auditq.connection import widen_send_buffer
from auditq.embedded import embedded_postgres
from benchmarks.compare import CompareConfig, Harness, _spin, encode_ceiling, spinning

SPINNERS = 4
ROUNDS = 3
BUSY = (
    ("", "nothing else busy"),
    ("threads", f"{SPINNERS} spinning threads"),
    ("process", "1 spinning process"),
)


def _finish(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    pgconn = conn.pgconn
    for result in waiting.wait(generators.fetch_many(pgconn), pgconn.socket):
        assert result.status == pq.ExecStatus.COMMAND_OK, result.error_message


def copy_all(harness: Harness, chunks: list[list[bytes]], connections: int) -> float:
    """rows/s of COPYing every chunk, alternating over `connections` connections."""
    conns = [psycopg.connect(harness.dsn, autocommit=True) for _ in range(connections)]
    statement = harness.copy_sql.as_bytes(conns[0])
    socks = []
    for conn in conns:
        widen_send_buffer(conn.pgconn.socket)
        socks.append(socket.socket(fileno=os.dup(conn.pgconn.socket)))
    pending = [False] * connections
    started = time.perf_counter()
    for n, blocks in enumerate(chunks):
        k = n % connections
        pgconn = conns[k].pgconn
        if pending[k]:
            _finish(conns[k])
        pgconn.send_query(statement)
        (result,) = waiting.wait(generators.fetch_many(pgconn), pgconn.socket)
        assert result.status == pq.ExecStatus.COPY_IN, result.error_message
        data = HEADER + b"".join(blocks) + TRAILER
        socks[k].setblocking(True)  # one GIL release for the whole COPY
        socks[k].sendall(b"d" + struct.pack("!i", len(data) + 4) + data)
        socks[k].setblocking(False)
        pgconn.put_copy_end()
        while pgconn.flush():
            time.sleep(0)
        pending[k] = True
        if connections == 1:
            _finish(conns[k])
            pending[k] = False
    for k, conn in enumerate(conns):
        if pending[k]:
            _finish(conn)
    seconds = time.perf_counter() - started
    for sock in socks:
        sock.detach()
    for conn in conns:
        conn.close()
    return harness.cfg.entries / seconds


def _spin_process(stop: Event) -> None:
    _spin(stop)


@contextmanager
def busy(kind: str) -> Iterator[None]:
    """Nothing, 4 spinning threads (they hold this process's GIL), or one spinning process
    (a core kept busy, no GIL shared): which of the two slows the COPYs down."""
    if kind == "threads":
        with spinning(SPINNERS):
            yield
        return
    if kind == "process":
        stop = multiprocessing.Event()
        child = multiprocessing.Process(target=_spin_process, args=(stop,), daemon=True)
        child.start()
        try:
            yield
        finally:
            stop.set()
            child.join()
        return
    yield


def main() -> None:
    with embedded_postgres() as dsn:
        cfg = CompareConfig(entries=400_000)
        prepare_table(dsn, cfg.schema, cfg.table)
        harness = Harness(dsn, cfg, server_owned=True, stream=sys.stderr)
        chunks = encode_ceiling(cfg)
        for _ in range(ROUNDS):
            for kind, label in BUSY:
                for connections in (1, 2):
                    harness.reset()
                    with busy(kind):
                        rate = copy_all(harness, chunks, connections)
                    rows, _ = harness.count()
                    assert rows == cfg.entries, rows
                    print(f"{connections} connection(s), {label}: {rate:>9,.0f} rows/s", flush=True)


if __name__ == "__main__":
    main()
