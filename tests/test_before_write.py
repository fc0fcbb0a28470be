"""The `before_write` hook: redaction and enrichment on the writer thread, counted exactly."""

from __future__ import annotations

import json
from typing import Any

import pytest

from auditq import DeadLetter
from auditq.hooks import mask

from .conftest import Table, WriterFactory


def test_a_hook_rewrites_drops_and_fails_and_every_entry_is_accounted_for(
    table: Table, make_writer: WriterFactory
) -> None:
    letters: list[DeadLetter] = []

    def hook(entry: dict[str, Any]) -> dict[str, Any] | None:
        if entry["action"] == "noise":
            return None
        if entry["action"] == "broken":
            raise RuntimeError("the hook trips")
        if entry["action"] == "odd":
            return {**entry, "colour": "red"}
        entry["tenant_id"] = entry["tenant_id"] or "t-default"
        entry["metadata"] = {**(entry["metadata"] or {}), "region": "eu"}
        return entry

    writer = make_writer(before_write=hook, on_dead_letter=letters.append)
    for action in ("kept", "noise", "broken", "odd", "kept"):
        assert writer.log(action, metadata={"n": 1})
    assert writer.flush(timeout=10)
    stats = writer.stats()
    assert (stats.written, stats.filtered, stats.dead_lettered) == (2, 1, 2), stats
    assert stats.accepted == stats.written + stats.dead_lettered + stats.spooled + (
        stats.pending + stats.filtered
    )
    rows = table.query("SELECT tenant_id, metadata FROM {table}")
    assert rows == [("t-default", {"n": 1, "region": "eu"})] * 2
    reasons = sorted(letter.reason for letter in letters)
    assert reasons[0].startswith("before_write failed: RuntimeError: the hook trips")
    assert "unknown field(s): colour" in reasons[1]


def test_the_masker_hides_fields_and_metadata_keys_and_says_so(
    table: Table, make_writer: WriterFactory
) -> None:
    writer = make_writer(
        before_write=mask(fields=["ip", "user_agent"], metadata_keys=["password", "Token"])
    )
    assert writer.log(
        "user.login",
        ip="203.0.113.7",
        user_agent="curl/8",
        metadata={"user": "u-7", "password": "hunter2", "nested": [{"token": "t"}]},
    )
    assert writer.flush(timeout=10)
    ((ip, agent, metadata),) = table.query("SELECT ip, user_agent, metadata FROM {table}")
    assert ip is None and agent == "***"
    assert metadata["password"] == "***" and metadata["nested"] == [{"token": "***"}]  # noqa: S105
    assert metadata["user"] == "u-7"
    masked = metadata["_auditq"]["masked"]
    assert set(masked) >= {"ip", "user_agent", "metadata.password", "metadata.nested.token"}
    assert "hunter2" not in json.dumps(metadata)


def test_the_masker_refuses_what_it_cannot_mask() -> None:
    with pytest.raises(ValueError, match="cannot mask 'action'"):
        mask(fields=["action"])
