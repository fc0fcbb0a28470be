"""A small bounded load generator (threads + http.client) and server process helpers."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LoadResult:
    ok: list[str] = field(default_factory=list)  # request ids answered 200
    failed: list[tuple[str, str]] = field(default_factory=list)  # (request id, what happened)
    seconds: float = 0.0


def run_load(
    port: int,
    total: int,
    *,
    concurrency: int = 8,
    prefix: str = "r",
    deadline: float = 60.0,
    keepalive: bool = True,
) -> LoadResult:
    """Send `total` GETs to 127.0.0.1:`port`, each with a unique X-Request-ID, over
    `concurrency` keep-alive connections (re-opened when the server closes them). Bounded in
    count and in time; never retries a request (a retry could log twice)."""
    result = LoadResult()
    lock = threading.Lock()
    counter = iter(range(total))
    stop_at = time.monotonic() + deadline
    started = time.monotonic()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        try:
            while time.monotonic() < stop_at:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                rid = f"{prefix}-{n}"
                try:
                    headers = {"X-Request-ID": rid}
                    if not keepalive:
                        headers["Connection"] = "close"
                    conn.request("GET", f"/hit/{rid}", headers=headers)
                    response = conn.getresponse()
                    response.read()
                    if response.status == 200:
                        with lock:
                            result.ok.append(rid)
                    else:
                        with lock:
                            result.failed.append((rid, f"HTTP {response.status}"))
                    if response.will_close or not keepalive:
                        conn.close()
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        result.failed.append((rid, repr(exc)))
                    conn.close()
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - started
    return result


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Poll GET /health (which logs nothing) until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} not ready after {timeout}s")


def start(
    argv: Sequence[str], env: dict[str, str], cwd: Path, log: Path
) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - closed by stop()
    return subprocess.Popen(
        list(argv), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen[bytes], sig: int, timeout: float = 40.0) -> int:
    """Send `sig` (the server's graceful stop) and wait; kill the group if it overruns."""
    try:
        proc.send_signal(sig)
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise
