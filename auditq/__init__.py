"""fire-and-forget audit logging to PostgreSQL that never slows or breaks the caller."""

from .context import bind, context, get_context, unbind
from .default import (
    aflush,
    ashutdown,
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
from .ledger import DeadLetter
from .memory import prefault_memory
from .reader import StoredEntry, read
from .stats import WriterStats
from .transactions import log_on_commit
from .writer import AuditWriter

__all__ = [
    "AuditEntry",
    "AuditWriter",
    "DeadLetter",
    "InvalidEntry",
    "Outcome",
    "StoredEntry",
    "WriterStats",
    "aflush",
    "ashutdown",
    "bind",
    "configure",
    "context",
    "flush",
    "get_context",
    "get_writer",
    "log",
    "log_on_commit",
    "prefault_memory",
    "read",
    "shutdown",
    "unbind",
    "uuid7",
    "write_audit_log",
    "write_audit_logs",
]

__version__ = "0.1.0"
