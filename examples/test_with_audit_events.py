"""Testing code that logs audit events, without a database: the `audit_events` fixture
(auditq's pytest plugin) captures what the code under test logs (docs/testing.md).

    pytest examples/test_with_audit_events.py
"""

from __future__ import annotations

import auditq
from auditq.testing import CapturingWriter


def share_document(user: str, doc: str) -> None:
    """The application code under test."""
    auditq.log("document.share", actor_id=user, resource_type="document", resource_id=doc)


def test_sharing_is_audited(audit_events: CapturingWriter) -> None:
    share_document("u-7", "doc-9")
    assert audit_events.actions() == ["document.share"]
    entry = audit_events.last()
    assert (entry.actor_id, entry.resource_id) == ("u-7", "doc-9")


def test_an_invalid_entry_is_caught_in_tests(audit_events: CapturingWriter) -> None:
    assert auditq.log("document.share", colour="red") is False  # type: ignore[call-arg]
    assert audit_events.stats().rejected == 1
