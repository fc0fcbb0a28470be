"""Every field goes in and comes back out of PostgreSQL exactly."""

from __future__ import annotations

import ipaddress
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import auditq
from auditq import AuditEntry, Outcome

from .conftest import Table, WriterFactory

COLUMNS = (
    "id, occurred_at, action, tenant_id, actor_id, actor_type, resource_type, resource_id, "
    "outcome, ip, user_agent, request_id, metadata"
)
NAMES = [name.strip() for name in COLUMNS.split(",")]


def rows_by(table: Table, where: str = "true", *params: Any) -> list[dict[str, Any]]:
    found = table.query(f"SELECT {COLUMNS} FROM {{table}} WHERE {where} ORDER BY id", *params)
    return [dict(zip(NAMES, row, strict=True)) for row in found]


def test_every_field_round_trips_via_log(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(flush_interval=60)
    ident = auditq.uuid7()
    occurred = datetime(
        2024, 2, 29, 23, 59, 58, 123457, tzinfo=timezone(timedelta(hours=5, minutes=30))
    )
    metadata = {
        "nested": {"list": [1, 2.5, {"deep": "日本語テキスト"}], "empty": {}, "none": None},
        "amount": Decimal("1234.5678"),
        "emoji": "🎉👩‍💻",
        "flag": True,
        "big": 2**53,
        "quote": 'she said "hi"\n\ttab',
    }
    assert writer.log(
        "document.shared ✓",
        id=ident,
        occurred_at=occurred,
        tenant_id="租户-一",
        actor_id="用户😀",
        actor_type="human",
        resource_type="文档",
        resource_id="doc/42?x=1&y=ü",
        outcome="success",
        ip="2001:db8:85a3::8a2e:370:7334",
        user_agent="Mozilla/5.0 (X11; Linux) 🦊 Firefox/128.0",
        request_id="req-ÄÖÜ-ß",
        metadata=metadata,
    )
    assert writer.flush(timeout=30)
    (row,) = rows_by(table)
    assert row == {
        "id": ident,
        "occurred_at": occurred,
        "action": "document.shared ✓",
        "tenant_id": "租户-一",
        "actor_id": "用户😀",
        "actor_type": "human",
        "resource_type": "文档",
        "resource_id": "doc/42?x=1&y=ü",
        "outcome": "success",
        "ip": ipaddress.IPv6Address("2001:db8:85a3::8a2e:370:7334"),
        "user_agent": "Mozilla/5.0 (X11; Linux) 🦊 Firefox/128.0",
        "request_id": "req-ÄÖÜ-ß",
        "metadata": {
            "nested": {"list": [1, 2.5, {"deep": "日本語テキスト"}], "empty": {}, "none": None},
            "amount": "1234.5678",
            "emoji": "🎉👩‍💻",
            "flag": True,
            "big": 2**53,
            "quote": 'she said "hi"\n\ttab',
        },
    }
    # Microseconds survive exactly, in any time zone.
    assert row["occurred_at"].microsecond == 123457
    assert row["occurred_at"].astimezone(UTC) == datetime(
        2024, 2, 29, 18, 29, 58, 123457, tzinfo=UTC
    )


def test_defaults_id_and_time_made_at_the_call(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(flush_interval=60)
    before = datetime.now(UTC)
    assert writer.log("minimal")
    after = datetime.now(UTC)
    time.sleep(0.05)  # written later than logged: the stored time must be the call's
    assert writer.flush(timeout=30)
    (row,) = rows_by(table)
    assert row["action"] == "minimal"
    for name in NAMES[3:]:
        assert row[name] is None, name
    stamped: datetime = row["occurred_at"]
    assert before - timedelta(microseconds=1) <= stamped <= after
    ident: uuid.UUID = row["id"]
    assert ident.version == 7
    ms = ident.int >> 80
    assert abs(ms - int(stamped.timestamp() * 1000)) <= 1
    (recorded,) = table.query("SELECT recorded_at FROM {table}")[0]
    assert recorded >= stamped


def test_ipv4_ipv6_and_address_objects(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(flush_interval=60)
    addresses: dict[str, Any] = {
        "v4": "203.0.113.7",
        "v6": "::1",
        "v6-mapped": "::ffff:192.0.2.1",
        "v6-full": "fe80:0000:0000:0000:0202:b3ff:fe1e:8329",
        "obj4": ipaddress.IPv4Address("198.51.100.1"),
        "obj6": ipaddress.IPv6Address("2001:db8::dead:beef"),
    }
    for tag, address in addresses.items():
        assert writer.log("ip.test", resource_id=tag, ip=address)
    assert writer.flush(timeout=30)
    stored = {row[0]: row[1] for row in table.query("SELECT resource_id, ip FROM {table}")}
    assert stored == {tag: ipaddress.ip_address(str(addr)) for tag, addr in addresses.items()}


def test_ids_coerced_to_text(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(flush_interval=60)
    some_uuid = uuid.uuid4()
    assert writer.log("coerce", actor_id=42, resource_id=some_uuid, outcome=Outcome.FAILURE)
    assert writer.flush(timeout=30)
    (row,) = rows_by(table)
    assert (row["actor_id"], row["resource_id"], row["outcome"]) == (
        "42",
        str(some_uuid),
        "failure",
    )


def test_text_at_the_limit_round_trips(table: Table, make_writer: WriterFactory) -> None:
    from auditq.entry import MAX_NAME_CHARS, MAX_USER_AGENT_CHARS

    writer = make_writer(flush_interval=60)
    action = "é" * MAX_NAME_CHARS
    agent = "🦊" * MAX_USER_AGENT_CHARS
    assert writer.log(action, user_agent=agent)
    assert writer.flush(timeout=30)
    assert writer.stats().dead_lettered == 0
    (row,) = rows_by(table)
    assert (row["action"], row["user_agent"]) == (action, agent)


def test_metadata_is_snapshotted_at_the_call(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(flush_interval=60)
    metadata: dict[str, Any] = {"items": [1, 2], "state": "before"}
    assert writer.log("snapshot", metadata=metadata)
    metadata["state"] = "after"
    metadata["items"].append(3)
    assert writer.flush(timeout=30)
    assert table.query("SELECT metadata FROM {table}") == [({"items": [1, 2], "state": "before"},)]


def test_audit_entry_via_write(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(flush_interval=60)
    entry = AuditEntry(
        occurred_at=datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        action="invoice.paid",
        tenant_id="acme",
        actor_id="u-1",
        actor_type="service",
        resource_type="invoice",
        resource_id="inv-🧾-1",
        outcome=Outcome.UNKNOWN,
        ip="2001:db8::1",  # type: ignore[arg-type]
        user_agent="curl/8.0",
        request_id="r-1",
        metadata={"amount": Decimal("10.01"), "lines": [{"sku": "x", "qty": 2}]},
    )
    assert writer.write(entry)
    assert writer.flush(timeout=30)
    (row,) = rows_by(table)
    expected = entry.model_dump()
    expected["outcome"] = "unknown"
    expected["ip"] = ipaddress.IPv6Address("2001:db8::1")
    expected["metadata"] = {"amount": "10.01", "lines": [{"sku": "x", "qty": 2}]}
    assert row == expected
    assert row["occurred_at"].microsecond == 999999


def test_camel_case_mapping_via_write(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(flush_interval=60)
    occurred = datetime(2023, 6, 1, 8, 0, 0, 1, tzinfo=UTC)
    payload = {
        "action": "user.login",
        "tenantId": "t-1",
        "actorId": "a-1",
        "actorType": "user",
        "resourceType": "session",
        "resourceId": "s-1",
        "outcome": "failure",
        "ipAddress": "192.0.2.10",
        "userAgent": "ua/1",
        "requestId": "rq-1",
        "occurredAt": occurred,
        "metadata": {"reason": "bad password", "attempt": 3},
    }
    assert writer.write(payload)
    assert writer.flush(timeout=30)
    (row,) = rows_by(table)
    del row["id"]
    assert row == {
        "occurred_at": occurred,
        "action": "user.login",
        "tenant_id": "t-1",
        "actor_id": "a-1",
        "actor_type": "user",
        "resource_type": "session",
        "resource_id": "s-1",
        "outcome": "failure",
        "ip": ipaddress.IPv4Address("192.0.2.10"),
        "user_agent": "ua/1",
        "request_id": "rq-1",
        "metadata": {"reason": "bad password", "attempt": 3},
    }


def test_write_many_mixed(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(flush_interval=60)
    entries: list[Any] = [
        AuditEntry(action="a", resource_id="0"),
        {"action": "b", "resourceId": "1"},
        {"action": "c", "resource_id": "2"},
        {"action": "", "resource_id": "3"},  # rejected at the call
    ]
    assert writer.write_many(entries) == 3
    assert writer.flush(timeout=30)
    assert sorted(table.query("SELECT action, resource_id FROM {table}")) == [
        ("a", "0"),
        ("b", "1"),
        ("c", "2"),
    ]
    stats = writer.stats()
    assert (stats.accepted, stats.written, stats.rejected) == (3, 3, 1)


def test_outcome_vocabulary_and_own_words_round_trip(
    table: Table, make_writer: WriterFactory
) -> None:
    # "denied" used to be dead-lettered (and refused by a CHECK): the event that matters most.
    writer = make_writer(flush_interval=60)
    words = [*Outcome, "rate_limited", "o" * 64]
    for n, word in enumerate(words):
        assert writer.log("outcome.test", outcome=word, request_id=str(n))
    assert writer.write(AuditEntry(action="outcome.entry", outcome="denied"))
    assert writer.flush(timeout=30)
    stored = dict(
        table.query("SELECT request_id, outcome FROM {table} WHERE request_id IS NOT NULL")
    )
    assert stored == {str(n): str(word) for n, word in enumerate(words)}
    assert table.query("SELECT outcome, metadata FROM {table} WHERE request_id IS NULL") == [
        ("denied", None)
    ]
    assert writer.stats().dead_lettered == 0


def test_large_integers_in_metadata_are_exact(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(flush_interval=60)
    assert writer.log("big.int", metadata={"n": 2**70, "m": -(2**64)})
    assert writer.flush(timeout=30)
    assert table.query("SELECT metadata FROM {table}") == [({"n": 2**70, "m": -(2**64)},)]


def test_origin_is_null_without_one(table: Table, make_writer: WriterFactory) -> None:
    # The writer passes its origin to the sink (an option, AUDITQ_ORIGIN); the encoder
    # alone, without one, sends NULL.
    from auditq.binary import COPY_COLUMNS

    assert COPY_COLUMNS[-1] == "origin"
    writer = make_writer(flush_interval=60)
    assert writer.log("no.origin")
    assert writer.flush(timeout=30)
    (origin,) = table.query("SELECT origin FROM {table}")[0]
    assert origin is None or isinstance(origin, str)
