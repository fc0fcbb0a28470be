"""Audit entries tied to a database transaction: logged when it commits, never when it rolls
back.

    from auditq.transactions import log_on_commit, log_on_sqlalchemy_commit

    with transaction.atomic():                      # Django
        doc.delete()
        log_on_commit("document.delete", resource_type="document", resource_id=doc.pk)

    with Session(engine) as session, session.begin():   # SQLAlchemy
        session.delete(doc)
        log_on_sqlalchemy_commit(session, "document.delete", resource_id=str(doc.id))

Semantics (the same for both):

- The entry is handed to the writer (`log()`) after the commit succeeded; a rollback, of
  the transaction or of the savepoint the call was made in, discards it. Outside a
  transaction (Django autocommit, a session with nothing begun) it is logged at once.
- Everything about the call is taken at the call: the request context bound with
  `auditq.context()`/`bind()` (and any other context variable, such as the active span),
  and `occurred_at` (when the caller acted, not when the commit happened). Explicit
  arguments still win over the context.
- After the commit the entry has exactly the guarantees of `log()`: queued without
  blocking, written by the writer thread. "Committed, so always logged" holds as far as
  `log()` holds: a full queue still drops (counted), and the writer's own durability
  (spool, dead letters) applies from there. The two are not one atomic write: the audit row
  is written by auditq's connection, after your transaction.
- The writer is the default one at commit time, unless `writer=` names another.
"""

from __future__ import annotations

import contextvars
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .writer import AuditWriter

__all__ = ["log_on_commit", "log_on_sqlalchemy_commit"]

#: Key in `Session.info` under which pending entries wait for the commit.
_PENDING: Final = "auditq.pending"


class _Deferred:
    """One entry as it was at the call: the fields, the time, and the whole context."""

    __slots__ = ("action", "context", "fields", "owner", "writer")

    def __init__(
        self, action: str, fields: dict[str, Any], writer: AuditWriter | None, owner: Any = None
    ) -> None:
        fields.setdefault("occurred_at", datetime.now(UTC))
        self.action = action
        self.fields = fields
        self.writer = writer
        self.context = contextvars.copy_context()
        #: The SQLAlchemy transaction (or savepoint) the call was made in; held until the
        #: outermost transaction ends, when the entry is logged or dropped.
        self.owner = owner

    def __call__(self) -> None:
        self.context.run(self._log)

    def _log(self) -> None:
        if self.writer is not None:
            self.writer.log(self.action, **self.fields)
            return
        from . import default

        default.log(self.action, **self.fields)


def log_on_commit(
    action: str, /, *, using: str | None = None, writer: AuditWriter | None = None, **fields: Any
) -> None:
    """Django: log the entry when the transaction on database `using` (default: the
    default database) commits; at once when no transaction is open (see the module
    docstring for the semantics). Registered with `transaction.on_commit(robust=True)`, so a
    failure in another on-commit callback never costs this entry."""
    from django.db import transaction

    transaction.on_commit(_Deferred(action, fields, writer), using=using, robust=True)


def log_on_sqlalchemy_commit(
    session: Any, action: str, /, *, writer: AuditWriter | None = None, **fields: Any
) -> None:
    """SQLAlchemy (a `Session`, or an `AsyncSession`): log the entry after the session's
    transaction commits (`after_commit`), discard it if the transaction, or the savepoint
    the call was made in, rolls back; at once when the session has no transaction. See the
    module docstring for the semantics. SQLAlchemy is imported only here."""
    from sqlalchemy import event

    session = getattr(session, "sync_session", session)  # AsyncSession -> its Session
    current = session.get_nested_transaction() or session.get_transaction()
    deferred = _Deferred(action, fields, writer, current)
    if current is None:
        deferred()
        return
    pending: list[_Deferred] | None = session.info.get(_PENDING)
    if pending is None:
        pending = session.info[_PENDING] = []
        event.listen(session, "after_commit", _after_commit)
        event.listen(session, "after_soft_rollback", _after_rollback)
    pending.append(deferred)


def _after_commit(session: Any) -> None:
    if session.get_nested_transaction() is not None:
        return  # a savepoint was released (SQLAlchemy says "commit"): wait for the outermost
    pending: list[_Deferred] = session.info.get(_PENDING) or []
    # Anything registered in a savepoint that rolled back was removed already.
    entries, pending[:] = list(pending), []
    for deferred in entries:
        deferred()


def _after_rollback(session: Any, previous: Any) -> None:
    """A transaction or savepoint ended in rollback: drop what was registered inside it
    (or inside a savepoint nested in it)."""
    pending: list[_Deferred] = session.info.get(_PENDING) or []
    pending[:] = [d for d in pending if not _inside(d, previous)]


def _inside(deferred: _Deferred, rolled_back: Any) -> bool:
    owner = deferred.owner
    while owner is not None:
        if owner is rolled_back:
            return True
        owner = owner.parent
    return False
