"""FastAPI with auditq: request context from the middleware, one entry per business action.

    pip install 'auditq[test]'    # or: pip install auditq fastapi uvicorn
    AUDITQ_DSN=postgresql://app@db/app uvicorn examples.fastapi_app:app --workers 2

Every request gets a request id (X-Request-ID, else generated; echoed back), the client IP and
user agent in its context; `AUDITQ_LOG_REQUESTS=1` adds one `http.request` entry per request
(method, route template, status, duration). The lifespan handler configures auditq in each
worker and shuts it down at exit (uvicorn workers run no atexit hooks after SIGTERM).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Header

import auditq
from auditq.middleware import AuditASGIMiddleware


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    auditq.configure()  # AUDITQ_DSN / DATABASE_URL and AUDITQ_* options
    yield
    auditq.shutdown()


app = FastAPI(lifespan=lifespan)
# Behind a proxy: AuditASGIMiddleware(..., trusted_proxies=["10.0.0.0/8"]) or
# AUDITQ_TRUSTED_PROXIES=10.0.0.0/8. Added last, so it runs first (outermost).
app.add_middleware(AuditASGIMiddleware)


@app.post("/documents/{doc_id}/share")
async def share(doc_id: str, x_user: str = Header(default="anonymous")) -> dict[str, str]:
    # tenant/actor come from your auth; request id, ip and user agent from the middleware.
    with auditq.context(tenant_id="t-42", actor_id=x_user, actor_type="user"):
        auditq.log("document.share", resource_type="document", resource_id=doc_id)
    return {"shared": doc_id}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
