"""Django integration: add `"auditq.contrib.django"` to `INSTALLED_APPS`.

Its `ready()` configures the default writer from the `AUDITQ` settings dict (reusing
`DATABASES["default"]` when no DSN is given) and installs auditq's SIGTERM/SIGINT exit handlers
(`auditq.signals`; opt out with `AUDITQ_EXIT_HANDLERS = False`). See docs/django.md.
"""

from .conf import configure_from_settings, database_dsn, resolve_dsn

__all__ = ["configure_from_settings", "database_dsn", "resolve_dsn"]
