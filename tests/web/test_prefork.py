"""Real pre-fork servers on loopback: every successful request leaves exactly one row, and
the stats each worker wrote at exit agree with the table.

The app (`apps/prefork_app.py`) configures auditq from the environment at import, which with
`--preload` (gunicorn) or without `--lazy-apps` (uWSGI) happens in the master, before fork.
Each request carries a unique X-Request-ID, which the middleware binds and the row stores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..conftest import Table
from ..helpers import ROOT
from .load import free_port, run_load, start, stop, wait_ready

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Server:
    id: str
    argv: tuple[str, ...]  # {port} and {tmp} are filled in
    stop: str  # "SIGTERM", "SIGINT" or "fifo" (uWSGI's master FIFO, command q)
    requests: int = 1500
    concurrency: int = 8
    keepalive: bool = True
    min_processes: int = 1  # processes that must have served (restarts make more)


def _tool(name: str) -> str | None:
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name)


def _gunicorn_extra() -> tuple[str, ...]:
    # gunicorn >= 24 opens a control socket in ~/.gunicorn by default: keep each test's apart.
    try:
        from gunicorn.config import Config

        if "control_socket" in Config().settings:
            return ("--control-socket", "{tmp}/gunicorn.ctl")
    except ImportError:
        pass
    return ()


APP_WSGI = "tests.web.apps.prefork_app:wsgi"
APP_ASGI = "tests.web.apps.prefork_app:asgi"
GUNICORN = ("gunicorn", "--preload", "-b", "127.0.0.1:{port}", "--graceful-timeout", "20")
UWSGI = (
    "uwsgi",
    "--master",
    "--processes",
    "2",
    "--http-socket",
    "127.0.0.1:{port}",
    "--master-fifo",
    "{tmp}/fifo",
    "--module",
    APP_WSGI,
    "--need-app",
    "--disable-logging",
)

SERVERS = [
    Server("gunicorn-sync", (*GUNICORN, "-w", "4", APP_WSGI), "SIGTERM", min_processes=2),
    Server(
        "gunicorn-gthread",
        (*GUNICORN, "-w", "2", "-k", "gthread", "--threads", "4", APP_WSGI),
        "SIGTERM",
    ),
    Server(
        "gunicorn-max-requests",
        (*GUNICORN, "-w", "4", "--max-requests", "150", APP_WSGI),
        "SIGTERM",
        min_processes=8,
    ),
    Server(
        "uvicorn-workers-2",
        (
            "uvicorn",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--no-access-log",
            "--lifespan",
            "on",
            APP_ASGI,
        ),
        "SIGTERM",
        concurrency=24,
    ),
    Server(
        "uvicorn-limit-max-requests",
        (
            "uvicorn",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--no-access-log",
            "--lifespan",
            "on",
            "--limit-max-requests",
            "300",
            APP_ASGI,
        ),
        "SIGTERM",
        concurrency=24,
        keepalive=False,  # a worker at its limit closes idle keep-alive connections
        min_processes=3,
    ),
    Server("uwsgi", UWSGI, "fifo", keepalive=False),
    Server("uwsgi-enable-threads", (*UWSGI, "--enable-threads"), "fifo", keepalive=False),
    Server("uwsgi-lazy-apps", (*UWSGI, "--lazy-apps"), "fifo", keepalive=False),
    Server(
        "uwsgi-threads-lazy", (*UWSGI, "--enable-threads", "--lazy-apps"), "fifo", keepalive=False
    ),
    Server(
        "uwsgi-max-requests",
        (*UWSGI, "--max-requests", "300", "--min-worker-lifetime", "0"),
        "fifo",
        requests=1200,
        keepalive=False,
        min_processes=3,
    ),
]


@pytest.mark.parametrize("server", SERVERS, ids=[s.id for s in SERVERS])
def test_one_row_per_request_after_graceful_stop(
    server: Server, table: Table, tmp_path: Path
) -> None:
    tool = _tool(server.argv[0])
    if tool is None:
        reason = f"{server.argv[0]} is not installed (pip install -e '.[test]' brings it)"
        print(f"SKIP {server.id}: {reason}")
        pytest.skip(reason)
    port = free_port()
    stats_dir = tmp_path / "stats"
    stats_dir.mkdir()
    extra = _gunicorn_extra() if server.argv[0] == "gunicorn" else ()
    argv = [tool, *(a.format(port=port, tmp=tmp_path) for a in (*server.argv[1:-1], *extra))]
    argv.append(server.argv[-1].format(port=port, tmp=tmp_path))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("AUDITQ_") and k != "DATABASE_URL"
    }
    env.update(
        AUDITQ_DSN=table.dsn,
        AUDITQ_SCHEMA=table.schema,
        AUDITQ_TABLE=table.name,
        AUDITQ_FLUSH_INTERVAL="0.5",
        AUDITQ_TEST_STATS_DIR=str(stats_dir),
        PYTHONPATH=str(ROOT),
    )
    log = tmp_path / "server.log"
    proc = start(argv, env, ROOT, log)
    try:
        wait_ready(port, proc)
        result = run_load(
            port,
            server.requests,
            concurrency=server.concurrency,
            keepalive=server.keepalive,
            prefix=server.id,
        )
    finally:
        if server.stop == "fifo":
            (tmp_path / "fifo").write_text("q")
            code = proc.wait(40)
        else:
            code = stop(proc, getattr(signal, server.stop))
    output = log.read_text(errors="replace")
    assert code in (0, -signal.SIGTERM), output[-3000:]

    # Every successful request left exactly one row, and no failed request left any.
    rows = table.query("SELECT request_id, metadata->>'pid' FROM {table}")
    ids = Counter(r[0] for r in rows)
    assert len(result.ok) >= server.requests * 0.95, result.failed[:5]
    assert sorted(ids) == sorted(result.ok), (len(ids), len(result.ok), result.failed[:5])
    assert max(ids.values()) == 1

    # Every process that served wrote its stats, and they match the table.
    deadline = time.monotonic() + 10
    served = Counter(int(r[1]) for r in rows)
    while time.monotonic() < deadline:
        stats = {int(p.stem): json.loads(p.read_text()) for p in stats_dir.glob("*.json")}
        if set(served) <= set(stats):
            break
        time.sleep(0.1)
    missing = set(served) - set(stats)
    assert not missing, f"no stats from {missing}\n{output[-3000:]}"
    for pid, record in stats.items():
        assert record["configured"]
        assert record["accepted"] == record["written"] == served.get(pid, 0), record
        assert record["pending"] == record["dead_lettered"] == 0, record
        assert record["dropped_overflow"] == record["rejected"] == 0, record
    assert len(served) >= server.min_processes, served
    assert sum(r["written"] for r in stats.values()) == len(rows)
