"""The FastAPI app of the exit matrix, set up as docs/fastapi.md shows (configure, install the
exit handlers and shut down in the lifespan; the ASGI middleware)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response

import auditq
import auditq.signals
from auditq.middleware import AuditASGIMiddleware


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    auditq.configure()
    auditq.signals.install_exit_handlers()  # in each worker, after the server's own
    yield
    auditq.shutdown()


app = FastAPI(lifespan=lifespan)
app.add_middleware(AuditASGIMiddleware)


@app.get("/hit/{rid}")
async def hit(rid: str) -> Response:
    accepted = auditq.log("test.hit", resource_type="path", resource_id=rid)
    return Response("ok", status_code=200 if accepted else 503)


@app.get("/health")
async def health() -> Response:
    return Response("ok")
