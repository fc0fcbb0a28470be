"""Invalid input: a call without an action is rejected at the call; a value the table cannot
hold as given is stored repaired and flagged (tests/test_repair.py); a row the writer still
cannot write (a value whose own code raises, a row the server refuses) is dead-lettered with
a reason; strict=True raises InvalidEntry for all of it; nothing sinks the rest of a batch."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import pytest

from auditq import AuditEntry, DeadLetter, InvalidEntry, Outcome
from auditq.entry import (
    MAX_METADATA_BYTES,
    MAX_NAME_CHARS,
    MAX_OUTCOME_CHARS,
    MAX_USER_AGENT_CHARS,
    OUTCOMES,
)

from .conftest import Table, WriterFactory
from .helpers import wait_until


class Unserialisable:
    pass


# -- rejected at the call ----------------------------------------------------------------


@pytest.mark.parametrize("action", ["", None, 42, b"bytes"])
def test_bad_action_rejected_at_the_call(
    action: Any, table: Table, make_writer: WriterFactory
) -> None:
    writer = make_writer(flush_interval=60)
    assert writer.log(action) is False
    assert writer.write({"action": action}) is False
    stats = writer.stats()
    assert (stats.rejected, stats.accepted, stats.calls) == (2, 0, 2)
    assert writer.flush(timeout=10)
    assert table.count() == 0


def test_bad_mappings_rejected_by_write(make_writer: WriterFactory) -> None:
    writer = make_writer(flush_interval=60)
    assert writer.write({"action": "x", "colour": "blue"}) is False
    assert writer.write(42) is False  # type: ignore[arg-type]
    assert writer.write({"tenantId": "t"}) is False  # no action
    assert writer.stats().rejected == 3


def test_rejection_warning_is_rate_limited(
    make_writer: WriterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    writer = make_writer(flush_interval=0.05, warn_interval=60)
    caplog.set_level("WARNING", logger="auditq")
    for _ in range(500):
        assert writer.log("") is False
    assert writer.flush(timeout=10)
    assert writer.log("wake")
    assert writer.flush(timeout=10)

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]

    assert wait_until(lambda: len(lines()) >= 1, timeout=10)
    time.sleep(0.3)  # several more loop steps: still one line, not one per rejection
    assert len(lines()) == 1
    assert "action must be a non-empty string" in lines()[0]
    assert writer.stats().rejected == 500


# -- dead-lettered on the writer side ----------------------------------------------------


class Raises:
    """A value whose text form (str() falls back on repr()) raises what it is given."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __repr__(self) -> str:
        raise self.exc


class Loud(Enum):
    LOUD = "loud"

    @property
    def value(self) -> str:  # type: ignore[override]
        raise SystemExit("from an enum's value")


#: tag -> fields whose own code raises while the writer encodes them
BAD: dict[str, dict[str, Any]] = {
    "system-exit": {"id": Raises(SystemExit(2))},
    "keyboard-interrupt": {"id": Raises(KeyboardInterrupt())},
    "error": {"id": Raises(LookupError("no text for this id"))},
    "enum-value": {"actor_type": Loud.LOUD},
}


def test_a_value_whose_own_code_raises_is_dead_lettered_rest_written(
    table: Table, make_writer: WriterFactory
) -> None:
    # Issue 14, item 5: a SystemExit from a caller's __str__ used to kill the writer thread
    # silently. It is that row's problem, dead-lettered with a reason; the writer goes on.
    letters: list[DeadLetter] = []
    writer = make_writer(batch_size=1000, flush_interval=60, on_dead_letter=letters.append)
    for n, (tag, fields) in enumerate(BAD.items()):
        assert writer.log(f"good.{n}a", resource_type=tag)
        assert writer.log("bad", resource_type=tag, **fields) is True  # checked later
        assert writer.log(f"good.{n}b", resource_type=tag)
    assert writer.flush(timeout=30)
    stats = writer.stats()
    assert stats.dead_lettered == len(BAD) == len(letters)
    assert stats.written == 2 * len(BAD)
    assert stats.batches == 1  # the good rows of the same batch went in one COPY
    assert stats.accepted == stats.written + stats.dead_lettered
    assert table.count() == 2 * len(BAD)
    assert writer._thread is not None and writer._thread.is_alive()
    by_tag = {letter.entry["resource_type"]: letter for letter in letters}
    assert set(by_tag) == set(BAD)
    for letter in letters:
        assert letter.reason.startswith("a value's own code failed while it was encoded: ")
    assert by_tag["error"].reason.endswith("LookupError: no text for this id")
    assert by_tag["system-exit"].reason.endswith("SystemExit: 2")
    assert writer.log("good.later")
    assert writer.flush(timeout=30)
    assert table.count() == 2 * len(BAD) + 1


def test_server_rejected_row_isolated(table: Table, make_writer: WriterFactory) -> None:
    # A row that passes every client-side check but that the server refuses: split the
    # batch, write the rest, dead-letter that row with the server's reason.
    table.execute(
        "ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (tenant_id IS DISTINCT FROM 'poison')"
    )
    letters: list[DeadLetter] = []
    writer = make_writer(batch_size=1000, flush_interval=60, on_dead_letter=letters.append)
    for i in range(100):
        assert writer.log(
            "split", tenant_id="poison" if i in (7, 60) else "fine", resource_id=str(i)
        )
    assert writer.flush(timeout=30)
    assert table.count() == 98
    assert sorted(letter.entry["resource_id"] for letter in letters) == ["60", "7"]
    assert all("no_poison" in letter.reason for letter in letters)
    stats = writer.stats()
    assert (stats.written, stats.dead_lettered, stats.pending) == (98, 2, 0)


def test_duplicate_id_dead_lettered_not_duplicated(
    table: Table, make_writer: WriterFactory
) -> None:
    letters: list[DeadLetter] = []
    writer = make_writer(flush_interval=60, on_dead_letter=letters.append)
    ident = uuid.uuid4()
    assert writer.log("first", id=ident)
    assert writer.flush(timeout=30)
    assert writer.log("other.1")
    assert writer.log("second", id=ident)
    assert writer.log("other.2")
    assert writer.flush(timeout=30)
    assert sorted(a for (a,) in table.query("SELECT action FROM {table}")) == [
        "first",
        "other.1",
        "other.2",
    ]
    assert len(letters) == 1
    assert "duplicate" in letters[0].reason
    assert writer.stats().dead_lettered == 1


def test_failing_dead_letter_callback_does_not_stop_the_writer(
    table: Table, make_writer: WriterFactory
) -> None:
    def explode(letter: DeadLetter) -> None:
        raise RuntimeError("callback bug")

    writer = make_writer(flush_interval=60, on_dead_letter=explode)
    assert writer.log("bad", id=Raises(LookupError("no id")))
    assert writer.log("good")
    assert writer.flush(timeout=30)
    assert writer.log("good.later")
    assert writer.flush(timeout=30)
    assert table.count() == 2


# -- strict ------------------------------------------------------------------------------

#: What strict mode still refuses: each is stored repaired by a writer that is not strict.
STRICT_BAD: dict[str, tuple[str, dict[str, Any], str]] = {
    "empty-action": ("", {}, "action"),
    "nul": ("x", {"actor_id": "a\x00b"}, "actor_id"),
    "surrogate": ("x", {"request_id": "\udc80"}, "request_id"),
    "ip": ("x", {"ip": "300.0.0.1"}, "ip"),
    "ip-scoped": ("x", {"ip": "fe80::1%eth0"}, "ip"),
    "long-outcome": ("x", {"outcome": "o" * (MAX_OUTCOME_CHARS + 1)}, "outcome"),
    "long-action": ("a" * (MAX_NAME_CHARS + 1), {}, "action"),
    "long-agent": ("x", {"user_agent": "u" * (MAX_USER_AGENT_CHARS + 1)}, "user_agent"),
    "naive": ("x", {"occurred_at": datetime(2024, 1, 1)}, "occurred_at"),
    "metadata": ("x", {"metadata": {"o": Unserialisable()}}, "metadata"),
    "metadata-nul": ("x", {"metadata": {"o": "\x00"}}, "metadata"),
    "metadata-nan": ("x", {"metadata": {"o": float("nan")}}, "metadata"),
    "metadata-big": ("x", {"metadata": {"o": "m" * MAX_METADATA_BYTES}}, "metadata"),
    "metadata-list": ("x", {"metadata": ["a"]}, "metadata"),
    "id": ("x", {"id": "nope"}, "id"),
}


@pytest.mark.parametrize("case", list(STRICT_BAD), ids=list(STRICT_BAD))
def test_strict_raises_invalid_entry(case: str, table: Table, make_writer: WriterFactory) -> None:
    action, fields, field = STRICT_BAD[case]
    writer = make_writer(strict=True, flush_interval=60)
    with pytest.raises(InvalidEntry) as info:
        writer.log(action, **fields)
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)
    with pytest.raises(InvalidEntry):
        writer.write({"action": action, **fields})
    stats = writer.stats()
    assert (stats.rejected, stats.accepted) == (2, 0)
    # A valid call on the same strict writer still goes through.
    assert writer.log("ok", occurred_at=datetime(2024, 1, 1, tzinfo=UTC), ip="::1")
    assert writer.flush(timeout=30)
    assert table.count() == 1


@pytest.mark.parametrize("outcome", [*sorted(OUTCOMES), "timeout", "o" * MAX_OUTCOME_CHARS])
def test_strict_takes_any_outcome_within_the_limit(
    outcome: str, table: Table, make_writer: WriterFactory
) -> None:
    # The vocabulary is a suggestion: strict validation agrees with the table, which takes
    # any outcome up to MAX_OUTCOME_CHARS.
    writer = make_writer(strict=True, flush_interval=60)
    assert writer.log("x", outcome=outcome)
    assert writer.write(AuditEntry(action="y", outcome=outcome))
    assert writer.flush(timeout=30)
    assert table.query("SELECT DISTINCT outcome, metadata FROM {table}") == [(outcome, None)]


def test_outcome_enum_has_the_vocabulary() -> None:
    assert {o.value for o in Outcome} == OUTCOMES
    assert {"success", "failure", "denied", "error", "unknown"} == OUTCOMES
    entry = AuditEntry(action="x", outcome=Outcome.DENIED)
    assert entry.to_row()[8] == "denied" and type(entry.to_row()[8]) is str
