"""Reading auditq's Django settings: the `AUDITQ` dict and the DSN it falls back to.

Kept apart from the app config so `manage.py auditq_init` and tests reach the same rules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final

import psycopg
from psycopg import conninfo

from ... import default
from ...config import ConfigError
from ...disabled import Recorder

#: Django's PostgreSQL backends; any other engine's database is not reused.
POSTGRES_ENGINES: Final = frozenset(
    {
        "django.db.backends.postgresql",
        "django.db.backends.postgresql_psycopg2",
        "django.contrib.gis.db.backends.postgis",
    }
)
#: `DATABASES[...]["NAME"/...]` -> libpq keyword.
_KEYWORDS: Final = {
    "NAME": "dbname",
    "USER": "user",
    "PASSWORD": "password",
    "HOST": "host",
    "PORT": "port",
}


def _settings() -> Any:
    from django.conf import settings

    return settings


def auditq_settings() -> dict[str, Any]:
    """The `AUDITQ` settings dict (a copy; empty when unset)."""
    value = getattr(_settings(), "AUDITQ", None) or {}
    if not isinstance(value, Mapping):
        raise ConfigError("settings.AUDITQ must be a dict of writer options (and 'dsn')")
    return dict(value)


def database_dsn(alias: str = "default") -> str | None:
    """A libpq connection string for `DATABASES[alias]`, or None when that database is not
    PostgreSQL. `OPTIONS` keys libpq knows (sslmode, options, connect_timeout, ...) are kept;
    Django's own (isolation_level, pool, server_side_binding, ...) are left out."""
    databases = getattr(_settings(), "DATABASES", None) or {}
    db = databases.get(alias)
    if not db or db.get("ENGINE") not in POSTGRES_ENGINES:
        return None
    params: dict[str, Any] = {}
    for key, keyword in _KEYWORDS.items():
        value = db.get(key)
        if value not in (None, ""):
            params[keyword] = str(value)
    for key, value in (db.get("OPTIONS") or {}).items():
        if _libpq_keyword(key) and not isinstance(value, bool | dict | list):
            params[key] = str(value)
    return conninfo.make_conninfo(**params)


def _libpq_keyword(key: str) -> bool:
    try:
        conninfo.make_conninfo(**{key: "x"})
    except psycopg.ProgrammingError:  # not a libpq keyword: one of Django's own options
        return False
    return True


def resolve_dsn(options: Mapping[str, Any] | None = None) -> str | None:
    """The DSN auditq uses under Django: `AUDITQ["dsn"]`, else `AUDITQ_DSN`, else the
    database named by `AUDITQ["database"]` (default "default") when it is PostgreSQL, else
    `DATABASE_URL`; None when there is none."""
    options = auditq_settings() if options is None else options
    dsn = options.get("dsn") or os.environ.get("AUDITQ_DSN")
    if dsn:
        return str(dsn)
    return database_dsn(str(options.get("database", "default"))) or (
        os.environ.get("DATABASE_URL") or None
    )


def configure_from_settings() -> Recorder | None:
    """Configure the default writer from settings; None (and nothing changed) when there is
    no DSN anywhere, in which case `auditq.log()` warns once and discards."""
    options = auditq_settings()
    dsn = resolve_dsn(options)
    if dsn is None:
        return None
    options.pop("dsn", None)
    options.pop("database", None)
    try:
        return default.configure(dsn, **options)
    except TypeError as exc:  # an unknown option name
        raise ConfigError(f"settings.AUDITQ: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"settings.AUDITQ: {exc}") from None
