"""Where the writer gets its connection: its own (from a DSN) or one borrowed from a pool."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Final, Protocol

import psycopg
from psycopg_pool import ConnectionPool

from .dsn import Dsn, resolve_dsn

logger = logging.getLogger("auditq")

Connection = psycopg.Connection[Any]

# A forked child must never close a connection it inherited: libpq would send a Terminate
# message down the socket the parent is still using. Such connections are parked here for
# the life of the child instead (psycopg/psycopg#395).
_inherited_connections: list[Connection] = []


#: The kernel send buffer the writer asks for on its connection (capped by the kernel:
#: `net.core.wmem_max` on Linux).
SEND_BUFFER_BYTES: Final = 4 * 1024 * 1024


def widen_send_buffer(fd: int, size: int = SEND_BUFFER_BYTES) -> None:
    """Ask for a `size` send buffer on socket `fd` (best effort: any refusal is ignored).

    Why: psycopg hands COPY data to the socket from the writer thread, which needs the GIL
    each time the socket has room again; when callers keep the GIL busy it gets it back
    only every switch interval (5 ms). With the default ~200 KiB buffer the server runs dry
    within each wait; with a few MiB it does not. Done once per connection the writer
    opens; a pool's connections are the application's and are left as they are.
    """
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except OSError:
        pass
    finally:
        sock.close()  # closes the duplicate only


def session_timeouts(write_timeout: float) -> dict[str, int]:
    """The server-side timeouts (milliseconds) the writer sets on its own sessions.

    Why: a role's low `statement_timeout` (common for application roles on managed
    platforms) cancels every large COPY, and the same batch retried meets the same fate. The
    writer bounds its own statements by `write_timeout` instead, a little below it so the
    server's cancel (which keeps the connection, and makes the sink shrink the batch) comes
    before the watchdog's cut; a lock wait, which no batch size helps, fails sooner
    (`lock_timeout`). The writer's own connection idles between batches by design,
    so a role's `idle_session_timeout` must not close it (0 turns it off)."""
    bound = max(1, int(write_timeout * 1000 * 0.9))
    return {
        "statement_timeout": bound,
        "idle_in_transaction_session_timeout": bound,
        # A wait for a lock (DDL on the table) fails first, as a transient error retried
        # with backoff, instead of as a cancel that would shrink the batches for nothing.
        "lock_timeout": max(1, bound // 2),
        "idle_session_timeout": 0,
    }


def session_options(write_timeout: float) -> str:
    """`session_timeouts` as libpq `options` (applied at connection start, over the role's
    defaults)."""
    return " ".join(f"-c {name}={value}" for name, value in session_timeouts(write_timeout).items())


def system_identifier(conn: Connection) -> str | None:
    """The database system's identifier (`pg_control_system()`), which names the cluster
    whatever host name reaches it: spool segments record it (`Spool.identify`). None when
    the server will not say; the connection is left as it was (no transaction open)."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT system_identifier::text FROM pg_control_system()")
            row = cur.fetchone()
        if not conn.autocommit:
            conn.rollback()
    except psycopg.Error:
        if not conn.closed and not conn.autocommit:
            conn.rollback()
        return None
    return None if row is None else str(row[0])


#: What PgBouncer answers a startup packet carrying `options` it was not told to ignore.
_STARTUP_OPTIONS_REFUSED: Final = "unsupported startup parameter"


class ConnectionSource(Protocol):
    """What the sink needs: a connection per attempt and a way to give it back."""

    #: True when the sink must set `session_timeouts` in each transaction itself (borrowed
    #: connections, whose session settings are the application's).
    per_transaction_timeouts: bool

    def bound_session(self, write_timeout: float) -> None: ...
    def warm_up(self) -> None: ...
    def acquire(self) -> Connection: ...
    def release(self, conn: Connection, *, broken: bool) -> None: ...
    def close(self) -> None: ...
    def forget_after_fork(self) -> None: ...


class DsnSource:
    """One long-lived connection of the writer's own, reopened after any failure."""

    per_transaction_timeouts = False

    def __init__(self, dsn: Dsn) -> None:
        self._dsn = dsn
        # The DSN without the writer's startup options, while they may still be refused.
        self._plain: Dsn | None = None
        self._conn: Connection | None = None

    def bound_session(self, write_timeout: float) -> None:
        """Open every later connection with the writer's `session_timeouts`."""
        self._plain = self._dsn
        self._dsn = self._dsn.with_options(session_options(write_timeout))

    def _connect(self) -> Connection:
        try:
            # Autocommit: each COPY is one transaction by itself (see Sink._copy_chunks).
            return psycopg.connect(self._dsn.secret_value, autocommit=True)
        except psycopg.Error as exc:
            plain = self._plain
            if plain is None or _STARTUP_OPTIONS_REFUSED not in str(exc):
                raise
        # A connection pooler (PgBouncer) that refuses startup options: without them, the
        # role's timeouts apply and the sink's shrinking of cancelled batches is what is
        # left. Not SET instead: behind transaction pooling a SET would change whichever
        # server session runs it, other clients' included.
        logger.warning(
            "the server refused the writer's session settings (%s): a connection pooler? "
            "The role's statement_timeout applies; set `ignore_startup_parameters = "
            "options` in PgBouncer to let the writer bound its own statements",
            _STARTUP_OPTIONS_REFUSED,
        )
        self._dsn, self._plain = plain, None
        return psycopg.connect(self._dsn.secret_value, autocommit=True)

    def warm_up(self) -> None:
        """Open the connection before the first batch is due (best effort: a failure here
        is met again, and reported, by the first write)."""
        try:
            self.acquire()
        except Exception:  # noqa: S110 - the first batch retries and reports it
            pass

    def acquire(self) -> Connection:
        conn = self._conn
        if conn is None or conn.closed:
            try:
                conn = self._connect()
            except psycopg.Error as exc:
                # libpq quotes malformed conninfo strings verbatim: scrub before it travels.
                raise type(exc)(self._dsn.scrub(str(exc))) from None
            widen_send_buffer(conn.pgconn.socket)
            self._conn = conn
        return conn

    def release(self, conn: Connection, *, broken: bool) -> None:
        if broken:
            self._conn = None
            try:
                conn.close()
            except Exception:  # noqa: S110 - closing a dead connection may fail; it is gone
                pass

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: S110
                pass

    def forget_after_fork(self) -> None:
        if self._conn is not None:
            _inherited_connections.append(self._conn)
        self._conn = None

    def __repr__(self) -> str:
        return f"DsnSource({str(self._dsn)!r})"


class PoolSource:
    """Connections borrowed per batch from the caller's `psycopg_pool.ConnectionPool`.

    The pool is the caller's: auditq never closes it, and after a fork the caller must make a
    new one in the child (psycopg pools cannot cross a fork).
    """

    #: A pool's sessions are the application's: the sink sets its timeouts per transaction
    #: (`SET LOCAL`), so they end with it.
    per_transaction_timeouts = True

    def bound_session(self, write_timeout: float) -> None:
        """Nothing here: see `per_transaction_timeouts`."""

    def __init__(self, pool: ConnectionPool[Any], timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    def warm_up(self) -> None:
        """Nothing: the pool's connections are the application's, opened by its pool."""

    def acquire(self) -> Connection:
        conn: Connection = self._pool.getconn(timeout=self._timeout)
        return conn

    def release(self, conn: Connection, *, broken: bool) -> None:
        if broken:
            try:
                conn.close()
            except Exception:  # noqa: S110
                pass
        self._pool.putconn(conn)

    def close(self) -> None:
        pass

    def forget_after_fork(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"PoolSource({self._pool.name!r})"


def pool_conninfo(pool: ConnectionPool[Any] | None) -> str | None:
    info = None if pool is None else pool.conninfo
    return info if isinstance(info, str) else None  # a callable conninfo: the pool's own


def resolve_target(
    dsn_or_pool: str | Dsn | ConnectionPool[Any] | None,
    dsn: str | Dsn | None,
    pool: ConnectionPool[Any] | None,
    connect_timeout: float,
) -> tuple[Dsn | None, ConnectionPool[Any] | None]:
    """A writer's database: a DSN (given, or from the environment: `resolve_dsn` names
    where a bad one came from), with the writer's libpq defaults, or a pool."""
    given = [value for value in (dsn_or_pool, dsn, pool) if value is not None]
    if len(given) > 1:
        raise TypeError("give one of: a positional DSN or pool, dsn=..., pool=...")
    target = given[0] if given else None
    if isinstance(target, ConnectionPool):
        return None, target
    if pool is not None:
        raise TypeError(f"pool must be a psycopg_pool.ConnectionPool, got {type(pool).__name__}")
    resolved = target if isinstance(target, Dsn) else resolve_dsn(target)
    return resolved.with_defaults(
        connect_timeout=max(2, round(connect_timeout)),
        application_name="auditq",
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
    ), None
