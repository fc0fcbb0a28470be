from __future__ import annotations

SECRET_KEY = "tests-only"  # noqa: S105
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "tests.web.apps.exit_django.urls"
INSTALLED_APPS = ["auditq.contrib.django"]
MIDDLEWARE = ["auditq.contrib.django.middleware.AuditMiddleware"]
DATABASES: dict[str, object] = {}
USE_TZ = True
AUDITQ: dict[str, object] = {}  # AUDITQ_DSN / AUDITQ_* from the environment
