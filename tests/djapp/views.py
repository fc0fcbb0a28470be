from __future__ import annotations

from typing import Any

from django.http import HttpResponse, JsonResponse

import auditq


def tenant_of(request: Any) -> str | None:
    """The AUDITQ_TENANT hook used by the tests: the tenant from a header."""
    return request.headers.get("X-Tenant") or None


def share(request: Any, doc_id: str) -> JsonResponse:
    auditq.log("document.share", resource_type="document", resource_id=doc_id)
    return JsonResponse({"shared": doc_id})


async def ashare(request: Any, doc_id: str) -> JsonResponse:
    auditq.log("document.share", resource_type="document", resource_id=doc_id)
    return JsonResponse({"shared": doc_id})


def health(request: Any) -> HttpResponse:
    return HttpResponse("ok")
