"""A COPY ... FROM STDIN sent through libpq from C with the GIL released (`_pqcopy.c`).

psycopg's `copy.write()` gives the GIL back at each piece and needs it again when the socket
drains; the COPY's start, its end and its result each need it too. Behind threads that keep
the GIL busy in Python, every one of those re-acquisitions waits up to the switch interval
while the server idles. Here the start, a whole group of pieces, the end of the data and the
results are each driven in one C call on psycopg's own connection, without the GIL.

Used only where it is sure to be right: the extension is built and on (not
`AUDITQ_NO_SPEEDUPS=1`), psycopg runs its C implementation (`psycopg[binary]` or
`psycopg[c]`), and exactly one matching libpq is loaded in the process (psycopg's own). Else
`copy()` returns False and the caller keeps psycopg's path. Errors come back as the psycopg
exceptions psycopg would raise for the same results (class by SQLSTATE, the same `diag`
fields), so the sink classifies them as before.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from typing import Any, Final

import psycopg
from psycopg import errors
from psycopg.pq.misc import strip_severity

from .native import speedups

#: Each piece is handed to libpq and sent as far as the socket takes it, with the GIL held
#: (nothing waits); a wait without the GIL comes only once HIGH_WATER bytes are unsent. (A
#: design that sent groups of pieces per C call with the GIL released throughout lost to
#: this one: benchmarks/README.md, "Issue 16, design 2".)
HIGH_WATER: Final = 1024 * 1024
_ABORT: Final = b"error from Python: the data could not be produced"
#: PG_DIAG_SQLSTATE (psycopg's DiagnosticField value).
_SQLSTATE: Final = ord("C")

#: Whether this path is used when it can be (benchmarks compare both in one process).
enabled = True
_bound: bool | None = None


def available() -> bool:
    """True when the C path can drive psycopg's connections in this process."""
    global _bound
    if not enabled or speedups is None:
        return False
    if _bound is None:
        _bound = _bind()
    return _bound


def _bind() -> bool:
    assert speedups is not None
    impl = psycopg.pq.__impl__
    if impl == "binary":
        spec = importlib.util.find_spec("psycopg_binary")
        if spec is None or spec.origin is None:
            return False
        # The wheel's bundled libraries sit next to the package (auditwheel's layout).
        libs = os.path.realpath(os.path.dirname(spec.origin) + ".libs")
        prefix = libs + os.sep
    elif impl == "c":
        prefix = ""  # linked against the system's libpq: the only one loaded
    else:
        return False  # pure Python: psycopg may have loaded any libpq through ctypes
    return speedups.pq_load(prefix) is not None


def copy(
    conn: psycopg.Connection[Any],
    query: bytes,
    pieces: Iterable[bytes],
    *,
    on_end: Callable[[], None] | None = None,
) -> None:
    """Run the COPY `query`, sending `pieces` (already a valid COPY stream), and read its
    result. `on_end()` is called once the end of the data has reached libpq, before any
    error from there on is raised (from then on the outcome of an autocommit COPY is
    unknown if the connection is lost). An exception from `pieces` aborts the COPY
    (psycopg's copy block does the same) and propagates."""
    assert speedups is not None
    # Not in psycopg's typed PGconn protocol, but on both C implementations' PGconn.
    ptr: int | None = getattr(conn.pgconn, "pgconn_ptr", None)
    if ptr is None:
        raise psycopg.OperationalError("the connection is closed")
    with conn.lock:
        _stream(conn, ptr, query, pieces, on_end)


def _stream(
    conn: psycopg.Connection[Any],
    ptr: int,
    query: bytes,
    pieces: Iterable[bytes],
    on_end: Callable[[], None] | None,
) -> None:
    """Start (one wait), then each piece handed over without waiting; a wait only once
    HIGH_WATER bytes are still unsent (the server has that much to work on meanwhile);
    then the end and the results (one wait)."""
    assert speedups is not None
    pq_copy, pq_put = speedups.pq_copy, speedups.pq_put
    _check(conn, pq_copy(ptr, query, (), False), None)
    unsent = 0
    # The last piece goes with the end of the data, in one send (as psycopg's exit sends
    # the trailer and CopyDone together).
    held: bytes | None = None
    try:
        for piece in pieces:
            if held is not None:
                size = len(held)
                pending, error = pq_put(ptr, held, unsent + size >= HIGH_WATER)
                if error is not None:
                    _check(conn, (False, False, error), None)
                unsent = unsent + size if pending else 0
            held = piece
    except psycopg.Error:
        raise
    except BaseException:
        pq_copy(ptr, None, (), _ABORT)  # the COPY is open: abort it, as psycopg's block does
        raise
    _check(conn, pq_copy(ptr, None, () if held is None else (held,), True), on_end)


def _check(
    conn: psycopg.Connection[Any],
    outcome: tuple[bool, bool, tuple[dict[int, bytes] | None, bytes, bool] | None],
    on_end: Callable[[], None] | None,
) -> None:
    _open, end_sent, error = outcome
    if end_sent and on_end is not None:
        on_end()
    if error is None:
        return
    fields, message, lost = error
    encoding = conn.info.encoding if not conn.closed else "utf-8"
    if lost and not conn.closed:
        # libpq may still be in COPY_IN (the data could not be flushed): finished here, the
        # connection reads as closed and is thrown away, never handed out again.
        conn.pgconn.finish()
    state = (fields or {}).get(_SQLSTATE)
    if fields is None or state is None:
        text = message.decode(encoding, "replace").strip()
        raise psycopg.OperationalError(text or "the connection was lost during COPY")
    code = state.decode("ascii", "replace")
    try:
        cls = errors.lookup(code)
    except KeyError:
        cls = errors.get_base_exception(code)
    # As psycopg words it: libpq's whole message (DETAIL and CONTEXT lines too), severity cut.
    text = strip_severity(message.decode(encoding, "replace")) or "no error details available"
    raise cls(text, info=dict(fields), encoding=encoding)
