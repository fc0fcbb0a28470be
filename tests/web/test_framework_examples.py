"""The examples docs/starlette.md and docs/django.md (ASGI) show, under uvicorn against the
real database, and the FastAPI sync-dependency trap docs/fastapi.md warns about."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from ..conftest import Table
from ..helpers import ROOT
from .load import free_port, start, stop, wait_ready
from .test_examples import _env, _post, _serve_and_share

BIN = Path(sys.executable).parent


def _uvicorn(app: str, port: int) -> list[str]:
    return [
        str(BIN / "uvicorn"),
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--no-proxy-headers",
    ]


def test_starlette_example_under_uvicorn(table: Table, tmp_path: Path) -> None:
    port = free_port()
    argv = _uvicorn("examples.starlette_app:app", port)
    _serve_and_share(argv, table, tmp_path, port, signal.SIGTERM, AUDITQ_FLUSH_INTERVAL="300")


def test_django_example_under_uvicorn_asgi(table: Table, tmp_path: Path) -> None:
    """The reported bug: Django's ASGI app under plain uvicorn, SIGTERM, a flush interval
    longer than the test: the rows are there only because the app's exit handlers drain."""
    port = free_port()
    argv = _uvicorn("examples.django_site.asgi:application", port)
    _serve_and_share(
        argv,
        table,
        tmp_path,
        port,
        signal.SIGTERM,
        DJANGO_SETTINGS_MODULE="examples.django_site.settings",
        AUDITQ_FLUSH_INTERVAL="300",
    )
    routes = table.query(
        "SELECT metadata->>'route' FROM {table}"
        " WHERE action = 'http.request' AND metadata->>'method' = 'POST'"
    )
    assert routes == [("documents/<str:doc_id>/share",)] * 2


def test_fastapi_sync_dependency_context_trap(table: Table, tmp_path: Path) -> None:
    port = free_port()
    proc = start(
        _uvicorn("tests.web.apps.fastapi_trap:app", port), _env(table), ROOT, tmp_path / "log"
    )
    try:
        wait_ready(port, proc)
        for path in ("/sync-dependency", "/async-dependency", "/sync-dependency-explicit"):
            assert _post(port, path, {"X-User": "u-1"})[0] == 200
    finally:
        stop(proc, signal.SIGTERM)
    rows = table.query("SELECT action, actor_id FROM {table} ORDER BY action")
    assert rows == [
        ("trap.async", "u-1"),
        ("trap.explicit", "u-1"),
        ("trap.sync", None),  # the trap: bound in a copy of the context, then thrown away
    ]
