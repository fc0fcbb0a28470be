"""The app the pre-fork server tests serve: one audit entry per request, and at exit a
stats file per process.

Configured from the environment only (`AUDITQ_DSN`, `AUDITQ_SCHEMA`, `AUDITQ_TABLE`), at
import: under `--preload` (gunicorn) or without `--lazy-apps` (uWSGI) that is in the master,
before the workers are forked, which is the case auditq's fork handling must get right.

`AUDITQ_TEST_STATS_DIR` names a directory where each process writes `<pid>.json` with its
default writer's stats, after auditq's own exit drain has run: the hook is registered
before auditq is imported, and `atexit` runs hooks last-in, first-out.
"""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

_STATS_DIR = os.environ.get("AUDITQ_TEST_STATS_DIR", "")


def dump_stats() -> None:
    """Write this process's writer stats (once; a second call from another hook is a no-op)."""
    if not _STATS_DIR:
        return
    path = os.path.join(_STATS_DIR, f"{os.getpid()}.json")
    if os.path.exists(path):
        return
    writer = WRITER if "WRITER" in globals() else None
    record: dict[str, Any] = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "configured": writer is not None,
    }
    if writer is not None:
        stats = writer.stats()
        record.update(
            closed=writer.closed,
            accepted=stats.accepted,
            written=stats.written,
            dead_lettered=stats.dead_lettered,
            dropped_overflow=stats.dropped_overflow,
            rejected=stats.rejected,
            pending=stats.pending,
            last_error=stats.last_error,
        )
    with open(path + ".tmp", "w") as out:
        json.dump(record, out)
    os.replace(path + ".tmp", path)


atexit.register(dump_stats)

import auditq  # noqa: E402 - after the hook above, on purpose (see the module docstring)
from auditq.middleware import AuditASGIMiddleware, AuditWSGIMiddleware  # noqa: E402

#: This process's default writer (kept here: `auditq.shutdown()` forgets it).
WRITER = auditq.configure()

if os.environ.get("AUDITQ_TEST_UWSGI_ATEXIT"):
    import uwsgi  # type: ignore[import-not-found]

    def _uwsgi_exit() -> None:
        auditq.shutdown()
        dump_stats()

    uwsgi.atexit = _uwsgi_exit


def _hit(path: str) -> tuple[str, bytes]:
    if path == "/health":
        return "200 OK", b"ok"
    accepted = auditq.log(
        "test.hit", resource_type="path", resource_id=path, metadata={"pid": os.getpid()}
    )
    return ("200 OK" if accepted else "503 Service Unavailable"), str(os.getpid()).encode()


def _wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    status, body = _hit(environ.get("PATH_INFO", ""))
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def _asgi(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # The middleware flushes the writer before passing this on; uvicorn then
                # re-raises SIGTERM and its workers run no atexit hooks, so record here.
                await send({"type": "lifespan.shutdown.complete"})
                dump_stats()
                return
    status, body = _hit(scope["path"])
    await send(
        {
            "type": "http.response.start",
            "status": int(status.split()[0]),
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": body})


wsgi = AuditWSGIMiddleware(_wsgi)
asgi = AuditASGIMiddleware(_asgi)
