"""A Celery worker with auditq: each task runs in a context naming the task, and every
pool process drains its queue when the worker stops.

    pip install ./auditq celery    # from a checkout: no release yet
    AUDITQ_DSN=postgresql://app@db/app CELERY_BROKER_URL=redis://... \\
        celery -A examples.celery_worker worker --concurrency 2
    kill -TERM <worker pid>     # warm shutdown: tasks finish, then each process drains

Prefork pool processes end with `os._exit()`, which skips `atexit` (auditq's exit drain), so
the `worker_process_shutdown` signal shuts auditq down there; `worker_shutdown` does the same
for the main process (the solo and threads pools run tasks in it).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

import auditq

auditq.configure()  # AUDITQ_DSN / DATABASE_URL and AUDITQ_*: opens nothing until first use

app = Celery(
    "examples",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"),
    backend=os.environ.get("CELERY_RESULT_BACKEND") or None,
)


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    # The task id as the request id: one task's entries can be found together.
    auditq.bind(request_id=task_id, actor_type="service")


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    auditq.unbind()  # a pool process runs many tasks: nothing leaks into the next


@signals.worker_process_shutdown.connect
def _drain_pool_process(**_: Any) -> None:
    auditq.shutdown()


@signals.worker_shutdown.connect
def _drain_main_process(**_: Any) -> None:
    auditq.shutdown()


@app.task
def share_document(doc_id: str, user: str, tenant: str) -> str:
    with auditq.context(actor_id=user, tenant_id=tenant):
        auditq.log("document.share", resource_type="document", resource_id=doc_id)
    return doc_id
