"""Transaction-coupled audit logging with SQLAlchemy: an entry is written only when the
operation it records commits (docs/transactions.md).

    AUDITQ_DSN=postgresql://app@db/app python examples/sqlalchemy_on_commit.py

It creates a small `documents` table next to the audit table, then archives one document
(committed: its `document.archive` entry is written) and tries to archive another but rolls
back (its entry never is), and prints what the audit table got as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

import psycopg
from sqlalchemy import String, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import auditq
from auditq.transactions import log_on_sqlalchemy_commit


class Base(DeclarativeBase):
    pass


class Document(Base):
    __tablename__ = "auditq_example_documents"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    archived: Mapped[bool] = mapped_column(default=False)


def main() -> int:
    dsn = os.environ["AUDITQ_DSN"]
    schema = os.environ.get("AUDITQ_SCHEMA", "public")
    # AUDITQ_DSN is a libpq string or URL: psycopg opens it, SQLAlchemy pools it.
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    Document.__table__.schema = schema
    Base.metadata.create_all(engine)
    writer = auditq.configure()
    with Session(engine) as session, session.begin():
        session.merge(Document(id="doc-1"))
        session.merge(Document(id="doc-2"))
    with Session(engine) as session:
        with session.begin():  # commits: the entry is written after the COMMIT
            session.get(Document, "doc-1").archived = True  # type: ignore[union-attr]
            log_on_sqlalchemy_commit(session, "document.archive", resource_id="doc-1")
        try:
            with session.begin():  # rolls back: the entry is never written
                session.get(Document, "doc-2").archived = True  # type: ignore[union-attr]
                log_on_sqlalchemy_commit(session, "document.archive", resource_id="doc-2")
                raise RuntimeError("the archive store refused doc-2")
        except RuntimeError:
            pass
    auditq.flush(timeout=10)
    stats = writer.stats()
    with engine.connect() as conn:
        archived = (
            conn.execute(text(f'SELECT id FROM "{schema}".auditq_example_documents WHERE archived'))
            .scalars()
            .all()
        )
    auditq.shutdown()
    print(json.dumps({"written": stats.written, "archived": archived}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
