"""Invalid input: rejected at the call when cheap, dead-lettered with a reason otherwise,
raised as InvalidEntry with strict=True; never sinks the rest of a batch."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

import auditq
from auditq import DeadLetter, InvalidEntry
from auditq.entry import MAX_METADATA_BYTES, MAX_NAME_CHARS

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


@pytest.mark.parametrize(
    "metadata",
    [
        {"x": Unserialisable()},
        {"when": {"nested": object()}},
        {1: "non-string key"},
        ["not", "a", "mapping"],
        "a string",
        {"nul": "a\x00b"},
        {"big": "x" * (MAX_METADATA_BYTES + 1)},
    ],
    ids=["object", "nested-object", "int-key", "list", "str", "nul", "too-big"],
)
def test_bad_metadata_rejected_at_the_call(
    metadata: Any, table: Table, make_writer: WriterFactory
) -> None:
    writer = make_writer(flush_interval=60)
    assert writer.log("meta.bad", metadata=metadata) is False
    assert writer.log("meta.good", metadata={"ok": Decimal("1.5")}) is True
    stats = writer.stats()
    assert (stats.rejected, stats.accepted) == (1, 1)
    assert writer.flush(timeout=30)
    assert table.query("SELECT action, metadata FROM {table}") == [("meta.good", {"ok": "1.5"})]


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

#: tag -> (fields that the writer cannot encode, the field its reason must name)
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "nul": ({"actor_id": "ali\x00ce"}, "actor_id"),
    "nul-ua": ({"user_agent": "x\x00"}, "user_agent"),
    "ip": ({"ip": "999.1.1.1"}, "ip"),
    "ip-word": ({"ip": "localhost"}, "ip"),
    "ip-scoped": ({"ip": "fe80::1%eth0"}, "ip"),
    "outcome": ({"outcome": "weird"}, "outcome"),
    "long-action": ({"action": "a" * (MAX_NAME_CHARS + 1)}, "action"),
    "long-tenant": ({"tenant_id": "t" * (MAX_NAME_CHARS + 1)}, "tenant_id"),
    "naive": ({"occurred_at": datetime(2024, 1, 1, 12, 0)}, "occurred_at"),
    "time-type": ({"occurred_at": "2024-01-01"}, "occurred_at"),
    "id": ({"id": "not-a-uuid"}, "id"),
    "type": ({"resource_id": ["a", "list"]}, "resource_id"),
    "surrogate": ({"request_id": "bad \udc80 text"}, "request_id"),
}


def _log_all(writer: auditq.AuditWriter) -> None:
    for n, (tag, (fields, _)) in enumerate(BAD.items()):
        assert writer.log(f"good.{n}a", resource_type=tag)
        fields = dict(fields)
        action = fields.pop("action", "bad")
        assert writer.log(action, resource_type=tag, **fields) is True  # accepted; checked later
        assert writer.log(f"good.{n}b", resource_type=tag)


def test_writer_side_bad_values_dead_lettered_rest_written(
    table: Table, make_writer: WriterFactory
) -> None:
    letters: list[DeadLetter] = []
    writer = make_writer(batch_size=1000, flush_interval=60, on_dead_letter=letters.append)
    _log_all(writer)
    assert writer.flush(timeout=30)
    stats = writer.stats()
    assert stats.dead_lettered == len(BAD) == len(letters)
    assert stats.written == 2 * len(BAD)
    assert stats.batches == 1  # the good rows of the same batch went in one COPY
    assert stats.accepted == stats.written + stats.dead_lettered
    assert table.count() == 2 * len(BAD)
    assert not table.query("SELECT 1 FROM {table} WHERE action NOT LIKE 'good.%%'")
    by_tag = {letter.entry["resource_type"]: letter for letter in letters}
    assert set(by_tag) == set(BAD)
    for tag, (_, field) in BAD.items():
        reason = by_tag[tag].reason
        assert reason.startswith(f"{field}:"), (tag, reason)
        assert by_tag[tag].at.tzinfo is not None


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
    assert writer.log("bad", outcome="weird")
    assert writer.log("good")
    assert writer.flush(timeout=30)
    assert writer.log("good.later")
    assert writer.flush(timeout=30)
    assert table.count() == 2


# -- strict ------------------------------------------------------------------------------

STRICT_BAD: dict[str, tuple[str, dict[str, Any], str]] = {
    "empty-action": ("", {}, "action"),
    "nul": ("x", {"actor_id": "a\x00b"}, "actor_id"),
    "ip": ("x", {"ip": "300.0.0.1"}, "ip"),
    "outcome": ("x", {"outcome": "weird"}, "outcome"),
    "long-action": ("a" * (MAX_NAME_CHARS + 1), {}, "action"),
    "naive": ("x", {"occurred_at": datetime(2024, 1, 1)}, "occurred_at"),
    "metadata": ("x", {"metadata": {"o": Unserialisable()}}, "metadata"),
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
