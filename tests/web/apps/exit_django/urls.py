from __future__ import annotations

from typing import Any

from django.http import HttpResponse
from django.urls import path

import auditq


def hit(request: Any, rid: str) -> HttpResponse:
    accepted = auditq.log("test.hit", resource_type="path", resource_id=rid)
    return HttpResponse("ok", status=200 if accepted else 503)


def health(request: Any) -> HttpResponse:
    return HttpResponse("ok")


urlpatterns = [path("hit/<str:rid>", hit), path("health", health)]
