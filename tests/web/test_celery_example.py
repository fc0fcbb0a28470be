"""examples/celery_worker.py as docs/celery.md runs it: a prefork worker, PostgreSQL as the
broker and result backend (kombu's SQLAlchemy transport), a warm shutdown by SIGTERM. The
writer's flush interval is far longer than the test, so rows only appear if each pool
process drains at shutdown."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from psycopg import conninfo

from ..conftest import Table
from ..helpers import ROOT
from .load import start, stop

celery = pytest.importorskip("celery", reason="the test extra brings celery")

BIN = Path(sys.executable).parent
TASKS = 40


def _url(dsn: str, scheme: str) -> str:
    """A SQLAlchemy URL for the test database; host and port as query parameters, so a
    unix-socket directory (the embedded server's) works as well as a TCP host."""
    p = conninfo.conninfo_to_dict(dsn)
    user = quote(str(p.get("user", "postgres")), safe="")
    auth = user + (f":{quote(str(p['password']), safe='')}" if p.get("password") else "")
    query = urlencode({"host": p.get("host") or "127.0.0.1", "port": p.get("port", 5432)})
    return f"{scheme}://{auth}@/{quote(str(p.get('dbname', 'postgres')), safe='')}?{query}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # kombu's SQLAlchemy transport
def test_celery_worker_drains_every_pool_process(table: Table, tmp_path: Path) -> None:
    broker = _url(table.dsn, "sqla+postgresql+psycopg")
    backend = _url(table.dsn, "db+postgresql+psycopg")
    queue = f"auditq-{table.name}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITQ_")}
    env.update(
        AUDITQ_DSN=table.dsn,
        AUDITQ_SCHEMA=table.schema,
        AUDITQ_TABLE=table.name,
        AUDITQ_FLUSH_INTERVAL="300",
        CELERY_BROKER_URL=broker,
        CELERY_RESULT_BACKEND=backend,
        PYTHONPATH=str(ROOT),
    )
    argv = [
        str(BIN / "celery"),
        "-A",
        "examples.celery_worker",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "2",
        "--queues",
        queue,
        "--loglevel",
        "WARNING",
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
    ]
    log = tmp_path / "worker.log"
    proc = start(argv, env, ROOT, log)
    client = celery.Celery("client", broker=broker, backend=backend)
    try:
        results = [
            client.send_task(
                "examples.celery_worker.share_document",
                args=(f"doc-{n}", f"u-{n % 3}", "t-1"),
                queue=queue,
            )
            for n in range(TASKS)
        ]
        done = [r.get(timeout=60) for r in results]
        assert done == [f"doc-{n}" for n in range(TASKS)]
        task_ids = sorted(r.id for r in results)
    finally:
        code = stop(proc, signal.SIGTERM, timeout=60)
        client.close()
    output = log.read_text(errors="replace")
    assert code == 0, output[-3000:]
    rows = table.query("SELECT request_id, actor_id, actor_type, tenant_id FROM {table}")
    assert sorted(r[0] for r in rows) == task_ids, output[-3000:]
    assert {(r[2], r[3]) for r in rows} == {("service", "t-1")}
    assert {r[1] for r in rows} == {"u-0", "u-1", "u-2"}
