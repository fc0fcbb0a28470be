"""WSGI entry point: configure auditq once (in gunicorn's master with --preload), then Django."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

import auditq

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_site.settings")
auditq.configure()  # AUDITQ_DSN / DATABASE_URL and AUDITQ_* options
application = get_wsgi_application()
