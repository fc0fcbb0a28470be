"""The FastAPI sync-dependency context trap (docs/fastapi.md), served for real: what a plain
`def` dependency binds is lost; what an `async def` one binds reaches the endpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header

import auditq
from auditq.middleware import AuditASGIMiddleware


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    auditq.configure()
    yield
    auditq.shutdown()


app = FastAPI(lifespan=lifespan)
app.add_middleware(AuditASGIMiddleware)


def user_sync(x_user: str = Header()) -> str:
    auditq.bind(actor_id=x_user)  # runs in a worker thread, in a copy of the context
    return x_user


async def user_async(x_user: str = Header()) -> str:
    auditq.bind(actor_id=x_user)  # runs in the request's task: the endpoint sees it
    return x_user


@app.post("/sync-dependency")
async def with_sync(user: str = Depends(user_sync)) -> dict[str, str]:
    auditq.log("trap.sync")
    return {"user": user}


@app.post("/async-dependency")
async def with_async(user: str = Depends(user_async)) -> dict[str, str]:
    auditq.log("trap.async")
    return {"user": user}


@app.post("/sync-dependency-explicit")
async def explicit(user: str = Depends(user_sync)) -> dict[str, str]:
    auditq.log("trap.explicit", actor_id=user)  # or pass the value on explicitly
    return {"user": user}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
