"""A bound on how long one database operation may block the writer thread.

psycopg waits on its socket without a deadline, and a server that is stopped (SIGSTOP, a
frozen VM, packets dropped) keeps the TCP connection open, so neither libpq nor the kernel
ever gives up. This watchdog shuts the socket down from another thread when an armed
deadline passes; the blocked call then fails at once like any lost connection and the
writer's ordinary retry path takes over. `close()` uses the same lever to stop on time.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import weakref

logger = logging.getLogger("auditq")


def interrupt_socket(fd: int) -> None:
    """Shut down the connection behind `fd` (a private duplicate, which this closes) so every
    read or write on that connection fails now."""
    try:
        with socket.socket(fileno=fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected: nothing is blocked on it


class Watchdog:
    """One sleeping thread that interrupts the armed socket when its deadline passes."""

    def __init__(self, name: str) -> None:
        self._name = name
        # Guards the armed state; held only for assignments, never across I/O.
        self._cond = threading.Condition(threading.Lock())
        # A duplicate of the armed socket (so a closed and reused descriptor number can never
        # point the watchdog at another connection) and its monotonic deadline.
        self._fd: int | None = None
        self._deadline = 0.0
        # When the sleeping thread's current wait ends at the latest (monotonic): arm()
        # wakes it only for an earlier deadline. Each wake costs a GIL hand-off, which
        # callers that keep the GIL busy make slow for the writer (it waits on this lock).
        self._wakes_at = math.inf
        self._closed = False
        self._thread: threading.Thread | None = None
        #: How many operations were cut short.
        self.fired = 0

    def arm(self, fd: int, seconds: float) -> None:
        """Interrupt `fd` unless `disarm()` is called within `seconds`."""
        dup = os.dup(fd)
        with self._cond:
            stale, self._fd = self._fd, dup
            self._deadline = deadline = time.monotonic() + seconds
            if self._thread is None:
                self._start()
            elif deadline < self._wakes_at:
                self._cond.notify()
        if stale is not None:
            os.close(stale)

    def start(self) -> None:
        """Start the sleeping thread now (the writer does at its start, so that the first
        batch does not wait for a thread start while callers hold the GIL)."""
        with self._cond:
            if self._thread is None and not self._closed:
                self._start()

    def disarm(self) -> None:
        with self._cond:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def fire_now(self) -> bool:
        """Interrupt the armed operation immediately (used by `close()` at its deadline)."""
        with self._cond:
            fd = self._fd
            self._fd = None
        if fd is None:
            return False
        interrupt_socket(fd)
        self.fired += 1
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            fd, self._fd = self._fd, None
            self._cond.notify()
        if fd is not None:
            os.close(fd)

    def _start(self) -> None:
        thread = threading.Thread(
            target=_run, args=(weakref.ref(self), self._cond), name=self._name, daemon=True
        )
        thread.start()  # a failure leaves _thread None, so the next arm() tries again
        self._thread = thread

    def _step(self) -> bool:
        """Wait for the armed deadline and fire if it passed; False once closed."""
        with self._cond:
            if self._closed:
                return False
            now = time.monotonic()
            if self._fd is None:
                self._sleep(now, 60.0)
                return True
            remaining = self._deadline - now
            if remaining > 0:
                # Past a disarm and the next arm this wait still ends by the old deadline,
                # and the new one, later, is then found armed and waited for in turn.
                self._sleep(now, remaining)
                return True
            fd, self._fd = self._fd, None
        logger.warning("a database operation exceeded its time bound; interrupting it")
        interrupt_socket(fd)
        self.fired += 1
        return True

    def _sleep(self, now: float, seconds: float) -> None:
        """Wait on the condition (its lock held) until `seconds` pass or arm() wakes us."""
        self._wakes_at = now + seconds
        self._cond.wait(timeout=seconds)
        self._wakes_at = -math.inf  # awake: the state is read again before the next wait


def _run(ref: weakref.ref[Watchdog], cond: threading.Condition) -> None:
    # Holds only a weak reference between steps so an abandoned writer can be collected.
    while True:
        dog = ref()
        if dog is None or not dog._step():
            return
        del dog
