"""The Django app: configuring at `ready()` is the one moment every Django process shares
(runserver, gunicorn and uvicorn workers, management commands)."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class AuditqConfig(AppConfig):  # type: ignore[misc]
    name = "auditq.contrib.django"
    label = "auditq"
    verbose_name = "Audit log"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured

        from ... import signals
        from ...config import ConfigError
        from .conf import configure_from_settings

        try:
            writer = configure_from_settings()
        except ConfigError as exc:
            raise ImproperlyConfigured(str(exc)) from None
        if getattr(settings, "AUDITQ_EXIT_HANDLERS", True):
            timeout: Any = getattr(writer, "shutdown_timeout", None)
            signals.install_exit_handlers(timeout)
