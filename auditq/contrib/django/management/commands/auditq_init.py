"""`manage.py auditq_init`: create the audit table where the app will write."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from auditq.contrib.django.conf import auditq_settings, resolve_dsn
from auditq.dsn import Dsn
from auditq.schema import DEFAULT_SCHEMA, DEFAULT_TABLE, create


class Command(BaseCommand):  # type: ignore[misc]
    help = "Create auditq's audit table and index (safe to run again)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--schema", help="schema (default: AUDITQ['schema'] or public)")
        parser.add_argument("--table", help="table (default: AUDITQ['table'] or audit_logs)")

    def handle(self, *args: Any, **options: Any) -> None:
        import psycopg

        settings = auditq_settings()
        schema = options.get("schema") or settings.get("schema", DEFAULT_SCHEMA)
        table = options.get("table") or settings.get("table", DEFAULT_TABLE)
        dsn = resolve_dsn(settings)
        if dsn is None:
            raise CommandError(
                "no database: set AUDITQ['dsn'], AUDITQ_DSN, or a PostgreSQL DATABASES['default']"
            )
        try:
            create(Dsn(dsn), schema=str(schema), table=str(table))
        except psycopg.Error as exc:
            raise CommandError(f"could not create {schema}.{table}: {exc}") from None
        self.stdout.write(f"audit table {schema}.{table} is ready")
