"""The counters add up exactly, under contention, and match what the table holds."""

from __future__ import annotations

import threading

from auditq import WriterStats

from .conftest import Table, WriterFactory

THREADS = 8
CALLS = 3000
INVALID_EVERY = 500  # every 500th call is invalid, so rejections are in the sum too


def check_invariant(stats: WriterStats) -> None:
    assert stats.accepted == stats.written + stats.dead_lettered + stats.spooled + stats.pending
    assert stats.calls == stats.accepted + stats.dropped_overflow + stats.rejected


def test_overflow_accounting_is_exact(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(max_queue=200, batch_size=50, flush_interval=0.05)
    barrier = threading.Barrier(THREADS + 1)
    results: list[tuple[int, int]] = [(0, 0)] * THREADS
    errors: list[BaseException] = []
    snapshots: list[WriterStats] = []
    done = threading.Event()

    def produce(n: int) -> None:
        try:
            barrier.wait()
            true = false = 0
            for i in range(CALLS):
                if i % INVALID_EVERY == INVALID_EVERY - 1:
                    ok = writer.log("")
                else:
                    ok = writer.log("load.test", actor_id=f"t{n}", resource_id=str(i))
                if ok:
                    true += 1
                else:
                    false += 1
            results[n] = (true, false)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def monitor() -> None:
        while not done.is_set():
            snapshots.append(writer.stats())

    producers = [threading.Thread(target=produce, args=(n,)) for n in range(THREADS)]
    watcher = threading.Thread(target=monitor)
    for thread in producers:
        thread.start()
    watcher.start()
    barrier.wait()
    for thread in producers:
        thread.join(120)
    done.set()
    watcher.join(30)
    assert not errors
    assert writer.flush(timeout=60)

    calls = THREADS * CALLS
    returned_true = sum(t for t, _ in results)
    returned_false = sum(f for _, f in results)
    assert returned_true + returned_false == calls
    stats = writer.stats()
    check_invariant(stats)
    assert stats.calls == calls
    assert stats.accepted == returned_true
    assert stats.dropped_overflow + stats.rejected == returned_false
    assert stats.rejected == THREADS * (CALLS // INVALID_EVERY)
    assert stats.dropped_overflow > 0
    assert stats.pending == 0
    assert stats.dead_lettered == 0
    assert stats.written == stats.accepted
    assert table.count() == stats.written
    assert table.distinct_ids() == table.count()
    # Per producer, what it was told was accepted is what was stored.
    stored = dict(table.query("SELECT actor_id, count(*) FROM {table} GROUP BY actor_id"))
    assert sum(stored.values()) == returned_true

    # The invariant held in every snapshot taken while the producers ran, and no counter
    # ever went backwards.
    assert snapshots
    previous = snapshots[0]
    for snap in snapshots:
        check_invariant(snap)
        for name in ("accepted", "written", "dropped_overflow", "rejected", "batches"):
            assert getattr(snap, name) >= getattr(previous, name), name
        previous = snap

    assert writer.close(timeout=30)
    final = writer.stats()
    check_invariant(final)
    assert (final.written, final.pending) == (stats.written, 0)


def test_write_many_counts(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(max_queue=10, batch_size=1000, flush_interval=60)
    accepted = writer.write_many({"action": "many", "resourceId": str(i)} for i in range(25))
    assert accepted == 10
    stats = writer.stats()
    check_invariant(stats)
    assert (stats.accepted, stats.dropped_overflow, stats.calls) == (10, 15, 25)
    assert writer.flush(timeout=30)
    assert table.count() == 10
    # Draining made room again.
    assert writer.write_many([{"action": "again"}] * 3) == 3
    assert writer.flush(timeout=30)
    assert table.count() == 13
