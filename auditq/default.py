"""The module-level default writer: `auditq.configure()` once, then `auditq.log()` anywhere.

`write_audit_log` and `write_audit_logs` are the Python forms of the original TypeScript
service's `writeAuditLog()` / `writeAuditLogs()`: fire-and-forget, never raising for
database trouble.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

from psycopg_pool import ConnectionPool

from .config import dsn_from_env, environment, options_from_env
from .disabled import Recorder, disabled, disabled_writer
from .dsn import Dsn, resolve_dsn
from .entry import AuditEntry
from .writer import AuditWriter

logger = logging.getLogger("auditq")

P = ParamSpec("P")
R = TypeVar("R")

_writer: Recorder | None = None
_lock = threading.Lock()
_warned_unconfigured = False
# Set when the environment failed to configure a writer, so log() does not retry per call.
_env_failed = False


def configure(
    dsn_or_pool: str | Dsn | ConnectionPool[Any] | None = None,
    /,
    *,
    env_file: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Recorder:
    """Create the default writer (closing any previous one) and return it.

    Takes what `AuditWriter` takes (`dsn=...` or `pool=...` or a positional DSN, and its
    options). The DSN defaults to `AUDITQ_DSN`, then `DATABASE_URL`, and each option to
    `AUDITQ_<OPTION>`, read from the environment and from `env_file` (a `.env` file) when
    given; arguments given here win.
    """
    global _writer
    if disabled():
        return _install_disabled()
    env = environment(env_file)
    merged = {**options_from_env(env), **options}
    if dsn_or_pool is None and "dsn" not in options and "pool" not in options:
        dsn_or_pool = resolve_dsn(None, env)  # a bad one names its variable
    writer = AuditWriter(dsn_or_pool, **merged)
    with _lock:
        previous, _writer = _writer, writer
    if previous is not None:
        previous.close()
    return writer


def current_writer() -> Recorder | None:
    """The default writer if one is configured (never configures one)."""
    return _writer


def replace_writer(writer: Recorder | None) -> Recorder | None:
    """Make `writer` the default writer (None: none) and return the previous one, which is
    not closed (`auditq.testing.capture()` puts it back)."""
    global _writer
    with _lock:
        previous, _writer = _writer, writer
    return previous


def _install_disabled() -> Recorder:
    """`AUDITQ_DISABLED=1`: the default writer counts and discards (see disabled.py)."""
    global _writer
    stand_in = disabled_writer()
    with _lock:
        previous, _writer = _writer, stand_in
    if previous is not None and previous is not stand_in:
        previous.close()
    return stand_in


def get_writer() -> Recorder | None:
    """The default writer, configured from the environment on first use if possible."""
    global _writer, _warned_unconfigured, _env_failed
    writer = _writer
    if writer is not None:
        return writer
    if disabled():
        return _install_disabled()
    with _lock:
        problem = "not configured (call auditq.configure() or set AUDITQ_DSN)"
        if _writer is None and not _env_failed and dsn_from_env():
            try:
                _writer = AuditWriter(None, **options_from_env())
            except ValueError as exc:  # ConfigError naming the variable, or a bad option
                # log() must not raise; configure() is where a bad environment raises.
                problem = f"not configured: {exc}"
                _env_failed = True
        if _writer is None and not _warned_unconfigured:
            _warned_unconfigured = True
            logger.warning("%s; audit entries are being discarded", problem)
        return _writer


def _on_default_writer(
    method: Callable[Concatenate[AuditWriter, P], R], missing: R
) -> Callable[P, R]:
    """`method` called on the default writer (`missing` when there is none), with the
    method's own signature and help, so IDEs and mypy check the module-level call too."""
    name = method.__name__

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        writer = _writer or get_writer()
        if writer is None:
            return missing
        bound: Callable[P, R] = getattr(writer, name)  # the C caller path, for log()
        return bound(*args, **kwargs)

    signature = inspect.signature(method)
    call.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=list(signature.parameters.values())[1:]
    )
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"`AuditWriter.{name}` on the default writer ({missing!r} when none is " + (
        f"configured).\n\n{inspect.getdoc(method) or ''}"
    )
    return call


#: `AuditWriter.log` on the default writer; False when none is configured.
log = _on_default_writer(AuditWriter.log, False)


def write_audit_log(entry: AuditEntry | Mapping[str, Any]) -> bool:
    """Queue one entry (an `AuditEntry` or a mapping of its fields) on the default writer."""
    writer = _writer or get_writer()
    return False if writer is None else writer.write(entry)


def write_audit_logs(entries: Iterable[AuditEntry | Mapping[str, Any]]) -> int:
    """Queue many entries on the default writer; returns how many were accepted."""
    writer = _writer or get_writer()
    return 0 if writer is None else writer.write_many(entries)


def flush(timeout: float | None = None) -> bool:
    """Flush the default writer (True when there is nothing to wait for)."""
    writer = _writer
    return True if writer is None else writer.flush(timeout)


async def aflush(timeout: float | None = None) -> bool:
    """`flush()` for asyncio code: waits in a worker thread, never on the event loop."""
    writer = _writer
    return True if writer is None else await asyncio.to_thread(writer.flush, timeout)


async def ashutdown(timeout: float | None = None) -> bool:
    """`shutdown()` for asyncio code: waits in a worker thread, never on the event loop."""
    return await asyncio.to_thread(shutdown, timeout)


def shutdown(timeout: float | None = None) -> bool:
    """Close the default writer and forget it; a later `log()` configures a new one."""
    global _writer
    with _lock:
        writer, _writer = _writer, None
    return True if writer is None else writer.close(timeout)
