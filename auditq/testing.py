"""Testing without a database: an in-memory capturing writer, a pytest fixture, and the
`AUDITQ_DISABLED=1` writer that discards.

    def test_share(audit_events):           # the fixture (pytest plugin "auditq")
        client.post("/documents/d-1/share")
        assert audit_events.actions() == ["document.share"]
        assert audit_events.last().resource_id == "d-1"

`CapturingWriter` has the caller-facing surface of `AuditWriter` (`log`, `write`,
`write_many`, `flush`, `close`, `stats`, a context manager) and records each accepted entry as
an `AuditEntry`. It validates every entry through `AuditEntry` by default, which is stricter
than the real writer (that one stores over-long text repaired and flagged): a test should
learn about such an entry. The request context (`auditq.context`/`bind`) is merged as the real
writer merges it, and explicit arguments win.

The fixture is registered as the pytest plugin `auditq` (an entry point), so it exists in any
project that installs auditq; without the entry point, `pytest_plugins = ["auditq.testing"]`
in a conftest.py does the same.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from . import default
from .context import CONTEXT_FIELDS
from .context import current as _current_context
from .disabled import DisabledWriter, WriterSurface, disabled, disabled_writer
from .entry import AuditEntry, InvalidEntry, mapping_fields

__all__ = [
    "CapturingWriter",
    "DisabledWriter",
    "capture",
    "disabled",
    "disabled_writer",
]

logger = logging.getLogger("auditq")


class CapturingWriter(WriterSurface):
    """Records entries in memory instead of writing them (see the module docstring).

    `validate=False` records the fields as given (`AuditEntry.model_construct`), for tests
    of what the real writer repairs; `strict=True` raises `InvalidEntry` as a strict
    writer does."""

    def __init__(
        self, *, validate: bool = True, strict: bool = False, name: str = "capture"
    ) -> None:
        super().__init__(name)
        self.validate = validate
        self.strict = strict
        #: Accepted entries, in call order.
        self.entries: list[AuditEntry] = []
        #: Why each rejected call was refused, in call order.
        self.rejections: list[str] = []

    def log(
        self,
        action: str,
        /,
        *,
        tenant_id: Any = None,
        actor_id: Any = None,
        actor_type: Any = None,
        resource_type: Any = None,
        resource_id: Any = None,
        outcome: Any = None,
        ip: Any = None,
        user_agent: Any = None,
        request_id: Any = None,
        metadata: Mapping[str, Any] | None = None,
        occurred_at: datetime | None = None,
        id: Any = None,
        **unknown: Any,
    ) -> bool:
        """Record one entry, merged with the bound context; True if accepted. An unknown
        field is a counted rejection (an `InvalidEntry` when strict), as for the writer."""
        if unknown:
            return self._reject(f"unknown field(s): {', '.join(sorted(unknown))}")
        fields: dict[str, Any] = {
            "action": action,
            "tenant_id": tenant_id,
            "actor_id": actor_id,
            "actor_type": actor_type,
            "resource_type": resource_type,
            "resource_id": resource_id,
            "outcome": outcome,
            "ip": ip,
            "user_agent": user_agent,
            "request_id": request_id,
            "metadata": dict(metadata) if isinstance(metadata, Mapping) else metadata,
            "occurred_at": occurred_at,
            "id": id,
        }
        bound = _current_context.get()
        if bound is not None:
            for name, value in zip(CONTEXT_FIELDS, bound, strict=True):
                if fields[name] is None:
                    fields[name] = value
        return self._record(fields)

    def write(self, entry: AuditEntry | Mapping[str, Any]) -> bool:
        """Record an `AuditEntry`, or a mapping of its fields (camelCase keys accepted)."""
        if isinstance(entry, AuditEntry):
            return self._accept(entry)
        if not isinstance(entry, Mapping):
            return self._reject(f"expected an AuditEntry or a mapping, got {type(entry).__name__}")
        fields, problem = mapping_fields(entry)
        if problem is not None:
            return self._reject(problem)
        action = fields.pop("action", None)
        return self.log(action, **fields)

    def _record(self, fields: dict[str, Any]) -> bool:
        if self._closed:
            return self._reject("the writer is closed")
        present = {k: v for k, v in fields.items() if v is not None}
        if not isinstance(present.get("action"), str) or not present["action"]:
            return self._reject(f"action must be a non-empty string, got {fields['action']!r:.80}")
        if not self.validate:
            return self._accept(AuditEntry.model_construct(**present))
        try:
            entry = AuditEntry(**present)
        except ValidationError as exc:
            return self._reject(f"invalid entry: {exc}")
        return self._accept(entry)

    def _accept(self, entry: AuditEntry) -> bool:
        if self._closed:
            return self._reject("the writer is closed")
        with self._lock:
            self.entries.append(entry)
            self._accepted += 1
        return True

    def _reject(self, reason: str) -> bool:
        with self._lock:
            self._rejected += 1
            self.rejections.append(reason)
        if self.strict:
            raise InvalidEntry(reason)
        return False

    # -- for assertions ----------------------------------------------------------------

    def actions(self) -> list[str]:
        """The action of each recorded entry, in order."""
        return [entry.action for entry in self.entries]

    def find(self, action: str | None = None, **fields: Any) -> list[AuditEntry]:
        """Recorded entries with this action (any when None) and these field values."""
        return [
            entry
            for entry in self.entries
            if (action is None or entry.action == action)
            and all(getattr(entry, name) == value for name, value in fields.items())
        ]

    def last(self) -> AuditEntry:
        """The most recent entry (IndexError when there is none)."""
        return self.entries[-1]

    def clear(self) -> None:
        """Forget what was recorded (the counters stay)."""
        with self._lock:
            self.entries.clear()
            self.rejections.clear()

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"<CapturingWriter {self.name!r} entries={len(self.entries)}>"


@contextlib.contextmanager
def capture(writer: CapturingWriter | None = None) -> Iterator[CapturingWriter]:
    """Make a `CapturingWriter` the module-level default writer within the block, so
    `auditq.log()` and the middlewares record into it; the previous one comes back after."""
    writer = CapturingWriter() if writer is None else writer
    previous = default.replace_writer(writer)
    try:
        yield writer
    finally:
        default.replace_writer(previous)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixture
    pass
else:

    @pytest.fixture
    def audit_events() -> Iterator[CapturingWriter]:
        """A `CapturingWriter` installed as the default writer for one test."""
        with capture() as writer:
            yield writer
