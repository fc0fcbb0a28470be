"""The watchdog cuts an operation that outlives its bound, however arms and disarms
interleave with its sleep (it is woken only for a deadline earlier than its own)."""

from __future__ import annotations

import socket
import time

from auditq.watchdog import Watchdog

from .helpers import wait_until


def _cut(sock: socket.socket) -> bool:
    """True once the peer end of `sock` sees the connection shut down."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False


def test_rearmed_with_a_later_deadline_fires_at_that_deadline() -> None:
    dog = Watchdog("test-watchdog")
    ours, peer = socket.socketpair()
    try:
        dog.start()
        dog.arm(ours.fileno(), 0.4)  # the thread now sleeps until this deadline...
        dog.disarm()
        started = time.monotonic()
        dog.arm(ours.fileno(), 1.0)  # ...and is not woken for this later one
        time.sleep(0.6)
        assert not _cut(peer) and dog.fired == 0  # the old deadline passed harmlessly
        assert wait_until(lambda: _cut(peer), timeout=5)
        assert time.monotonic() - started >= 0.95 and dog.fired == 1
    finally:
        dog.close()
        ours.close()
        peer.close()


def test_an_earlier_deadline_wakes_the_sleeping_thread() -> None:
    dog = Watchdog("test-watchdog")
    ours, peer = socket.socketpair()
    try:
        dog.start()
        assert wait_until(lambda: dog._wakes_at > time.monotonic(), timeout=5)  # idle wait
        started = time.monotonic()
        dog.arm(ours.fileno(), 0.2)
        assert wait_until(lambda: _cut(peer), timeout=5)
        assert time.monotonic() - started < 3.0 and dog.fired == 1
    finally:
        dog.close()
        ours.close()
        peer.close()


def test_disarmed_in_time_never_fires() -> None:
    dog = Watchdog("test-watchdog")
    ours, peer = socket.socketpair()
    try:
        for _ in range(50):
            dog.arm(ours.fileno(), 0.3)
            dog.disarm()
        time.sleep(0.6)
        assert not _cut(peer) and dog.fired == 0
    finally:
        dog.close()
        ours.close()
        peer.close()
