"""The module-level API (configure/log/write_audit_log(s)/flush/shutdown) and context binding."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from typing import Any

import pytest

import auditq
from auditq import AuditEntry
from auditq.context import current

from .conftest import Table


def _configure(table: Table, **options: Any) -> auditq.AuditWriter:
    options.setdefault("flush_interval", 60)
    return auditq.configure(table.dsn, schema=table.schema, table=table.name, **options)


CONTEXT_COLUMNS = "tenant_id, actor_id, actor_type, request_id, host(ip), user_agent"


def _by_action(table: Table) -> dict[str, tuple[Any, ...]]:
    rows = table.query(f"SELECT action, {CONTEXT_COLUMNS} FROM {{table}}")
    return {row[0]: tuple(row[1:]) for row in rows}


def test_module_api_end_to_end(default_writer: None, table: Table) -> None:
    writer = _configure(table)
    assert auditq.get_writer() is writer
    assert auditq.log("mod.log", tenant_id="t1", metadata={"k": [1]}) is True
    assert auditq.write_audit_log({"action": "mod.camel", "tenantId": "t2", "ipAddress": "::1"})
    assert auditq.write_audit_log(AuditEntry(action="mod.entry", tenant_id="t3"))
    assert (
        auditq.write_audit_logs(
            [{"action": "mod.many", "resourceId": str(i)} for i in range(3)]
            + [AuditEntry(action="mod.many", resource_id="3"), {"action": ""}]
        )
        == 4
    )
    assert auditq.flush(timeout=30) is True
    assert table.count() == 7
    assert sorted(
        table.query("SELECT action, tenant_id FROM {table} WHERE tenant_id IS NOT NULL")
    ) == [
        ("mod.camel", "t2"),
        ("mod.entry", "t3"),
        ("mod.log", "t1"),
    ]
    assert auditq.log("mod.last")
    assert auditq.shutdown(timeout=30) is True
    assert writer.closed
    assert table.count() == 8
    stats = writer.stats()
    assert (stats.accepted, stats.written, stats.rejected, stats.pending) == (8, 8, 1, 0)


def test_unconfigured_module_api_discards_with_one_warning(
    default_writer: None, caplog: pytest.LogCaptureFixture
) -> None:
    import auditq.default

    auditq.default._warned_unconfigured = False
    caplog.set_level("WARNING", logger="auditq")
    assert auditq.get_writer() is None
    assert auditq.log("nowhere") is False
    assert auditq.write_audit_log({"action": "nowhere"}) is False
    assert auditq.write_audit_logs([{"action": "nowhere"}]) == 0
    assert auditq.flush(timeout=1) is True
    assert auditq.shutdown(timeout=1) is True
    assert caplog.text.count("not configured") == 1


def test_configure_again_closes_the_previous_writer(default_writer: None, table: Table) -> None:
    first = _configure(table)
    assert auditq.log("first")
    second = _configure(table)
    assert first.closed and not second.closed
    assert auditq.get_writer() is second
    assert table.count() == 1  # the old writer drained on close
    assert auditq.log("second")
    assert auditq.flush(timeout=30)
    assert table.count() == 2


def test_configured_from_environment(
    default_writer: None, table: Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUDITQ_DSN", table.dsn)
    monkeypatch.setenv("AUDITQ_SCHEMA", table.schema)
    monkeypatch.setenv("AUDITQ_TABLE", table.name)
    monkeypatch.setenv("AUDITQ_FLUSH_INTERVAL", "60")
    monkeypatch.setenv("AUDITQ_BATCH_SIZE", "7")
    assert auditq.log("from.env")  # configures itself on first use
    writer = auditq.get_writer()
    assert writer is not None
    assert (writer.table, writer.schema, writer.batch_size, writer.flush_interval) == (
        table.name,
        table.schema,
        7,
        60.0,
    )
    assert auditq.flush(timeout=30)
    assert table.count() == 1
    assert auditq.shutdown(timeout=30)
    assert auditq.log("after.shutdown.reconfigures")  # a later log() configures a new one
    assert auditq.get_writer() is not writer
    assert auditq.shutdown(timeout=30)
    assert table.count() == 2


# -- context binding -------------------------------------------------------------------


def test_context_fills_unset_fields(default_writer: None, table: Table) -> None:
    _configure(table)
    bound = {
        "tenant_id": "acme",
        "actor_id": "u-7",
        "actor_type": "user",
        "request_id": "req-1",
        "ip": "2001:db8::7",
        "user_agent": "ua/1",
    }
    with auditq.context(**bound) as seen:
        assert seen == bound
        assert auditq.get_context() == bound
        assert auditq.log("ctx.bound")
        assert auditq.log("ctx.override", tenant_id="other", ip="10.0.0.1")
        assert auditq.write_audit_log({"action": "ctx.mapping", "actorId": "u-8"})
    assert auditq.get_context() == dict.fromkeys(bound)
    assert auditq.log("ctx.outside")
    assert auditq.flush(timeout=30)
    rows = _by_action(table)
    assert rows["ctx.bound"] == ("acme", "u-7", "user", "req-1", "2001:db8::7", "ua/1")
    assert rows["ctx.override"] == ("other", "u-7", "user", "req-1", "10.0.0.1", "ua/1")
    assert rows["ctx.mapping"] == ("acme", "u-8", "user", "req-1", "2001:db8::7", "ua/1")
    assert rows["ctx.outside"] == (None,) * 6


def test_bind_unbind_and_nesting(default_writer: None, table: Table) -> None:
    _configure(table)
    token = auditq.bind(tenant_id="t", request_id="r")
    try:
        with auditq.context(actor_id="a"):
            with auditq.context(request_id="inner"):
                assert auditq.log("nested")
            assert auditq.log("middle")
        auditq.unbind("request_id")
        assert auditq.log("unbound.one")
        auditq.unbind()
        assert auditq.log("unbound.all")
    finally:
        current.reset(token)
    assert all(value is None for value in auditq.get_context().values())
    assert auditq.flush(timeout=30)
    rows = _by_action(table)
    assert rows["nested"][:4] == ("t", "a", None, "inner")
    assert rows["middle"][:4] == ("t", "a", None, "r")
    assert rows["unbound.one"][:4] == ("t", None, None, None)
    assert rows["unbound.all"] == (None,) * 6
    with pytest.raises(TypeError):
        auditq.bind(colour="blue")
    with pytest.raises(TypeError):
        auditq.context(colour="blue")


def test_context_is_per_thread(default_writer: None, table: Table) -> None:
    _configure(table)
    seen: list[dict[str, Any]] = []

    def other_thread() -> None:
        seen.append(auditq.get_context())
        assert auditq.log("ctx.thread")

    with auditq.context(tenant_id="main-only"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(10)
        assert auditq.log("ctx.main")
    assert seen and seen[0]["tenant_id"] is None
    assert auditq.flush(timeout=30)
    rows = _by_action(table)
    assert rows["ctx.thread"][0] is None
    assert rows["ctx.main"][0] == "main-only"


def test_context_per_asyncio_task_and_decorators(default_writer: None, table: Table) -> None:
    _configure(table)

    @auditq.context(actor_type="service")
    async def handler(tenant: str, delay: float) -> None:
        with auditq.context(tenant_id=tenant, request_id=f"req-{tenant}"):
            await asyncio.sleep(delay)  # interleave the tasks
            assert auditq.log(f"task.{tenant}")

    @auditq.context(tenant_id="sync-tenant")
    def sync_handler() -> None:
        assert auditq.log("sync.decorated")

    async def main() -> None:
        await asyncio.gather(*(handler(f"t{i}", 0.01 * (5 - i)) for i in range(5)))

    asyncio.run(main())
    sync_handler()
    assert auditq.get_context()["tenant_id"] is None
    assert auditq.flush(timeout=30)
    rows = _by_action(table)
    for i in range(5):
        tenant, _, actor_type, request_id, _, _ = rows[f"task.t{i}"]
        assert (tenant, actor_type, request_id) == (f"t{i}", "service", f"req-t{i}")
    assert rows["sync.decorated"][0] == "sync-tenant"


def test_context_ip_invalid_is_stored_flagged_not_raised(
    default_writer: None, table: Table
) -> None:
    writer = _configure(table)
    with auditq.context(ip="not-an-ip"):
        assert auditq.log("ctx.bad.ip") is True
    assert auditq.log("ctx.good", ip=ipaddress.ip_address("192.0.2.1"))
    assert auditq.flush(timeout=30)
    assert writer.stats().dead_lettered == 0
    assert sorted(table.query("SELECT action, ip, metadata FROM {table}")) == [
        ("ctx.bad.ip", None, {"_auditq": {"invalid": ["ip"], "ip": "not-an-ip"}}),
        ("ctx.good", ipaddress.ip_address("192.0.2.1"), None),
    ]
