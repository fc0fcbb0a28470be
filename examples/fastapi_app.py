"""FastAPI with auditq: request context from the middleware, the actor from an async
dependency, one entry per business action.

    pip install ./auditq fastapi uvicorn    # from a checkout: no release yet
    AUDITQ_DSN=postgresql://app@db/app uvicorn examples.fastapi_app:app --workers 2

Every request gets a request id (X-Request-ID, else generated; echoed back), the client IP and
user agent in its context; `AUDITQ_LOG_REQUESTS=1` adds one `http.request` entry per request
(method, route template, status, duration). The lifespan handler configures auditq in each
worker, installs the exit handlers (a server that ends by the signal still drains) and shuts
auditq down at exit. See docs/fastapi.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header

import auditq
import auditq.signals
from auditq.middleware import AuditASGIMiddleware


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    auditq.configure()  # AUDITQ_DSN / DATABASE_URL and AUDITQ_* options
    auditq.signals.install_exit_handlers()
    yield
    auditq.shutdown()


app = FastAPI(lifespan=lifespan)
# Behind a proxy: AuditASGIMiddleware(..., trusted_proxies=["10.0.0.0/8"]) or
# AUDITQ_TRUSTED_PROXIES=10.0.0.0/8. Added last, so it runs first (outermost).
app.add_middleware(AuditASGIMiddleware)


async def current_user(x_user: str = Header(default="anonymous")) -> str:
    # `async def`, on purpose: FastAPI runs a plain `def` dependency in a worker thread with
    # a copy of the context, so what it binds never reaches the endpoint (docs/fastapi.md).
    auditq.bind(actor_id=x_user, actor_type="user", tenant_id="t-42")
    return x_user


@app.post("/documents/{doc_id}/share")
async def share(doc_id: str, user: str = Depends(current_user)) -> dict[str, str]:
    # tenant/actor from the dependency; request id, ip and user agent from the middleware.
    auditq.log("document.share", resource_type="document", resource_id=doc_id)
    return {"shared": doc_id}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
