"""auditq.signals in fresh interpreters: the drain at SIGTERM/SIGINT and the chaining."""

from __future__ import annotations

import signal

from .conftest import Table
from .helpers import run_python

PRELUDE = """
import os, signal, sys, threading
import auditq, auditq.signals
writer = auditq.configure({dsn!r}, schema={schema!r}, table={table!r}, flush_interval=300)
"""


def _script(table: Table, body: str) -> str:
    return PRELUDE.format(dsn=table.dsn, schema=table.schema, table=table.name) + body


def test_default_action_drains_then_dies_by_the_signal(table: Table) -> None:
    done = run_python(
        _script(
            table,
            """
assert auditq.signals.install_exit_handlers(5.0)
for n in range(50):
    auditq.log("sig.test", resource_id=str(n))
os.kill(os.getpid(), signal.SIGTERM)
threading.Event().wait(10)
print("not reached")
""",
        )
    )
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert "not reached" not in done.stdout
    assert table.count() == 50


def test_python_handler_is_chained_after_a_flush(table: Table) -> None:
    done = run_python(
        _script(
            table,
            """
seen = []
def previous(signum, frame):
    seen.append((signum, writer.stats().written, auditq.signals.stopping()))
signal.signal(signal.SIGTERM, previous)
assert auditq.signals.install_exit_handlers(5.0)
for n in range(30):
    auditq.log("sig.test", resource_id=str(n))
os.kill(os.getpid(), signal.SIGTERM)
print(seen)
assert auditq.log("sig.after")  # still open: the server's graceful stop may log more
print(auditq.signals.drain_if_stopping(5.0), writer.stats().written)
""",
        )
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"[({int(signal.SIGTERM)}, 30, True)]"
    assert lines[1] == "True 31"
    assert table.count() == 31


def test_sigint_keyboard_interrupt_still_raised(table: Table) -> None:
    done = run_python(
        _script(
            table,
            """
auditq.signals.install_exit_handlers(5.0)
auditq.log("sig.test")
try:
    os.kill(os.getpid(), signal.SIGINT)
    threading.Event().wait(10)
except KeyboardInterrupt:
    print("interrupted", writer.stats().written)
""",
        )
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "interrupted 1"


def test_ignored_signals_left_alone_idempotent_and_restorable(table: Table) -> None:
    done = run_python(
        _script(
            table,
            """
signal.signal(signal.SIGINT, signal.SIG_IGN)
before = signal.getsignal(signal.SIGTERM)
assert auditq.signals.install_exit_handlers()
assert auditq.signals.install_exit_handlers()
assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
mine = signal.getsignal(signal.SIGTERM)
assert mine is not before and auditq.signals.installed()
result = []
t = threading.Thread(target=lambda: result.append(auditq.signals.install_exit_handlers()))
t.start(); t.join()
assert result == [False]  # not the main thread
auditq.signals.uninstall_exit_handlers()
assert signal.getsignal(signal.SIGTERM) is before
assert not auditq.signals.installed()
print("ok")
""",
        )
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_other_threads_cannot_install(table: Table) -> None:
    done = run_python(
        _script(
            table,
            """
result = []
t = threading.Thread(target=lambda: result.append(auditq.signals.install_exit_handlers()))
t.start(); t.join()
print(result, auditq.signals.installed(), signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
""",
        )
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[False] False True"


def test_forked_child_installs_again_over_what_its_server_set(table: Table) -> None:
    done = run_python(
        _script(
            table,
            """
auditq.signals.install_exit_handlers(5.0)
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what a pre-fork worker does
    auditq.log("sig.child")
    auditq.signals.ensure_installed()  # the first request in the worker
    os.kill(os.getpid(), signal.SIGTERM)
    threading.Event().wait(10)
    os._exit(3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
""",
        )
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(-signal.SIGTERM)
    assert table.query("SELECT action FROM {table}") == [("sig.child",)]
