"""Each example runs as docs/frameworks.md shows, against the real database."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import Table
from ..helpers import ROOT
from .load import free_port, start, stop, wait_ready

BIN = Path(sys.executable).parent


def _env(table: Table, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("AUDITQ_") and k != "DATABASE_URL"
    }
    env.update(
        AUDITQ_DSN=table.dsn,
        AUDITQ_SCHEMA=table.schema,
        AUDITQ_TABLE=table.name,
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


def _post(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=b"", headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _serve_and_share(
    argv: list[str], table: Table, tmp_path: Path, port: int, sig: int, **env: str
) -> None:
    """Start the server, share two documents (one with a proxy-style X-Forwarded-For that must
    be ignored), stop it the way it expects, and check the rows."""
    log = tmp_path / "server.log"
    proc = start(argv, _env(table, **env), ROOT, log)
    try:
        wait_ready(port, proc)
        status, headers, _ = _post(
            port,
            "/documents/doc-1/share",
            {
                "X-Request-ID": "req-1",
                "X-User": "u-7",
                "User-Agent": "example-test/1",
                "X-Forwarded-For": "198.51.100.9",
            },
        )
        assert status == 200
        assert {k.lower(): v for k, v in headers.items()}["x-request-id"] == "req-1"
        status, headers, _ = _post(port, "/documents/doc-2/share", {"X-User": "u-8"})
        assert status == 200
        generated = {k.lower(): v for k, v in headers.items()}["x-request-id"]
    finally:
        code = stop(proc, sig)
    assert code in (0, -signal.SIGTERM), log.read_text()[-3000:]
    rows = table.query(
        "SELECT resource_id, actor_id, tenant_id, request_id, host(ip), user_agent"
        " FROM {table} WHERE action = 'document.share' ORDER BY resource_id"
    )
    assert rows == [
        ("doc-1", "u-7", "t-42", "req-1", "127.0.0.1", "example-test/1"),
        ("doc-2", "u-8", "t-42", generated, "127.0.0.1", None),  # http.client sends no UA
    ]


def test_fastapi_example_under_uvicorn(table: Table, tmp_path: Path) -> None:
    port = free_port()
    # --no-proxy-headers: uvicorn otherwise trusts X-Forwarded-For from 127.0.0.1 itself and
    # rewrites the client address before the middleware sees it (docs/frameworks.md).
    argv = [
        str(BIN / "uvicorn"),
        "examples.fastapi_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "2",
        "--no-access-log",
        "--no-proxy-headers",
    ]
    _serve_and_share(argv, table, tmp_path, port, signal.SIGTERM, AUDITQ_LOG_REQUESTS="1")
    routes = table.query(
        "SELECT metadata->>'route', metadata->>'status', outcome FROM {table}"
        " WHERE action = 'http.request' AND metadata->>'method' = 'POST'"
    )
    assert routes == [("/documents/{doc_id}/share", "200", "success")] * 2


def test_flask_example_under_gunicorn(table: Table, tmp_path: Path) -> None:
    port = free_port()
    argv = [
        str(BIN / "gunicorn"),
        "--preload",
        "-w",
        "2",
        "-b",
        f"127.0.0.1:{port}",
        "--control-socket",
        str(tmp_path / "ctl"),
        "examples.flask_app:app",
    ]
    _serve_and_share(argv, table, tmp_path, port, signal.SIGTERM)
    assert table.count() == 2  # request entries are off by default


def test_flask_example_dev_server(table: Table, tmp_path: Path) -> None:
    """`flask run` as the docs show; its SIGINT (Ctrl-C) exits through the atexit drain."""
    port = free_port()
    argv = [str(BIN / "flask"), "--app", "examples.flask_app", "run", "--port", str(port)]
    _serve_and_share(argv, table, tmp_path, port, signal.SIGINT)


def test_django_example_under_gunicorn(table: Table, tmp_path: Path) -> None:
    port = free_port()
    argv = [
        str(BIN / "gunicorn"),
        "--preload",
        "-w",
        "2",
        "-b",
        f"127.0.0.1:{port}",
        "--control-socket",
        str(tmp_path / "ctl"),
        "examples.django_site.wsgi",
    ]
    _serve_and_share(
        argv,
        table,
        tmp_path,
        port,
        signal.SIGTERM,
        DJANGO_SETTINGS_MODULE="examples.django_site.settings",
    )
    routes = table.query(
        "SELECT metadata->>'route', request_id FROM {table}"
        " WHERE action = 'http.request' AND metadata->>'method' = 'POST' ORDER BY 2"
    )
    assert [r[0] for r in routes] == ["documents/<str:doc_id>/share"] * 2
    assert "req-1" in [r[1] for r in routes]


def test_daemon_example_stops_cleanly_on_sigterm(table: Table) -> None:
    proc = subprocess.Popen(
        [sys.executable, "examples/daemon.py", "--interval", "0.002"],
        cwd=ROOT,
        env=_env(table),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        assert started["event"] == "started"
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["clean"] is True
    assert stopped["accepted"] == stopped["written"] == table.count() > 100
    assert table.query("SELECT count(DISTINCT resource_id) FROM {table}")[0][0] == table.count()
    assert table.query("SELECT DISTINCT actor_id FROM {table}") == [("daemon",)]


@pytest.mark.parametrize("module", ["examples.fastapi_app", "examples.flask_app"])
def test_examples_import_without_a_database(module: str) -> None:
    """Importing fails with the configure() error when no database is given, not later."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITQ_")}
    env.pop("DATABASE_URL", None)
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if module.endswith("fastapi_app"):
        assert done.returncode == 0, done.stderr  # configures in its lifespan, per worker
    else:
        assert done.returncode != 0 and "AUDITQ_DSN" in done.stderr
