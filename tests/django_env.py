"""Django configured once per test process, on the test database: its own tables in a
schema made for the session (dropped after), the audit table in the tests' schema."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import conninfo, sql

from auditq.schema import create

from .conftest import SCHEMA, Table


@dataclass
class DjangoEnv:
    table: Table
    django_schema: str


_env: DjangoEnv | None = None


def _setup(dsn: str) -> DjangoEnv:
    global _env
    if _env is not None:
        return _env
    import django
    from django.conf import settings

    table = Table(dsn, SCHEMA, f"audit_dj_{uuid.uuid4().hex[:10]}")
    create(dsn, schema=table.schema, table=table.name, guarded=False)  # tests empty it
    django_schema = f"dj_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(django_schema)))
    params = conninfo.conninfo_to_dict(dsn)
    settings.configure(
        DEBUG=False,
        SECRET_KEY="tests-only",  # noqa: S106 - a test settings module
        ALLOWED_HOSTS=["testserver", "127.0.0.1", "localhost"],
        USE_TZ=True,
        ROOT_URLCONF="tests.djapp.urls",
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "django.contrib.sessions",
            "django.contrib.messages",
            "django.contrib.admin",
            "auditq.contrib.django",
            "tests.djapp",
        ],
        MIDDLEWARE=[
            # Listed first on purpose: the actor must still come from the authenticated user.
            "auditq.contrib.django.middleware.AuditMiddleware",
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
        ],
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True,
                "OPTIONS": {
                    "context_processors": [
                        "django.template.context_processors.request",
                        "django.contrib.auth.context_processors.auth",
                        "django.contrib.messages.context_processors.messages",
                    ]
                },
            }
        ],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": params.get("dbname", ""),
                "USER": params.get("user", ""),
                "PASSWORD": params.get("password", ""),
                "HOST": params.get("host", ""),
                "PORT": params.get("port", ""),
                "OPTIONS": {"options": f"-c search_path={django_schema}"},
            }
        },
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        # No "dsn": the writer must reuse DATABASES["default"].
        AUDITQ={"schema": table.schema, "table": table.name, "flush_interval": 0.2},
        AUDITQ_TENANT="tests.djapp.views.tenant_of",
        AUDITQ_EXIT_HANDLERS=False,  # never replace pytest's own signal handling
        AUDITQ_MIDDLEWARE={"log_requests": False},
    )
    django.setup()
    from django.core.management import call_command

    call_command("migrate", run_syncdb=True, verbosity=0)
    _env = DjangoEnv(table, django_schema)
    return _env


@pytest.fixture(scope="session")
def django_env(pg_dsn: str) -> Iterator[DjangoEnv]:
    env = _setup(pg_dsn)
    yield env
    from django.db import connections

    connections.close_all()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(env.django_schema))
        )
        conn.execute(
            sql.SQL("DROP TABLE IF EXISTS {}.{}").format(
                sql.Identifier(env.table.schema), sql.Identifier(env.table.name)
            )
        )
