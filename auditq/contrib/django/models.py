"""An unmanaged model over the audit table, for the read-only admin page.

The table is auditq's (`auditq init-db` or `manage.py auditq_init` creates it); Django never
creates, alters or migrates it. Its schema and name come from `AUDITQ["schema"]` and
`AUDITQ["table"]` (defaults public.audit_logs).
"""

from __future__ import annotations

from django.db import models

from ...schema import DEFAULT_SCHEMA, DEFAULT_TABLE
from .conf import auditq_settings


def _db_table() -> str:
    options = auditq_settings()
    schema = str(options.get("schema", DEFAULT_SCHEMA))
    table = str(options.get("table", DEFAULT_TABLE))
    if '"' in schema or '"' in table:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured("AUDITQ schema and table names must not contain '\"'")
    # Django quotes db_table as one identifier: this spelling becomes "schema"."table".
    return f'{schema}"."{table}'


class AuditLog(models.Model):  # type: ignore[misc]
    id = models.UUIDField(primary_key=True)
    occurred_at = models.DateTimeField()
    recorded_at = models.DateTimeField()
    action = models.TextField()
    tenant_id = models.TextField(null=True, blank=True)
    actor_id = models.TextField(null=True, blank=True)
    actor_type = models.TextField(null=True, blank=True)
    resource_type = models.TextField(null=True, blank=True)
    resource_id = models.TextField(null=True, blank=True)
    outcome = models.TextField(null=True, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.TextField(null=True, blank=True)
    request_id = models.TextField(null=True, blank=True)
    metadata = models.JSONField(null=True, blank=True)

    class Meta:
        managed = False
        db_table = _db_table()
        ordering = ("-occurred_at",)
        verbose_name = "audit entry"
        verbose_name_plural = "audit log"
        default_permissions = ("view",)

    def __str__(self) -> str:
        return f"{self.action} {self.resource_type or ''}:{self.resource_id or ''}"
