"""flush/close semantics and timeouts (also against a frozen server), exit drain, fork."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from auditq import AuditWriter, DeadLetter

from .conftest import Table, WriterFactory
from .helpers import run_python, wait_until
from .pgserver import EmbeddedServer

# -- flush -----------------------------------------------------------------------------


def test_flush_returns_true_and_rows_are_there(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer(batch_size=10_000, flush_interval=60)
    for i in range(25):
        assert writer.log("flush.test", resource_id=str(i))
    assert writer.flush(timeout=30) is True
    assert table.count() == 25
    stats = writer.stats()
    assert (stats.written, stats.pending) == (25, 0)


def test_flush_with_nothing_queued_returns_at_once(make_writer: WriterFactory) -> None:
    writer = make_writer()
    start = time.monotonic()
    assert writer.flush(timeout=5) is True
    assert writer.flush() is True
    assert time.monotonic() - start < 2


def test_flush_waits_only_for_entries_before_the_call(
    table: Table, make_writer: WriterFactory
) -> None:
    writer = make_writer(batch_size=50, flush_interval=60)
    stop = threading.Event()

    def keep_logging() -> None:
        while not stop.is_set():
            writer.log("flush.background")

    for _ in range(100):
        assert writer.log("flush.before")
    thread = threading.Thread(target=keep_logging)
    thread.start()
    try:
        # A steady stream of new entries must not keep flush() from returning.
        assert writer.flush(timeout=30) is True
    finally:
        stop.set()
        thread.join(30)
    (count,) = table.query("SELECT count(*) FROM {table} WHERE action = 'flush.before'")[0]
    assert count == 100


def _frozen_writer(own_table: Table, own_server: EmbeddedServer, **options: Any) -> AuditWriter:
    """A writer that has connected once (so it holds a live connection), then the server
    is frozen: the connection stays open and nothing answers."""
    writer = AuditWriter(
        own_table.dsn,
        schema=own_table.schema,
        table=own_table.name,
        batch_size=10_000,
        flush_interval=60,
        **options,
    )
    assert writer.log("before.freeze")
    assert writer.flush(timeout=30)
    own_server.freeze()
    return writer


def test_flush_timeout_while_server_frozen(own_server: EmbeddedServer, own_table: Table) -> None:
    writer = _frozen_writer(own_table, own_server)
    try:
        for i in range(5):
            assert writer.log("during.freeze", resource_id=str(i))
        start = time.monotonic()
        assert writer.flush(timeout=1) is False
        elapsed = time.monotonic() - start
        assert 0.9 <= elapsed <= 1.5, elapsed
        # log() never blocks on the hung server either.
        start = time.monotonic()
        for _ in range(1000):
            assert writer.log("during.freeze.more")
        assert time.monotonic() - start < 1.0
        own_server.thaw()
        assert writer.flush(timeout=30) is True
        assert own_table.count() == 1 + 5 + 1000
        stats = writer.stats()
        assert (stats.written, stats.dead_lettered, stats.pending) == (1006, 0, 0)
    finally:
        own_server.thaw()
        writer.close(timeout=5)


def test_close_timeout_while_server_frozen(own_server: EmbeddedServer, own_table: Table) -> None:
    letters: list[DeadLetter] = []
    writer = _frozen_writer(own_table, own_server, on_dead_letter=letters.append)
    try:
        for i in range(20):
            assert writer.log("during.freeze", resource_id=str(i))
        time.sleep(0.2)
        start = time.monotonic()
        assert writer.close(timeout=1) is False
        elapsed = time.monotonic() - start
        assert elapsed <= 1.5, elapsed
        stats = writer.stats()
        assert stats.pending == 0
        assert stats.accepted == stats.written + stats.dead_lettered
        assert (stats.written, stats.dead_lettered) == (1, 20)
        assert len(letters) == 20
        assert all("close()" in letter.reason for letter in letters)
        assert sorted(int(letter.entry["resource_id"]) for letter in letters) == list(range(20))
        assert writer.log("after.close") is False
    finally:
        own_server.thaw()
    # Nothing counted as dead-lettered reached the table once the server woke up.
    time.sleep(0.5)
    assert own_table.count() == 1


def test_close_timeout_while_frozen_before_connecting(
    own_server: EmbeddedServer, own_table: Table
) -> None:
    # The watchdog cannot cut a connection attempt (there is no socket to interrupt yet), so
    # close() must give up on the stuck thread at its deadline and write its rows off.
    letters: list[DeadLetter] = []
    own_server.freeze()
    writer = AuditWriter(
        own_table.dsn,
        schema=own_table.schema,
        table=own_table.name,
        connect_timeout=2,
        on_dead_letter=letters.append,
    )
    try:
        for i in range(10):
            assert writer.log("never.connected", resource_id=str(i))
        time.sleep(0.3)  # the writer thread is now stuck connecting
        start = time.monotonic()
        assert writer.close(timeout=1) is False
        elapsed = time.monotonic() - start
        assert elapsed <= 1.5, elapsed
        stats = writer.stats()
        assert stats.pending == 0
        assert stats.accepted == stats.written + stats.dead_lettered == 10
        # When the connection attempt gives up, the thread hands each row to the callback
        # without counting it twice.
        assert wait_until(lambda: len(letters) == 10, timeout=15)
        assert all("close()" in letter.reason for letter in letters)
        stats = writer.stats()
        assert (stats.written, stats.dead_lettered, stats.pending) == (0, 10, 0)
    finally:
        own_server.thaw()
    time.sleep(0.5)
    assert own_table.count() == 0


# -- close -----------------------------------------------------------------------------


def test_close_is_idempotent_and_rejects_later_calls(
    table: Table, make_writer: WriterFactory
) -> None:
    writer = make_writer(flush_interval=60)
    for i in range(7):
        assert writer.log("close.test", resource_id=str(i))
    assert writer.close(timeout=30) is True
    assert writer.closed
    assert table.count() == 7
    before = writer.stats()
    assert writer.close(timeout=30) is True
    assert writer.close() is True
    assert writer.stats() == before
    assert writer.log("after.close") is False
    assert writer.write({"action": "after.close"}) is False
    assert writer.write_many([{"action": "after.close"}] * 2) == 0
    after = writer.stats()
    assert after.rejected == before.rejected + 4
    assert after.calls == before.calls + 4
    assert after.accepted == before.accepted == 7
    assert writer.flush(timeout=5) is True
    assert table.count() == 7


def test_close_of_unused_writer(make_writer: WriterFactory) -> None:
    writer = make_writer()
    start = time.monotonic()
    assert writer.close(timeout=5) is True
    assert time.monotonic() - start < 2
    assert writer.stats().pending == 0


def test_context_manager_drains(table: Table, make_writer: WriterFactory) -> None:
    with make_writer(flush_interval=60) as writer:
        for i in range(12):
            assert writer.log("ctx", resource_id=str(i))
    assert writer.closed
    assert table.count() == 12


def test_strict_writer_closed_returns_false_not_raise(make_writer: WriterFactory) -> None:
    writer = make_writer(strict=True)
    writer.close(timeout=5)
    assert writer.log("after.close") is False
    assert writer.stats().rejected == 1


# -- interpreter exit ------------------------------------------------------------------


def _script_header(table: Table) -> str:
    return f"""
import threading, time
import auditq
writer = auditq.AuditWriter(
    {table.dsn!r}, schema={table.schema!r}, table={table.name!r},
    batch_size=5000, flush_interval=60, shutdown_timeout=30,
)
"""


def test_exit_drain_without_close(table: Table) -> None:
    script = (
        _script_header(table)
        + """
for i in range(1000):
    assert writer.log("exit.drain", resource_id=str(i))
# no close(), no flush(): the atexit hook must drain
"""
    )
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    assert table.count() == 1000
    assert table.distinct_ids() == 1000


def test_exit_drain_entries_from_non_daemon_thread(table: Table) -> None:
    # threading joins non-daemon threads before atexit runs; entries they log at the very
    # end must still be written, whether or not the writer thread is already running.
    script = (
        _script_header(table)
        + """
assert writer.log("exit.main")
def late():
    time.sleep(0.5)
    for i in range(500):
        assert writer.log("exit.late", resource_id=str(i))
threading.Thread(target=late, daemon=False).start()
"""
    )
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    assert dict(table.query("SELECT action, count(*) FROM {table} GROUP BY action")) == {
        "exit.main": 1,
        "exit.late": 500,
    }


def test_exit_drain_module_level(table: Table) -> None:
    script = f"""
import auditq
auditq.configure({table.dsn!r}, schema={table.schema!r}, table={table.name!r},
                 flush_interval=60)
for i in range(300):
    assert auditq.log("exit.module", resource_id=str(i))
"""
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    assert table.count() == 300


# -- fork ------------------------------------------------------------------------------

PARENT_N = 300
CHILD_M = 200


def _child_body(writer: AuditWriter) -> int:
    """Runs in the forked child; returns the exit status."""
    stats = writer.stats()
    if stats.accepted or stats.pending:
        return 3  # the parent's queue leaked into the child
    for i in range(CHILD_M):
        if not writer.log("fork.child", resource_id=str(i)):
            return 4
    if not writer.close(timeout=20):
        return 5
    stats = writer.stats()
    if (stats.written, stats.pending, stats.dead_lettered) != (CHILD_M, 0, 0):
        return 6
    return 0


def _wait_child(pid: int, timeout: float = 60.0) -> int:
    """The child's exit code; a child that hangs is killed and fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child did not finish within {timeout}s")


def _check_fork_rows(table: Table) -> None:
    counts = dict(table.query("SELECT action, count(*) FROM {table} GROUP BY action"))
    assert counts == {"fork.warmup": 1, "fork.parent": PARENT_N, "fork.child": CHILD_M}
    assert table.distinct_ids() == table.count() == 1 + PARENT_N + CHILD_M
    (child_rows,) = table.query(
        "SELECT count(DISTINCT resource_id) FROM {table} WHERE action = 'fork.child'"
    )[0]
    assert child_rows == CHILD_M


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fork_child_writes_once_parent_not_duplicated(
    table: Table, make_writer: WriterFactory
) -> None:
    writer = make_writer(batch_size=10_000, flush_interval=60)
    # Connected and with a running thread before the fork: the dangerous case.
    assert writer.log("fork.warmup")
    assert writer.flush(timeout=30)
    for i in range(PARENT_N):
        assert writer.log("fork.parent", resource_id=str(i))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = _child_body(writer)
        finally:
            os._exit(code)
    assert _wait_child(pid) == 0
    assert writer.flush(timeout=30)
    assert writer.close(timeout=30)
    _check_fork_rows(table)
    stats = writer.stats()
    assert (stats.written, stats.pending) == (1 + PARENT_N, 0)


def test_fork_without_python_hooks_uses_pid_check(table: Table) -> None:
    # libc's fork() called directly (as uWSGI may): Python's at-fork hooks do not run, so
    # only the pid check on the caller's path can give the child a fresh writer. PyDLL keeps
    # the GIL across the call, so the child resumes Python code.
    #
    # CPython does not reinitialise its own runtime either (the GIL's condition variable
    # included): a thread that was waiting for the GIL at the instant of the fork leaves
    # state behind that can deadlock the child once it runs two threads. So this runs in a
    # fresh interpreter whose only other threads are the writer's, and forks only after they
    # have been idle (parked on their own events, not on the GIL) for a moment.
    script = f"""
import ctypes, os, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from tests.test_lifecycle import PARENT_N, _child_body
from auditq import AuditWriter

writer = AuditWriter({table.dsn!r}, schema={table.schema!r}, table={table.name!r},
                     batch_size=10_000, flush_interval=60)
assert writer.log("fork.warmup")
assert writer.flush(timeout=30)
for i in range(PARENT_N):
    assert writer.log("fork.parent", resource_id=str(i))
time.sleep(0.5)
libc_fork = ctypes.PyDLL(None).fork
libc_fork.restype = ctypes.c_int
libc_fork.argtypes = []
pid = libc_fork()
if pid == 0:
    code = 1
    try:
        code = _child_body(writer)
    finally:
        os._exit(code)
deadline = time.monotonic() + 40
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    sys.exit("child hung")
code = os.waitstatus_to_exitcode(status)
if code:
    sys.exit(f"child exited with {{code}}")
assert writer.flush(timeout=30)
assert writer.close(timeout=30)
stats = writer.stats()
assert (stats.written, stats.pending) == (1 + PARENT_N, 0), stats
"""
    result = run_python(script, timeout=90)
    assert result.returncode == 0, result.stderr
    _check_fork_rows(table)


def test_writer_in_child_after_close_in_parent_is_still_closed(make_writer: WriterFactory) -> None:
    writer = make_writer()
    writer.close(timeout=5)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0 if writer.log("child") is False and writer.closed else 1)
    assert _wait_child(pid) == 0


class _NoText:
    def __repr__(self) -> str:
        raise LookupError("no text")


def test_dead_letter_callback_may_call_flush(table: Table, make_writer: WriterFactory) -> None:
    # flush() from the writer thread (inside the callback) must not deadlock.
    results: list[bool] = []
    writer: AuditWriter

    def handler(letter: DeadLetter) -> None:
        results.append(writer.flush(timeout=1))

    writer = make_writer(flush_interval=60, on_dead_letter=handler)
    assert writer.log("ok")
    assert writer.log("bad", id=_NoText())  # content is repaired; a raising value is not
    assert writer.flush(timeout=30)
    assert results == [False]
    assert table.count() == 1
    assert wait_until(lambda: writer.stats().dead_lettered == 1, timeout=5)
