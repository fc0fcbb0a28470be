"""ASGI entry point (auditq is configured by its app, `auditq.contrib.django`)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_site.settings")
application = get_asgi_application()
