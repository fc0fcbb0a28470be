"""fire-and-forget audit logging to PostgreSQL that never slows or breaks the caller."""

from .context import bind, context, get_context, unbind
from .default import (
    configure,
    flush,
    get_writer,
    log,
    shutdown,
    write_audit_log,
    write_audit_logs,
)
from .entry import AuditEntry, InvalidEntry, Outcome
from .ids import uuid7
from .reader import read
from .stats import WriterStats
from .writer import AuditWriter, DeadLetter

__all__ = [
    "AuditEntry",
    "AuditWriter",
    "DeadLetter",
    "InvalidEntry",
    "Outcome",
    "WriterStats",
    "bind",
    "configure",
    "context",
    "flush",
    "get_context",
    "get_writer",
    "log",
    "read",
    "shutdown",
    "unbind",
    "uuid7",
    "write_audit_log",
    "write_audit_logs",
]

__version__ = "0.1.0"
