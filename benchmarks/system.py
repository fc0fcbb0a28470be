"""Process-level measurements for the comparison harness: resident memory, a writer's thread, and
freezing the
PostgreSQL server the harness started (SIGSTOP of every server process, then SIGCONT).

Freezing needs `psutil` (the `bench` extra) to list the server's processes; resident
memory falls back to `/proc/self/statm` without it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import threading
from typing import Any

import psycopg

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size now, in bytes (0 when it cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    try:
        psutil = importlib.import_module("psutil")
    except ImportError:
        return 0
    return int(psutil.Process().memory_info().rss)


class ServerFreezer:
    """SIGSTOP / SIGCONT every process of a local PostgreSQL server.

    The postmaster is found as the parent of a backend this harness connects to, so it works
    only for a server on this machine that this process may signal; use it only for a server
    the harness started itself.
    """

    def __init__(self, dsn: str) -> None:
        # The `bench` extra (untyped); ImportError tells the caller it is missing.
        psutil: Any = importlib.import_module("psutil")

        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            if row is None:
                raise RuntimeError("pg_backend_pid() returned nothing")
            # Looked up while the connection is open: its backend exits when it closes.
            backend = psutil.Process(int(row[0]))
            postmaster = backend.parent()
        command = " ".join(postmaster.cmdline() or [postmaster.name()]) if postmaster else ""
        if postmaster is None or "postgres" not in command:
            raise RuntimeError("cannot find the server's postmaster process")
        self._postmaster: Any = postmaster
        self._stopped: list[int] = []

    def processes(self) -> list[int]:
        root = self._postmaster
        return [int(root.pid), *(int(child.pid) for child in root.children(recursive=True))]

    def freeze(self) -> int:
        """Stop every server process; returns how many were stopped."""
        self._stopped = self.processes()
        for pid in self._stopped:
            os.kill(pid, signal.SIGSTOP)
        return len(self._stopped)

    def thaw(self) -> None:
        """Continue every process stopped by `freeze` (and any child listed now)."""
        pids = set(self._stopped)
        with contextlib.suppress(Exception):  # best effort: still continue the stopped ones
            pids.update(self.processes())
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                continue
        self._stopped = []


def writer_thread(writer_name: str) -> threading.Thread | None:
    """The running writer thread of the writer named `writer_name` (`AuditWriter.name`), found
    by the name auditq gives it, so that its CPU time can be read from /proc."""
    wanted = f"auditq[{writer_name}]"
    return next((t for t in threading.enumerate() if t.name == wanted), None)
