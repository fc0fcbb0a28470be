"""Opt-in SIGTERM/SIGINT/SIGQUIT handlers that drain auditq before the process goes away.

Why: some servers end a process by the signal itself. uvicorn, for one, catches SIGTERM, shuts
down gracefully, restores the handler it found and re-raises the signal; when that handler is
the default one the process dies by the signal and `atexit` (auditq's exit drain) never runs.
An ASGI app without a lifespan (Django's) has no other moment to flush.

`install_exit_handlers()` installs, from the main thread only, a handler that:

- when the handler it replaced is the default (`SIG_DFL`): closes the default writer and every
  live writer within the timeout, restores `SIG_DFL` and re-raises the signal, so the process
  still ends the way it would have, only with its entries written;
- when the handler it replaced is a Python callable (a server's graceful shutdown, or Python's
  own `KeyboardInterrupt` for SIGINT): flushes every writer within the timeout, marks the
  process as stopping (`stopping()`), and calls that handler. Writers stay open, because the
  server's graceful shutdown still finishes requests that log; integrations call
  `drain_if_stopping()` after each response so those entries are flushed before the server
  re-raises the signal, and a small thread keeps flushing until the process ends;
- never installs over a signal that is ignored (`SIG_IGN`) or handled outside Python (uWSGI's
  own handlers, seen as None), because it could not hand the signal back.

Under uWSGI (where `import uwsgi` succeeds) it also chains a hook to `uwsgi.atexit`, which
uWSGI calls in a worker that ends while idle, before it tears the interpreter down (and even
when `--skip-atexit-teardown` means Python's own `atexit` never runs). uWSGI calls neither hook
in a worker that a brutal stop (`--die-on-term` SIGTERM, SIGINT, SIGQUIT) ends in the middle of
a request: running Python there would be unsafe, so what that worker queued is lost; the
graceful stop documented in docs/frameworks.md avoids it.

It is a global side effect of the process, so auditq never installs it on its own: the
application calls it (the FastAPI, Starlette and Flask setups in docs/ do), or installs an
integration that says in its docs that it does (the Django app, `auditq.contrib.django`).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from . import default

if TYPE_CHECKING:
    from .writer import AuditWriter

__all__ = [
    "adrain_if_stopping",
    "configured_timeout",
    "drain_if_stopping",
    "ensure_installed",
    "install_exit_handlers",
    "installed",
    "stopping",
    "uninstall_exit_handlers",
    "watch",
]

logger = logging.getLogger("auditq")

#: SIGQUIT too: gunicorn's quick stop (its SIGINT) sends it to workers, and uvicorn's
#: gunicorn worker leaves it at the default action, which ends the process on the spot.
SIGNALS: Final = ("SIGTERM", "SIGINT", "SIGQUIT")
#: The writer's default `shutdown_timeout`, used when no writer says otherwise.
DEFAULT_TIMEOUT: Final = 10.0
#: Extra wait for the drain thread beyond its budget (a writer's close keeps a margin too).
JOIN_MARGIN_SECONDS: Final = 1.0
#: How often the after-signal thread flushes while a server shuts down gracefully.
FOLLOW_UP_SECONDS: Final = 0.05

Handler = Callable[[int, FrameType | None], Any] | int | None

_lock = threading.Lock()
_previous: dict[int, Handler] = {}  # signal number -> the handler ours replaced
_pid = 0  # the process that installed them: a forked child starts over
_checked_pid = 0  # the process where ensure_installed() last looked
_timeout: float | None = None
_stopping = threading.Event()
_follow_up: threading.Thread | None = None
_watched: weakref.WeakSet[AuditWriter] = weakref.WeakSet()
_UNSET: Final = object()
_uwsgi_previous: object = _UNSET  # what `uwsgi.atexit` held before ours; _UNSET: not chained


def watch(writer: AuditWriter) -> AuditWriter:
    """Also drain `writer` (one you built yourself) at a signal; returns it."""
    _watched.add(writer)
    return writer


def installed() -> bool:
    """True when auditq's handlers are installed in this process."""
    return bool(_previous) and _pid == os.getpid()


def configured_timeout() -> float | None:
    """The timeout given to the last `install_exit_handlers()` call."""
    return _timeout


def stopping() -> bool:
    """True once a signal reached auditq's handler and a graceful shutdown is under way."""
    return _stopping.is_set()


def install_exit_handlers(timeout: float | None = None) -> bool:
    """Install the SIGTERM/SIGINT/SIGQUIT handlers (see the module docstring); True when at
    least one is installed (now or before). Idempotent; False where signals cannot be
    installed (not the main thread, no such signal, or every signal ignored or owned by
    non-Python code). In a forked child (a pre-fork server's worker, whose server resets
    the handlers) a call installs them afresh over whatever the worker has now.

    Under uWSGI it also chains auditq's drain to `uwsgi.atexit` (from any thread), and
    returns True for that alone.

    `timeout` bounds the whole drain; None uses each writer's `shutdown_timeout`."""
    global _timeout, _pid
    hooked = _chain_uwsgi_atexit()
    if threading.current_thread() is not threading.main_thread():
        return hooked
    with _lock:
        _timeout = timeout
        if _pid != os.getpid():
            _previous.clear()
            _stopping.clear()
            _pid = os.getpid()
        if not _previous:
            _install_missing()
        return bool(_previous) or hooked


def ensure_installed() -> bool:
    """For integrations, on each request: once per process, after the server has set up its
    own handlers, install auditq's again where something replaced them (a pre-fork worker
    resetting them after the fork, an event loop's `add_signal_handler`), chaining to the
    replacement. Only where `install_exit_handlers()` ran in this process or an ancestor;
    a pid comparison when there is nothing to do."""
    global _checked_pid
    if _checked_pid == os.getpid() or _pid == 0:
        return installed()
    if threading.current_thread() is not threading.main_thread():
        return installed()  # a worker thread: try again on a request in the main thread
    _checked_pid = os.getpid()
    if _pid != os.getpid():
        return install_exit_handlers(_timeout)
    with _lock:
        _install_missing()
    return installed()


def _install_missing() -> None:
    for name in SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            current = signal.getsignal(signum)
            if current is None or current == signal.SIG_IGN or current is _handle:
                continue  # handled outside Python, deliberately ignored, or ours already
            signal.signal(signum, _handle)
        except (ValueError, OSError, RuntimeError):  # not allowed here (embedded, WASI)
            continue
        _previous[int(signum)] = current


def uninstall_exit_handlers() -> None:
    """Put back the handlers ours replaced, where ours is still the one installed."""
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        for signum, previous in list(_previous.items()):
            try:
                if signal.getsignal(signum) is _handle:
                    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            except (ValueError, OSError, RuntimeError):
                pass
            del _previous[signum]
        _stopping.clear()
    _unchain_uwsgi_atexit()


def _uwsgi_module() -> Any:
    """uWSGI's embedded module, or None outside uWSGI (it exists only inside its processes)."""
    try:
        return importlib.import_module("uwsgi")
    except ImportError:
        return None


def _chain_uwsgi_atexit() -> bool:
    """Make `uwsgi.atexit` drain auditq, then call what it held before; True when in place.
    Set once, before the fork when the app loads in the master, so every worker inherits it."""
    global _uwsgi_previous
    module = _uwsgi_module()
    if module is None:
        return False
    with _lock:
        current = getattr(module, "atexit", None)
        if current is not _uwsgi_atexit:
            _uwsgi_previous = current
            module.atexit = _uwsgi_atexit
    return True


def _unchain_uwsgi_atexit() -> None:
    global _uwsgi_previous
    module = _uwsgi_module()
    with _lock:
        if module is not None and getattr(module, "atexit", None) is _uwsgi_atexit:
            if _uwsgi_previous is None or _uwsgi_previous is _UNSET:
                del module.atexit
            else:
                module.atexit = _uwsgi_previous
        _uwsgi_previous = _UNSET


def _uwsgi_atexit() -> None:
    """uWSGI's exit hook: close every writer of this process within the timeout (in a helper
    thread, bounded, as at a signal), then the hook that was there before."""
    try:
        _off_main_thread(_close_all, _budget(_timeout))
    except Exception:  # uWSGI prints and ignores it; say what failed instead
        logger.exception("auditq exit drain under uWSGI failed")
    previous = _uwsgi_previous
    if callable(previous):
        previous()


def drain_if_stopping(timeout: float | None = None) -> bool:
    """Flush every writer when a stop signal has been received (for integrations, after
    each response); True when there was nothing to do or everything was flushed."""
    if not _stopping.is_set():
        return True
    return _flush_all(_budget(timeout))


async def adrain_if_stopping(timeout: float | None = None) -> bool:
    """`drain_if_stopping` for async code: the flush runs in a thread, off the event loop."""
    if not _stopping.is_set():
        return True
    return await asyncio.to_thread(_flush_all, _budget(timeout))


def _handle(signum: int, frame: FrameType | None) -> None:
    previous = _previous.get(signum, signal.SIG_DFL)
    try:
        if previous == signal.SIG_DFL or previous is None:
            _off_main_thread(_close_all, _budget(_timeout))
            try:
                signal.signal(signum, signal.SIG_DFL)
            finally:
                _previous.pop(signum, None)
            signal.raise_signal(signum)  # end as the signal would have ended us
            return
        _stopping.set()
        _off_main_thread(_flush_all, _budget(_timeout))
        if previous is not signal.default_int_handler:
            # KeyboardInterrupt unwinds the program normally, and atexit drains after it;
            # a server's graceful shutdown may end by the signal instead.
            _start_follow_up()
    except Exception:  # a handler must not turn a stop into a crash with a traceback
        logger.exception("auditq exit drain failed")
    if callable(previous):
        previous(signum, frame)


def _off_main_thread(drain: Callable[[float], bool], budget: float) -> None:
    """Run `drain` in a helper thread and wait for it at most `budget` (and a margin): the
    signal may have interrupted the main thread while it held a writer's lock, and waiting
    for that lock on the main thread would never end."""
    helper = threading.Thread(target=drain, args=(budget,), name="auditq-exit", daemon=True)
    helper.start()
    helper.join(budget + JOIN_MARGIN_SECONDS)


def _budget(timeout: float | None) -> float:
    if timeout is not None:
        return max(0.0, timeout)
    return max((w.shutdown_timeout for w in _writers()), default=DEFAULT_TIMEOUT)


def _writers() -> list[AuditWriter]:
    """Every writer the writer module reports live (when it offers `live_writers()`) and the
    ones passed to `watch()`, each once. The default writer is reached through the public
    `auditq.flush()` / `auditq.shutdown()`."""
    found: list[AuditWriter] = []
    from . import writer as writer_module

    candidates: list[Iterable[AuditWriter]] = []
    live = getattr(writer_module, "live_writers", None)
    if callable(live):
        candidates.append(live())
    candidates.append(list(_watched))
    for group in candidates:
        for item in group:
            if item not in found and not item.closed:
                found.append(item)
    return found


def _flush_all(budget: float) -> bool:
    deadline = time.monotonic() + budget
    clean = default.flush(budget)
    for writer in _writers():
        clean = writer.flush(max(0.0, deadline - time.monotonic())) and clean
    return clean


def _close_all(budget: float) -> bool:
    deadline = time.monotonic() + budget
    clean = default.shutdown(budget)
    for writer in _writers():
        clean = writer.close(max(0.0, deadline - time.monotonic())) and clean
    return clean


def _start_follow_up() -> None:
    """Keep flushing while the server finishes its requests: a server that re-raises the
    signal with the default handler ends the process without warning."""
    global _follow_up
    if _follow_up is not None and _follow_up.is_alive():
        return

    def run() -> None:
        while True:
            try:
                _flush_all(_budget(_timeout))
            except Exception:
                logger.exception("auditq flush after a stop signal failed")
            time.sleep(FOLLOW_UP_SECONDS)

    _follow_up = threading.Thread(target=run, name="auditq-stopping", daemon=True)
    _follow_up.start()
