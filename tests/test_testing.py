"""auditq.testing: the capturing writer (checked against the real writer on a real table),
the `audit_events` fixture and plugin, and the AUDITQ_DISABLED writer."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import auditq
from auditq.middleware import AuditWSGIMiddleware
from auditq.testing import CapturingWriter, DisabledWriter, capture, disabled, disabled_writer

from .conftest import Table, WriterFactory
from .helpers import ROOT

CALLS: list[tuple[str, dict[str, Any]]] = [
    ("doc.share", {"resource_type": "document", "resource_id": "d-1", "outcome": "success"}),
    ("doc.view", {"metadata": {"page": 3}, "ip": "203.0.113.9"}),
    ("doc.delete", {"actor_id": "explicit", "resource_id": "d-2"}),
]
WRITES: list[dict[str, Any]] = [
    {"action": "legacy.write", "tenantId": "t-9", "resourceId": "r-1"},
]
COMPARED = ("action", "tenant_id", "actor_id", "actor_type", "resource_type", "resource_id")


def _drive(writer: Any) -> None:
    with auditq.context(tenant_id="t-1", actor_id="u-1", actor_type="user", request_id="q-1"):
        for action, fields in CALLS:
            assert writer.log(action, **fields)
    assert writer.write_many(WRITES) == len(WRITES)


def test_captures_what_the_real_writer_writes(table: Table, make_writer: WriterFactory) -> None:
    real, fake = make_writer(), CapturingWriter()
    _drive(real)
    _drive(fake)
    assert real.flush(10)
    columns = ", ".join(COMPARED)
    rows = table.query(
        f"SELECT {columns}, request_id, host(ip), outcome, metadata FROM {{table}}"
        " ORDER BY occurred_at"
    )
    captured = [
        (
            *(getattr(e, name) for name in COMPARED),
            e.request_id,
            None if e.ip is None else str(e.ip),
            e.outcome,
            e.metadata,
        )
        for e in fake.entries
    ]
    assert captured == [tuple(r) for r in rows]
    assert fake.stats().accepted == real.stats().accepted == 4


def test_rejections_are_counted_with_their_reason() -> None:
    writer = CapturingWriter()
    assert not writer.log("")
    assert not writer.log("x", ip="not-an-address")
    assert not writer.write({"action": "x", "user": 1})
    assert not writer.log("x", user_id="u")  # a counted rejection, not a TypeError
    assert writer.log("ok")
    stats = writer.stats()
    assert (stats.calls, stats.accepted, stats.rejected, stats.written) == (5, 1, 4, 1)
    assert "unknown field(s): user" in writer.rejections[2]
    assert writer.rejections[3] == "unknown field(s): user_id"
    assert "ip" in writer.rejections[1]
    writer.close()
    assert not writer.log("after.close") and writer.rejections[-1] == "the writer is closed"
    with pytest.raises(auditq.InvalidEntry):
        CapturingWriter(strict=True).log("x", ip="not-an-address")


def test_validate_false_records_as_given() -> None:
    writer = CapturingWriter(validate=False)
    assert writer.log("x", resource_id="r" * 1000)
    assert writer.last().resource_id == "r" * 1000


def test_fixture_records_module_level_calls_and_middleware_context(
    audit_events: CapturingWriter,
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        auditq.log("page.view", resource_id=environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = AuditWSGIMiddleware(app)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/a",
        "REMOTE_ADDR": "192.0.2.1",
        "HTTP_X_REQUEST_ID": "rid-1",
    }
    body = wrapped(environ, lambda status, headers: None)
    list(body)
    getattr(body, "close", lambda: None)()
    assert audit_events.actions() == ["page.view"]
    found = audit_events.find("page.view", request_id="rid-1", resource_id="/a")
    assert len(found) == 1 and str(found[0].ip) == "192.0.2.1"
    assert auditq.get_writer() is audit_events  # type: ignore[comparison-overlap]


def test_capture_restores_the_previous_default(default_writer: None) -> None:
    before = auditq.configure("postgresql://nobody@127.0.0.1:1/none")
    with capture() as captured:
        auditq.log("inside")
    assert auditq.get_writer() is before
    assert captured.actions() == ["inside"]
    assert before.stats().accepted == 0


def test_pytest_plugin_provides_the_fixture(tmp_path: Path) -> None:
    """Installed auditq registers the plugin (entry point `pytest11`): no conftest needed."""
    test = tmp_path / "test_plugin_user.py"
    test.write_text(
        textwrap.dedent(
            """
            import auditq

            def test_it(audit_events):
                auditq.log("from.plugin", resource_id="r")
                assert audit_events.actions() == ["from.plugin"]
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_disabled_writer_counts_discards_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    writer = DisabledWriter()
    with caplog.at_level(logging.WARNING, logger="auditq"):
        assert writer.log("a") is False
        assert writer.write({"action": "b"}) is False
        assert writer.write_many([{"action": "c"}, {"action": "d"}]) == 0
    assert writer.discarded == 4
    stats = writer.stats()
    assert (stats.calls, stats.accepted, stats.rejected) == (4, 0, 4)
    warnings = [r for r in caplog.records if "AUDITQ_DISABLED" in r.getMessage()]
    assert len(warnings) == 1
    assert writer.flush() and writer.close()


def test_disabled_reads_the_environment() -> None:
    for value in ("1", "true", "YES", " on "):
        assert disabled({"AUDITQ_DISABLED": value})
    for value in ("", "0", "false", "off"):
        assert not disabled({"AUDITQ_DISABLED": value})
    assert not disabled({})
    assert disabled_writer() is disabled_writer()


def test_auditq_disabled_makes_the_module_level_api_count_and_discard(
    default_writer: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With AUDITQ_DISABLED=1 no database is needed: configure() and the lazy default both
    give the disabled writer, calls count and discard, one warning says so."""
    import auditq
    from auditq.disabled import DisabledWriter

    monkeypatch.setenv("AUDITQ_DISABLED", "1")
    monkeypatch.setenv("AUDITQ_DSN", "postgresql://nobody@127.0.0.1:1/none")
    caplog.set_level(logging.WARNING, logger="auditq")
    assert auditq.log("discarded") is False  # the lazy default
    writer = auditq.get_writer()
    assert isinstance(writer, DisabledWriter)
    assert auditq.configure() is writer
    assert auditq.write_audit_logs([{"action": "a"}, {"action": "b"}]) == 0
    assert writer.stats().rejected >= 3
    assert auditq.flush(1)
    assert len([r for r in caplog.records if "AUDITQ_DISABLED" in r.getMessage()]) == 1
