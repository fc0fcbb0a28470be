from __future__ import annotations

from typing import Any

from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

import auditq


@csrf_exempt
def share(request: Any, doc_id: str) -> JsonResponse:
    user = request.headers.get("X-User", "anonymous")
    with auditq.context(tenant_id="t-42", actor_id=user, actor_type="user"):
        auditq.log("document.share", resource_type="document", resource_id=doc_id)
    return JsonResponse({"shared": doc_id})


def health(request: Any) -> HttpResponse:
    return HttpResponse("ok")
