"""Stand-ins for the default writer that write nothing: `AUDITQ_DISABLED=1` (the module-level
API counts and discards, like Sentry's empty DSN or `OTEL_SDK_DISABLED`), and the surface the
in-memory `auditq.testing.CapturingWriter` shares with it.

Here, below `default.py`, so the module-level API can fall back to them without importing
the test helpers above it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol

from .entry import AuditEntry
from .stats import WriterStats

logger = logging.getLogger("auditq")

_TRUE: Final = frozenset({"1", "true", "yes", "on"})


class Recorder(Protocol):
    """What the module-level API needs of its default writer (`AuditWriter`, or a stand-in
    from here or `auditq.testing`)."""

    @property
    def closed(self) -> bool: ...
    def log(self, action: str, /, **fields: Any) -> bool: ...
    def write(self, entry: AuditEntry | Mapping[str, Any]) -> bool: ...
    def write_many(self, entries: Iterable[AuditEntry | Mapping[str, Any]]) -> int: ...
    def flush(self, timeout: float | None = None) -> bool: ...
    def close(self, timeout: float | None = None) -> bool: ...
    def stats(self) -> WriterStats: ...


class WriterSurface:
    """What both in-process writers share: counters under a lock, the closed flag."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._accepted = 0
        self._rejected = 0
        self._closed = False

    def flush(self, timeout: float | None = None) -> bool:
        """Nothing is ever pending: True."""
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting (later calls are rejected); True. Idempotent."""
        self._closed = True
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> WriterStats:
        """Counters in `AuditWriter.stats()` form: accepted entries count as written."""
        with self._lock:
            return WriterStats(
                accepted=self._accepted,
                written=self._accepted,
                dropped_overflow=0,
                rejected=self._rejected,
                dead_lettered=0,
                spooled=0,
                pending=0,
                batches=0,
                retries=0,
                last_error=None,
                last_write_at=None,
            )

    def write_many(self, entries: Iterable[AuditEntry | Mapping[str, Any]]) -> int:
        """Offer each entry; returns how many were accepted."""
        return sum(self.write(entry) for entry in entries)

    def write(self, entry: AuditEntry | Mapping[str, Any]) -> bool:
        raise NotImplementedError

    def __enter__(self) -> WriterSurface:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DisabledWriter(WriterSurface):
    """What `AUDITQ_DISABLED=1` gives the module-level API: every call is counted (as
    rejected, since nothing is accepted) and discarded, and a warning is logged once, so a
    disabled deployment is never mistaken for a working one. Never raises."""

    def __init__(self, name: str = "disabled") -> None:
        super().__init__(name)
        self._warned = False

    def log(self, action: Any = None, /, **fields: Any) -> bool:
        """Count and discard; False (not accepted)."""
        return self._discard()

    def write(self, entry: AuditEntry | Mapping[str, Any]) -> bool:
        """Count and discard; False (not accepted)."""
        return self._discard()

    @property
    def discarded(self) -> int:
        """Calls discarded so far."""
        return self._rejected

    def _discard(self) -> bool:
        with self._lock:
            self._rejected += 1
            warn, self._warned = not self._warned, True
        if warn:
            logger.warning("AUDITQ_DISABLED is set: audit entries are counted and discarded")
        return False

    def __repr__(self) -> str:
        return f"<DisabledWriter discarded={self.discarded}>"


def disabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when `AUDITQ_DISABLED` is 1/true/yes/on (case-insensitive)."""
    value = (os.environ if environ is None else environ).get("AUDITQ_DISABLED", "")
    return value.strip().lower() in _TRUE


_disabled_writer: DisabledWriter | None = None
_disabled_lock = threading.Lock()


def disabled_writer() -> DisabledWriter:
    """This process's one `DisabledWriter` (so the warning is logged once)."""
    global _disabled_writer
    with _disabled_lock:
        if _disabled_writer is None:
            _disabled_writer = DisabledWriter()
        return _disabled_writer
