"""Issue 15, bug 1: a stop signal must not lose what the workers accepted.

Each cell serves one app (Django with `auditq.contrib.django`, FastAPI, Flask, each set up as
its docs page shows) under one server, sends requests that each log one entry, stops the
server with SIGTERM or SIGINT, and checks that every request answered 200 (its entry
accepted) left exactly one row. The writers' flush interval is far longer than the test, so
nothing reaches the table unless the stop drains it (without `auditq.signals`, Django under
plain uvicorn ended with 0 rows).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..conftest import Table
from ..helpers import ROOT
from .load import LoadResult, free_port, run_load, start, stop, wait_ready

BIN = Path(sys.executable).parent

DJANGO_ASGI = "tests.web.apps.exit_django.asgi:application"
DJANGO_WSGI = "tests.web.apps.exit_django.wsgi:application"
FASTAPI = "tests.web.apps.exit_fastapi:app"
FLASK = "tests.web.apps.exit_flask:app"

UVICORN = ("uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--no-access-log")
GUNICORN = ("gunicorn", "-b", "127.0.0.1:{port}", "--graceful-timeout", "4")
UWSGI = (
    "uwsgi",
    "--master",
    "--processes",
    "2",
    "--http-socket",
    "127.0.0.1:{port}",
    "--need-app",
    "--disable-logging",
    "--master-fifo",
    "{tmp}/fifo",
)
HYPERCORN = ("hypercorn", "-b", "127.0.0.1:{port}")
DAPHNE = ("daphne", "-b", "127.0.0.1", "-p", "{port}")
#: uWSGI's own SIGINT (and SIGTERM with --die-on-term) is brutal: a worker still in a request
#: ends inside the signal handler and uWSGI runs no exit hook there, so what it queued is lost.
#: These options (docs/frameworks.md) remap both signals to the FIFO `q`'s graceful stop.
UWSGI_GRACEFUL = (
    "--enable-threads",
    "--hook-master-start",
    "unix_signal:15 gracefully_kill_them_all",
    "--hook-master-start",
    "unix_signal:2 gracefully_kill_them_all",
)


@dataclass(frozen=True)
class Cell:
    id: str
    argv: tuple[str, ...]  # {port} and {tmp} are filled in
    keepalive: bool = True


#: uWSGI stopped by the master FIFO's `q`, its graceful stop without the signal remapping.
UWSGI_CELLS: list[Cell] = []


def _cells() -> list[Cell]:
    cells: list[Cell] = []
    for app_id, app in (("django", DJANGO_ASGI), ("fastapi", FASTAPI)):
        cells += [
            Cell(f"uvicorn-{app_id}", (*UVICORN, app)),
            Cell(f"uvicorn-workers-2-{app_id}", (*UVICORN, "--workers", "2", app)),
            Cell(
                f"gunicorn-uvicorn-worker-{app_id}",
                (*GUNICORN, "-w", "2", "-k", "uvicorn.workers.UvicornWorker", app),
            ),
            Cell(f"hypercorn-{app_id}", (*HYPERCORN, app)),
            Cell(f"daphne-{app_id}", (*DAPHNE, app)),
        ]
    for app_id, app in (("django", DJANGO_WSGI), ("flask", FLASK)):
        cells += [
            Cell(f"gunicorn-sync-{app_id}", (*GUNICORN, "--preload", "-w", "2", app)),
            Cell(
                f"gunicorn-gthread-{app_id}",
                (*GUNICORN, "-w", "2", "-k", "gthread", "--threads", "4", app),
            ),
        ]
        if app_id == "flask":  # the development server: SIGTERM ends it by the default action
            cells.append(
                Cell(
                    "flask-run-flask",
                    ("flask", "--app", "tests.web.apps.exit_flask", "run", "--port", "{port}"),
                )
            )
        cells.append(
            Cell(f"uwsgi-{app_id}", (*UWSGI, *UWSGI_GRACEFUL, "--module", app), keepalive=False)
        )
        UWSGI_CELLS.append(Cell(f"uwsgi-{app_id}", (*UWSGI, "--module", app), keepalive=False))
    return cells


CELLS = _cells()
SIGNALS = [signal.SIGTERM, signal.SIGINT]
REQUESTS = 100
LOAD_REQUESTS = 5_000  # far more than the load sends before the stop


def _tool(name: str) -> str | None:
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name)


@pytest.mark.parametrize("sig", SIGNALS, ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("cell", CELLS, ids=[c.id for c in CELLS])
def test_stop_signal_loses_nothing(cell: Cell, sig: int, table: Table, tmp_path: Path) -> None:
    _serve_load_stop(cell, sig, table, tmp_path)


@pytest.mark.parametrize("cell", UWSGI_CELLS, ids=[c.id for c in UWSGI_CELLS])
def test_uwsgi_fifo_stop_loses_nothing(cell: Cell, table: Table, tmp_path: Path) -> None:
    _serve_load_stop(cell, None, table, tmp_path)


def test_uwsgi_atexit_hook_drains_without_teardown(table: Table, tmp_path: Path) -> None:
    """`--skip-atexit-teardown` skips `Py_Finalize`, so Python's `atexit` (the writer's exit
    drain) never runs in a worker: only the hook auditq chains to `uwsgi.atexit` saves what
    the workers queued (without it this cell ended with 0 rows)."""
    argv = (*UWSGI, *UWSGI_GRACEFUL, "--skip-atexit-teardown", "--module", FLASK)
    _serve_load_stop(
        Cell("uwsgi-no-teardown-flask", argv, keepalive=False), signal.SIGTERM, table, tmp_path
    )


def test_uwsgi_own_atexit_hook_runs_after_the_drain(
    table: Table, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An application's own `uwsgi.atexit`, set before auditq's setup, still runs in each
    process, after auditq's drain (every row is in, and the hook finds the writer closed)."""
    marker = tmp_path / "own-hook"
    monkeypatch.setenv("EXIT_MATRIX_MARKER", str(marker))
    app = "tests.web.apps.uwsgi_own_atexit:app"
    argv = (*UWSGI, *UWSGI_GRACEFUL, "--module", app)
    _serve_load_stop(
        Cell("uwsgi-own-hook-flask", argv, keepalive=False), signal.SIGTERM, table, tmp_path
    )
    log = (tmp_path / "server.log").read_text(errors="replace")
    workers = set(re.findall(r"spawned uWSGI worker \d+ \(pid: (\d+)", log))
    seen = {path.suffix[1:]: path.read_text() for path in tmp_path.glob("own-hook.*")}
    assert len(workers) == 2 and set(seen) >= workers, (seen, log[-3000:])
    assert set(seen.values()) == {"drained"}, seen


@pytest.mark.parametrize("sig", SIGNALS, ids=["SIGTERM", "SIGINT"])
def test_uwsgi_graceful_stop_during_load_loses_nothing(
    sig: int, table: Table, tmp_path: Path
) -> None:
    """The signal arrives while both workers are busy, the case uWSGI's own brutal stop
    loses (with `--die-on-term` instead of UWSGI_GRACEFUL, every entry of a worker caught in
    a request was gone): every request answered 200 still has exactly one row."""
    cell = Cell("uwsgi-load-flask", (*UWSGI, *UWSGI_GRACEFUL, "--module", FLASK))
    proc, port, log = _start(cell, table, tmp_path)
    loaded: list[LoadResult] = []
    try:
        wait_ready(port, proc)
        sender = threading.Thread(
            target=lambda: loaded.append(
                run_load(port, LOAD_REQUESTS, concurrency=4, keepalive=False, prefix=cell.id)
            )
        )
        sender.start()
        _let_load_run(sender)
        mid_load = sender.is_alive()
    finally:
        code = stop(proc, sig)
    sender.join(60)
    output = log.read_text(errors="replace")
    ok = loaded[0].ok
    assert mid_load and ok, output[-3000:]
    rows = Counter(r[0] for r in table.query("SELECT resource_id FROM {table}"))
    missing = set(ok) - set(rows)
    assert not missing, f"exit {code}: {len(missing)} of {len(ok)} lost\n{output[-3000:]}"
    assert max(rows.values()) == 1


def _let_load_run(sender: threading.Thread) -> None:
    """Let the load run for a moment, so the stop lands in the middle of it."""
    deadline = time.monotonic() + 0.5
    while sender.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)


def _start(cell: Cell, table: Table, tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    tool = _tool(cell.argv[0])
    if tool is None:
        pytest.skip(f"{cell.argv[0]} is not installed")
    port = free_port()
    argv = [tool, *(a.format(port=port, tmp=tmp_path) for a in cell.argv[1:])]
    if cell.argv[0] == "gunicorn":
        argv[1:1] = ["--control-socket", str(tmp_path / "gunicorn.ctl")]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("AUDITQ_") and k != "DATABASE_URL"
    }
    env.update(
        AUDITQ_DSN=table.dsn,
        AUDITQ_SCHEMA=table.schema,
        AUDITQ_TABLE=table.name,
        AUDITQ_FLUSH_INTERVAL="300",  # nothing is written unless the stop drains it
        PYTHONPATH=str(ROOT),
    )
    log = tmp_path / "server.log"
    return start(argv, env, ROOT, log), port, log


def _serve_load_stop(cell: Cell, sig: int | None, table: Table, tmp_path: Path) -> None:
    proc, port, log = _start(cell, table, tmp_path)
    try:
        wait_ready(port, proc)
        result = run_load(port, REQUESTS, concurrency=4, keepalive=cell.keepalive, prefix=cell.id)
    finally:
        if sig is None:
            (tmp_path / "fifo").write_text("q")
            code = proc.wait(40)
        else:
            code = stop(proc, sig)
    output = log.read_text(errors="replace")
    assert len(result.ok) == REQUESTS, (result.failed[:5], output[-3000:])
    rows = Counter(r[0] for r in table.query("SELECT resource_id FROM {table}"))
    missing = set(result.ok) - set(rows)
    assert not missing, f"exit {code}: {len(missing)} of {REQUESTS} lost\n{output[-3000:]}"
    assert sorted(rows) == sorted(result.ok) and max(rows.values()) == 1
