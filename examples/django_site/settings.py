"""A minimal Django site using auditq (see docs/frameworks.md).

    pip install auditq django gunicorn
    AUDITQ_DSN=postgresql://app@db/app DJANGO_SETTINGS_MODULE=examples.django_site.settings \
        gunicorn --preload -w 2 examples.django_site.wsgi
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "examples.django_site.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, object] = {}  # auditq needs no Django database
USE_TZ = True

MIDDLEWARE = [
    # First, so every later middleware and view runs inside the request's context.
    "auditq.middleware.AuditDjangoMiddleware",
    "django.middleware.common.CommonMiddleware",
]

# Keywords for the middleware; each unset one falls back to AUDITQ_* in the environment.
AUDITQ_MIDDLEWARE = {
    "request_id_header": "X-Request-ID",
    "trusted_proxies": [],  # e.g. ["10.0.0.0/8"] behind your load balancer
    "log_requests": True,  # one http.request entry per request, with the route template
}
