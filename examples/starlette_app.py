"""Starlette with auditq: the ASGI middleware, configure and shut down in the lifespan.

    pip install ./auditq starlette uvicorn    # from a checkout: no release yet
    AUDITQ_DSN=postgresql://app@db/app uvicorn examples.starlette_app:app

See docs/starlette.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import auditq
import auditq.signals
from auditq.middleware import AuditASGIMiddleware


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    auditq.configure()  # AUDITQ_DSN / DATABASE_URL and AUDITQ_* options
    auditq.signals.install_exit_handlers()
    yield
    auditq.shutdown()


async def share(request: Request) -> JSONResponse:
    doc_id = request.path_params["doc_id"]
    user = request.headers.get("X-User", "anonymous")
    with auditq.context(tenant_id="t-42", actor_id=user, actor_type="user"):
        auditq.log("document.share", resource_type="document", resource_id=doc_id)
    return JSONResponse({"shared": doc_id})


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/documents/{doc_id}/share", share, methods=["POST"]),
        Route("/health", health),
    ],
    middleware=[Middleware(AuditASGIMiddleware)],
    lifespan=lifespan,
)
