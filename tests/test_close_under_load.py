"""close() while many threads keep calling log(): the refused calls are counted without the
ledger's lock, and the accounting stays exact in every snapshot (issue 16). Timing is
`benchmarks/close_drain.py`'s to measure; here only what is counted."""

from __future__ import annotations

import logging
import threading

import pytest

from auditq import AuditWriter

from .conftest import Table, WriterFactory

THREADS = 8
QUEUED = 5_000


def _hammer(
    writer: AuditWriter, go: threading.Event, stop: threading.Event, out: list[int]
) -> None:
    go.wait()
    calls = refused = 0
    while not stop.is_set():
        for _ in range(50):
            if not writer.log("closing.hammer", tenant_id="t", metadata={"k": calls}):
                refused += 1
            calls += 1
    out.extend((calls, refused))


def _exact(writer: AuditWriter) -> None:
    stats = writer.stats()
    assert stats.calls == stats.accepted + stats.dropped_overflow + stats.rejected
    assert stats.accepted == (
        stats.written + stats.dead_lettered + stats.spooled + stats.pending + stats.filtered
    )


@pytest.mark.parametrize("python_path", [False, True], ids=["c-path", "python-path"])
def test_accounting_exact_with_eight_threads_hammering_a_closing_writer(
    table: Table, make_writer: WriterFactory, python_path: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # A strict writer takes every call in Python (the C caller path is for the others).
    writer = make_writer(
        batch_size=500, max_queue=QUEUED, wake_rows=QUEUED + 1, flush_interval=3600
    )
    if python_path:
        writer.strict = True
    for n in range(QUEUED):
        assert writer.log("closing.queued", resource_id=str(n))
    go, stop = threading.Event(), threading.Event()
    results: list[list[int]] = [[] for _ in range(THREADS)]
    threads = [
        threading.Thread(target=_hammer, args=(writer, go, stop, results[k]))
        for k in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    go.set()
    # Snapshots taken while the threads hammer and close() drains: exact in every one.
    closing = threading.Thread(target=lambda: writer.close(timeout=60))
    with caplog.at_level(logging.WARNING, logger="auditq"):
        closing.start()
        while closing.is_alive():
            _exact(writer)
        closing.join()
        for _ in range(20):
            _exact(writer)
        stop.set()
        for thread in threads:
            thread.join()
        writer.close(timeout=5)  # again: its final report says what came after the first
    calls = sum(r[0] for r in results)
    refused = sum(r[1] for r in results)
    stats = writer.stats()
    _exact(writer)
    assert stats.calls == QUEUED + calls
    # Every refused call is counted once, as dropped (queue full before the close) or
    # rejected (after it), and every accepted one is in the table.
    assert stats.dropped_overflow + stats.rejected == refused
    assert stats.rejected > 0
    assert stats.pending == 0
    assert stats.written == table.count() == stats.accepted
    # The final reports name every refusal, with their number.
    reports = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert reports, "close() did not report the refused calls"
    named = sum(int(line.split()[1]) for line in reports if line.startswith("rejected "))
    assert named == stats.rejected


def test_refusals_of_threads_that_ended_are_kept_without_a_cell_each(
    make_writer: WriterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A thread per request, each refused once: the count stays exact, and the ledger does
    not keep one cell per thread that ever was (they are folded at the next report)."""
    writer = make_writer()
    writer.close(timeout=5)
    for _ in range(200):
        thread = threading.Thread(target=lambda: writer.log("closing.once"))
        thread.start()
        thread.join()
    assert writer.stats().rejected == 200
    with caplog.at_level(logging.WARNING, logger="auditq"):
        writer.close(timeout=5)  # its final report folds the ended threads' cells
    assert writer.stats().rejected == 200
    assert len(writer._ledger._reject_cells) == 0
    assert any(r.getMessage().startswith("rejected 200 ") for r in caplog.records)
    _exact(writer)
