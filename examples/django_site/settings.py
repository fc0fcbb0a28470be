"""A minimal Django site using auditq's Django app (see docs/django.md).

    pip install ./auditq django gunicorn uvicorn    # from a checkout: no release yet
    AUDITQ_DSN=postgresql://app@db/app DJANGO_SETTINGS_MODULE=examples.django_site.settings \\
        gunicorn --preload -w 2 examples.django_site.wsgi         # WSGI
    AUDITQ_DSN=... uvicorn examples.django_site.asgi:application   # ASGI
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "examples.django_site.urls"
# The app configures the writer at startup and installs the exit handlers (SIGTERM/SIGINT
# drain before the process ends, also under servers that end by the signal).
INSTALLED_APPS: list[str] = ["auditq.contrib.django"]
# No DATABASES here: auditq uses AUDITQ["dsn"], else AUDITQ_DSN, else DATABASES["default"].
DATABASES: dict[str, object] = {}
USE_TZ = True

MIDDLEWARE = [
    # Binds request id, client IP and user agent; the actor (request.user) and the tenant
    # (AUDITQ_TENANT) after authentication. Sync and async.
    "auditq.contrib.django.middleware.AuditMiddleware",
    "django.middleware.common.CommonMiddleware",
]

# Writer options (AuditWriter keywords) and "dsn"; each unset one falls back to AUDITQ_*.
AUDITQ: dict[str, object] = {}
# Keywords for the request context; each unset one falls back to AUDITQ_* in the environment.
AUDITQ_MIDDLEWARE = {
    "request_id_header": "X-Request-ID",
    "trusted_proxies": [],  # e.g. ["10.0.0.0/8"] behind your load balancer
    "log_requests": True,  # one http.request entry per request, with the route template
}
