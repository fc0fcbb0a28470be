"""Small helpers shared by the tests: polling with a generous bound, running a script."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from auditq.connection import DsnSource
from auditq.dsn import Dsn
from auditq.sink import Sink
from auditq.watchdog import Watchdog

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, step: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def run_python(source: str, *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `source` in a fresh interpreter (this venv's), with auditq importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for name in ("AUDITQ_DSN", "DATABASE_URL"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def own_sink(dsn: str, schema: str, table: str, ledger: Any) -> Iterator[Sink]:
    """A Sink on its own connection and watchdog, reporting to `ledger`; closed after."""
    source, watchdog = DsnSource(Dsn(dsn)), Watchdog("test-watchdog")
    try:
        yield Sink(
            source,
            schema=schema,
            table=table,
            ledger=ledger,
            abort=threading.Event(),
            watchdog=watchdog,
            dsn=None,
            write_timeout=30.0,
            retry_backoff_max=0.1,
        )
    finally:
        source.close()
        watchdog.close()
