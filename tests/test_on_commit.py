"""auditq.transactions: entries logged when the transaction commits, discarded when it (or
the savepoint they were made in) rolls back, with the context of the call; Django and
SQLAlchemy, each on the real test database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import auditq
from auditq import AuditWriter
from auditq.transactions import log_on_commit, log_on_sqlalchemy_commit

from .conftest import Table, WriterFactory
from .django_env import DjangoEnv, django_env  # noqa: F401 - the fixture


def _actions(table: Table, writer: AuditWriter) -> list[tuple[Any, ...]]:
    assert writer.flush(10)
    return table.query(
        "SELECT action, actor_id, tenant_id FROM {table} ORDER BY occurred_at, action"
    )


# -- Django ---------------------------------------------------------------------------


@pytest.fixture
def dj(django_env: DjangoEnv) -> Iterator[tuple[Table, AuditWriter]]:  # noqa: F811
    from auditq.contrib.django import configure_from_settings

    writer = configure_from_settings()
    assert writer is not None
    django_env.table.execute("TRUNCATE {table}")
    yield django_env.table, writer
    auditq.shutdown(timeout=5)


def test_django_commit_logs_after_the_commit(dj: tuple[Table, AuditWriter]) -> None:
    from django.db import transaction

    from tests.djapp.models import Document

    table, writer = dj
    with transaction.atomic():
        doc = Document.objects.create(title="a")
        log_on_commit("document.create", resource_type="document", resource_id=str(doc.pk))
        assert writer.stats().accepted == 0  # not before the commit
    assert writer.stats().accepted == 1
    assert _actions(table, writer) == [("document.create", None, None)]


def test_django_rollback_leaves_no_row(dj: tuple[Table, AuditWriter]) -> None:
    from django.db import transaction

    from tests.djapp.models import Document

    table, writer = dj
    with pytest.raises(RuntimeError), transaction.atomic():
        Document.objects.create(title="b")
        log_on_commit("document.create")
        raise RuntimeError("rolled back")
    assert writer.stats().accepted == 0
    assert _actions(table, writer) == []


def test_django_savepoint_rollback_drops_only_its_entries(dj: tuple[Table, AuditWriter]) -> None:
    from django.db import transaction

    table, writer = dj
    with transaction.atomic():
        log_on_commit("outer.kept")
        with pytest.raises(RuntimeError), transaction.atomic():
            log_on_commit("inner.dropped")
            raise RuntimeError("savepoint rolled back")
        with transaction.atomic():
            log_on_commit("inner.kept")
    assert [a for a, *_ in _actions(table, writer)] == ["outer.kept", "inner.kept"]


def test_django_context_and_time_are_taken_at_the_call(dj: tuple[Table, AuditWriter]) -> None:
    from django.db import transaction

    table, writer = dj
    with transaction.atomic():
        with auditq.context(actor_id="at-call"):
            log_on_commit("ctx.check")
        called_by = datetime.now(UTC)
        auditq.bind(actor_id="at-commit", tenant_id="t-commit")
    auditq.unbind()
    assert _actions(table, writer) == [("ctx.check", "at-call", None)]
    (occurred,) = table.query("SELECT occurred_at FROM {table}")[0]
    assert occurred <= called_by


def test_django_outside_a_transaction_logs_at_once(dj: tuple[Table, AuditWriter]) -> None:
    table, writer = dj
    log_on_commit("autocommit.now")
    assert writer.stats().accepted == 1
    assert _actions(table, writer) == [("autocommit.now", None, None)]


# -- SQLAlchemy -----------------------------------------------------------------------


@pytest.fixture
def engine(table: Table) -> Iterator[tuple[sa.Engine, sa.Table]]:
    engine = sa.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(table.dsn), poolclass=sa.NullPool
    )
    metadata = sa.MetaData()
    docs = sa.Table(
        f"h6_docs_{uuid.uuid4().hex[:10]}",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("title", sa.Text),
        schema=table.schema,
    )
    metadata.create_all(engine)
    try:
        yield engine, docs
    finally:
        metadata.drop_all(engine)
        engine.dispose()


def test_sqlalchemy_commit_and_rollback(
    table: Table, make_writer: WriterFactory, engine: tuple[sa.Engine, sa.Table]
) -> None:
    eng, docs = engine
    writer = make_writer()
    with Session(eng) as session, session.begin():
        session.execute(docs.insert().values(id=1, title="kept"))
        log_on_sqlalchemy_commit(session, "doc.kept", writer=writer, resource_id="1")
        assert writer.stats().accepted == 0
    with pytest.raises(RuntimeError), Session(eng) as session, session.begin():
        session.execute(docs.insert().values(id=2, title="dropped"))
        log_on_sqlalchemy_commit(session, "doc.dropped", writer=writer)
        raise RuntimeError("rolled back")
    with Session(eng) as session:
        session.execute(docs.insert().values(id=3, title="explicit rollback"))
        log_on_sqlalchemy_commit(session, "doc.rolled.back", writer=writer)
        session.rollback()
        session.execute(docs.insert().values(id=4, title="then committed"))
        log_on_sqlalchemy_commit(session, "doc.after.rollback", writer=writer)
        session.commit()
    assert [a for a, *_ in _actions(table, writer)] == ["doc.kept", "doc.after.rollback"]
    with eng.connect() as conn:
        assert sorted(conn.execute(sa.select(docs.c.id)).scalars()) == [1, 4]


def test_sqlalchemy_savepoints(
    table: Table, make_writer: WriterFactory, engine: tuple[sa.Engine, sa.Table]
) -> None:
    eng, _docs = engine
    writer = make_writer()
    with Session(eng) as session, session.begin():
        log_on_sqlalchemy_commit(session, "outer.kept", writer=writer)
        released = session.begin_nested()
        log_on_sqlalchemy_commit(session, "released.kept", writer=writer)
        released.commit()
        doomed = session.begin_nested()
        log_on_sqlalchemy_commit(session, "savepoint.dropped", writer=writer)
        inner = session.begin_nested()
        log_on_sqlalchemy_commit(session, "nested.in.dropped", writer=writer)
        inner.commit()
        doomed.rollback()
    with pytest.raises(RuntimeError), Session(eng) as session, session.begin():
        released = session.begin_nested()
        log_on_sqlalchemy_commit(session, "released.then.outer.rolled.back", writer=writer)
        released.commit()
        raise RuntimeError("the outer transaction rolls back")
    assert sorted(a for a, *_ in _actions(table, writer)) == ["outer.kept", "released.kept"]


def test_sqlalchemy_context_taken_at_the_call_and_no_transaction(
    table: Table, make_writer: WriterFactory, engine: tuple[sa.Engine, sa.Table]
) -> None:
    eng, docs = engine
    writer = make_writer()
    with Session(eng) as session:
        log_on_sqlalchemy_commit(session, "no.transaction", writer=writer)  # at once
        assert writer.stats().accepted == 1
        session.execute(docs.insert().values(id=5, title="x"))
        with auditq.context(actor_id="at-call", tenant_id="t-call"):
            log_on_sqlalchemy_commit(session, "ctx.check", writer=writer)
        with auditq.context(actor_id="at-commit"):
            session.commit()
    rows = _actions(table, writer)
    assert sorted(rows) == [("ctx.check", "at-call", "t-call"), ("no.transaction", None, None)]
