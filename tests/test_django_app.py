"""The Django app (`auditq.contrib.django`) on the real test database: settings, the
async-capable middleware (actor after authentication, tenant hook), `auditq_init`, and the
read-only admin page; Django's test client drives each request."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import auditq
from auditq import AuditWriter

from .django_env import DjangoEnv, django_env  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("django_env")


@pytest.fixture
def writer(django_env: DjangoEnv) -> Iterator[AuditWriter]:  # noqa: F811
    from auditq.contrib.django import configure_from_settings

    made = configure_from_settings()
    assert made is not None
    yield made
    auditq.shutdown(timeout=5)


def _rows(env: DjangoEnv, request_id: str) -> list[tuple[Any, ...]]:
    return env.table.query(
        "SELECT action, resource_id, actor_id, actor_type, tenant_id, host(ip) FROM {table}"
        " WHERE request_id = %s",
        request_id,
    )


def _user(name: str, *, superuser: bool = False) -> Any:
    from django.contrib.auth.models import User

    make = User.objects.create_superuser if superuser else User.objects.create_user
    return make(username=f"{name}-{uuid.uuid4().hex[:8]}", password="pw-for-tests")  # noqa: S106


def test_ready_configured_the_writer_from_databases_default(
    django_env: DjangoEnv,  # noqa: F811
    writer: AuditWriter,
) -> None:
    """No DSN in AUDITQ and none in the environment: DATABASES["default"] is reused."""
    assert auditq.get_writer() is writer
    assert (writer.schema, writer.table) == (django_env.table.schema, django_env.table.name)
    rid = uuid.uuid4().hex
    assert auditq.log("settings.check", request_id=rid)
    assert auditq.flush(10)
    assert _rows(django_env, rid) == [("settings.check", None, None, None, None, None)]


def test_sync_request_binds_user_and_tenant_after_authentication(
    django_env: DjangoEnv,  # noqa: F811
    writer: AuditWriter,
) -> None:
    from django.test import Client

    user = _user("alice")
    client = Client()
    client.force_login(user)
    rid = uuid.uuid4().hex
    response = client.post(
        "/documents/doc-1/share", headers={"X-Request-ID": rid, "X-Tenant": "t-1"}
    )
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == rid
    assert auditq.flush(10)
    assert _rows(django_env, rid) == [
        ("document.share", "doc-1", str(user.pk), "user", "t-1", "127.0.0.1")
    ]


def test_anonymous_request_binds_no_actor(
    django_env: DjangoEnv,  # noqa: F811
    writer: AuditWriter,
) -> None:
    from django.test import Client

    rid = uuid.uuid4().hex
    response = Client().post("/documents/doc-2/share", headers={"X-Request-ID": rid})
    assert response.status_code == 200
    assert auditq.flush(10)
    assert _rows(django_env, rid) == [("document.share", "doc-2", None, None, None, "127.0.0.1")]


def test_async_request_binds_user_and_tenant(
    django_env: DjangoEnv,  # noqa: F811
    writer: AuditWriter,
) -> None:
    from asgiref.sync import sync_to_async
    from django.test import AsyncClient

    user = _user("bob")
    rid = uuid.uuid4().hex

    async def go() -> int:
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.post(
            "/async/documents/doc-3/share", headers={"X-Request-ID": rid, "X-Tenant": "t-3"}
        )
        # The sync view too, under the async handler (it runs in a thread).
        response2 = await client.post(
            "/documents/doc-4/share", headers={"X-Request-ID": rid, "X-Tenant": "t-3"}
        )
        await sync_to_async(lambda: None)()
        return int(response.status_code) + int(response2.status_code)

    assert asyncio.run(go()) == 400
    assert auditq.flush(10)
    assert sorted(_rows(django_env, rid)) == [
        ("document.share", "doc-3", str(user.pk), "user", "t-3", "127.0.0.1"),
        ("document.share", "doc-4", str(user.pk), "user", "t-3", "127.0.0.1"),
    ]


def test_context_does_not_leak_between_requests(
    django_env: DjangoEnv,  # noqa: F811
    writer: AuditWriter,
) -> None:
    from django.test import Client

    client = Client()
    client.force_login(_user("carol"))
    client.post("/documents/doc-5/share", headers={"X-Tenant": "t-5"})
    assert auditq.get_context()["actor_id"] is None
    assert auditq.get_context()["tenant_id"] is None


def test_auditq_init_creates_the_table(django_env: DjangoEnv) -> None:  # noqa: F811
    from io import StringIO

    from django.core.management import call_command

    name = f"audit_init_{uuid.uuid4().hex[:10]}"
    out = StringIO()
    try:
        call_command("auditq_init", table=name, schema=django_env.table.schema, stdout=out)
        assert f"{name} is ready" in out.getvalue()
        with psycopg.connect(django_env.table.dsn) as conn:
            found = conn.execute(
                "SELECT count(*) FROM information_schema.columns"
                " WHERE table_schema = %s AND table_name = %s",
                (django_env.table.schema, name),
            ).fetchone()
        assert found is not None and found[0] == 17  # the columns, origin, the chain's two
    finally:
        with psycopg.connect(django_env.table.dsn, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP TABLE IF EXISTS {}.{}").format(
                    psycopg.sql.Identifier(django_env.table.schema), psycopg.sql.Identifier(name)
                )
            )


def test_admin_lists_and_filters_but_never_edits(
    django_env: DjangoEnv,  # noqa: F811
    writer: AuditWriter,
) -> None:
    from django.test import Client

    marker = f"admin.check.{uuid.uuid4().hex[:8]}"
    ok_id, failed_id = uuid.uuid4().hex, uuid.uuid4().hex
    auditq.log(marker, outcome="success", request_id=ok_id, resource_id="r-ok")
    auditq.log(marker, outcome="failure", request_id=failed_id, resource_id="r-failed")
    assert auditq.flush(10)
    client = Client()
    client.force_login(_user("admin", superuser=True))
    base = "/admin/auditq/auditlog/"

    page = client.get(base, {"q": marker})
    assert page.status_code == 200
    assert b"r-ok" in page.content and b"r-failed" in page.content
    filtered = client.get(base, {"q": marker, "outcome__exact": "failure"})
    assert filtered.status_code == 200
    assert b"r-failed" in filtered.content and b"r-ok" not in filtered.content

    (row_id,) = django_env.table.query("SELECT id FROM {table} WHERE request_id = %s", ok_id)[0]
    detail = client.get(f"{base}{row_id}/change/")
    assert detail.status_code == 200  # viewable
    assert b'name="_save"' not in detail.content  # but no save button
    assert client.get(f"{base}add/").status_code == 403
    assert client.post(f"{base}{row_id}/delete/", {"post": "yes"}).status_code == 403
    changed = client.post(f"{base}{row_id}/change/", {"action": "tampered"})
    assert changed.status_code == 403
    assert django_env.table.query("SELECT action FROM {table} WHERE id = %s", row_id) == [(marker,)]


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_database_dsn_keeps_libpq_options_only(django_env: DjangoEnv) -> None:  # noqa: F811
    from django.test import override_settings
    from psycopg import conninfo

    from auditq.contrib.django import database_dsn

    databases = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "app",
            "USER": "app",
            "PASSWORD": "s3cret with space",
            "HOST": "db.internal",
            "PORT": 6432,
            "OPTIONS": {"sslmode": "require", "isolation_level": 1, "pool": True},
        },
        # Another server the application also uses (never connected to: database_dsn only
        # composes a conninfo string), whose engine is not PostgreSQL's.
        "other": {"ENGINE": "django.db.backends.mysql", "NAME": "reports", "HOST": "mysql"},
    }
    with override_settings(DATABASES=databases):
        dsn = database_dsn()
        assert dsn is not None
        assert conninfo.conninfo_to_dict(dsn) == {
            "dbname": "app",
            "user": "app",
            "password": "s3cret with space",
            "host": "db.internal",
            "port": "6432",
            "sslmode": "require",
        }
        assert database_dsn("other") is None
