"""A read-only admin page over the audit table: an audit log is not edited from a web form."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

from .conf import auditq_settings
from .models import AuditLog


@admin.register(AuditLog)
class AuditLogAdmin(admin.ModelAdmin):  # type: ignore[misc]
    list_display = (
        "occurred_at",
        "action",
        "outcome",
        "tenant_id",
        "actor_id",
        "resource_type",
        "resource_id",
        "ip",
        "request_id",
    )
    list_filter = (
        "outcome",
        "actor_type",
        "resource_type",
        "action",
        ("occurred_at", admin.DateFieldListFilter),
    )
    search_fields = ("=actor_id", "=resource_id", "=request_id", "=tenant_id", "^action")
    date_hierarchy = "occurred_at"
    readonly_fields = tuple(f.name for f in AuditLog._meta.fields)
    show_full_result_count = False  # no count(*) over a large table on each page
    list_per_page = 50

    def get_queryset(self, request: Any) -> Any:
        alias = str(auditq_settings().get("database", "default"))
        return super().get_queryset(request).using(alias)

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False
