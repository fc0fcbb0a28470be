"""Faults in the data and the schema: rows the server rejects, a missing table."""

from __future__ import annotations

import logging
import math
import random

import pytest

from auditq.schema import create
from auditq.writer import DeadLetter

from ..conftest import Table
from ..helpers import wait_until
from .conftest import Attempts, Caller, WriterMaker, assert_exact, stored_numbers

POISON = "poison"


def test_poison_rows_are_isolated_in_few_round_trips(
    pg_dsn: str, table: Table, writers: WriterMaker
) -> None:
    # A constraint the writer cannot know about: only the server can reject these rows.
    table.execute(
        f"ALTER TABLE {{table}} ADD CONSTRAINT no_poison CHECK (resource_id <> '{POISON}')"
    )
    dead: list[DeadLetter] = []
    writer = writers(pg_dsn, table, batch_size=1000, on_dead_letter=dead.append)
    attempts = Attempts(writer)
    caller = Caller(writer)
    total, bad = 8000, 12
    poisoned = set(random.Random(3).sample(range(total), bad))
    for i in range(total):
        caller.log("fault.test", request_id=str(i), resource_id=POISON if i in poisoned else "ok")
    assert writer.flush(timeout=60)

    stats = writer.stats()
    assert stats.dead_lettered == bad == len(dead)
    assert sorted(int(d.entry["request_id"]) for d in dead) == sorted(poisoned)
    for letter in dead:
        assert letter.entry["resource_id"] == POISON
        assert "rejected by the server" in letter.reason
        assert 'violates check constraint "no_poison"' in letter.reason
    assert stats.written == total - bad
    assert stored_numbers(table) == sorted(set(range(total)) - poisoned)
    assert_exact(writer, table, caller)
    # Halving isolates the k bad rows of a batch of n in at most 1 + 2k*ceil(log2 n) round
    # trips: on each level, a failed half holding a bad row and its two halves below.
    bound = 0
    for batch in attempts.deliveries:
        k = sum(item[1] is not None and item[1][7] == POISON for item in batch)
        bound += 1 + 2 * k * math.ceil(math.log2(len(batch))) if k else 1
    print(
        f"\n[poison] {attempts.attempts} round trips for {len(attempts.deliveries)} batches"
        f" with {bad} bad rows (bound {bound}; one per row would be {total})"
    )
    assert attempts.attempts <= bound
    caller.check_latency("poison rows")


def test_repaired_rows_are_written_beside_poison_rows(
    pg_dsn: str, table: Table, writers: WriterMaker
) -> None:
    # Rows with bad content (cut, replaced, nulled) share batches with rows the server
    # refuses: only the refused ones are dead-lettered, every repaired one is stored flagged.
    table.execute(
        f"ALTER TABLE {{table}} ADD CONSTRAINT no_poison CHECK (resource_id <> '{POISON}')"
    )
    dead: list[DeadLetter] = []
    writer = writers(pg_dsn, table, batch_size=500, on_dead_letter=dead.append)
    caller = Caller(writer)
    total = 3000
    odd = [
        {"user_agent": "u" * 2000},
        {"ip": "not-an-ip"},
        {"actor_id": "a\x00b"},
        {"outcome": "denied"},
        {"tenant_id": ["not", "text"]},
    ]
    poisoned = set(random.Random(5).sample(range(total), 7))
    for i in range(total):
        fields = dict(odd[i % len(odd)]) if i % 3 == 0 else {}
        resource = POISON if i in poisoned else "ok"
        caller.log("fault.test", request_id=str(i), resource_id=resource, **fields)
    assert writer.flush(timeout=60)
    stats = writer.stats()
    assert sorted(int(d.entry["request_id"]) for d in dead) == sorted(poisoned)
    assert stats.written == total - len(poisoned)
    assert stored_numbers(table) == sorted(set(range(total)) - poisoned)
    flagged = table.query("SELECT count(*) FROM {table} WHERE metadata ? '_auditq'")[0][0]
    expected = sum(1 for i in range(0, total, 3) if i not in poisoned and i % 5 != 3)
    assert flagged == expected
    assert_exact(writer, table, caller)


def test_missing_table_logs_once_then_resumes(
    pg_dsn: str, table: Table, writers: WriterMaker, caplog: pytest.LogCaptureFixture
) -> None:
    table.execute("DROP TABLE {table}")
    caplog.set_level(logging.INFO, logger="auditq")
    writer = writers(pg_dsn, table, batch_size=100)
    caller = Caller(writer)
    caller.stream(300, chunk=100)
    assert wait_until(lambda: writer.stats().retries >= 5, timeout=20)

    problems = [r for r in caplog.records if r.name == "auditq" and r.levelno >= logging.WARNING]
    assert len(problems) == 1, [r.getMessage() for r in problems]
    message = problems[0].getMessage()
    assert problems[0].levelno == logging.ERROR
    assert "auditq init-db" in message
    assert "does not exist" in message  # the server's own words, naming the table
    assert writer.stats().written == 0

    create(pg_dsn, schema=table.schema, table=table.name)
    assert writer.flush(timeout=30)
    caller.stream(200, chunk=100, start=300)
    assert writer.flush(timeout=30)

    stats = writer.stats()
    assert stats.written == 500
    assert stats.dropped_overflow == stats.dead_lettered == stats.rejected == 0
    assert_exact(writer, table, caller)
    assert stored_numbers(table) == list(range(500))
    problems = [r for r in caplog.records if r.name == "auditq" and r.levelno >= logging.WARNING]
    assert len(problems) == 1, [r.getMessage() for r in problems]
    assert any("recovered" in r.getMessage() for r in caplog.records if r.name == "auditq")
    caller.check_latency("missing table")
