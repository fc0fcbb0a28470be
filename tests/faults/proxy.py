"""A small threaded TCP proxy that stands between a writer and PostgreSQL and misbehaves on cue.

It accepts TCP on 127.0.0.1 and forwards each connection to the server, over TCP or over
the server's unix socket (the embedded test servers listen only there). Faults:

* `cut_all()`: close every open connection now, both sides (a server restart or a network
  cut, as the client sees it);
* `refuse(True)`: also close each new connection as soon as it arrives (server down);
* `blackhole(True)`: stop forwarding in both directions but keep every socket open (a hung
  server or dropped packets: nothing fails, nothing answers);
* `cut_on(pattern, forward=...)`: when bytes the client sends contain `pattern`, cut that
  connection. With `forward=False` the bytes never reach the server; with `forward=True`
  they do, the server's reply is read and thrown away, and only the client is cut: for a
  COMMIT this is the commit-outcome-unknown case (committed, but the client cannot know).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from psycopg.conninfo import conninfo_to_dict, make_conninfo

#: A simple-protocol Query message carrying exactly "COMMIT" (what psycopg sends at the end
#: of a `with conn.transaction()` block).
COMMIT_MESSAGE: Final = b"Q\x00\x00\x00\x0bCOMMIT\x00"
#: The end of a binary COPY: the trailer's CopyData message, then CopyDone. The writer's own
#: connection runs in autocommit, where this is the commit.
COPY_DONE_MESSAGE: Final = b"d\x00\x00\x00\x06\xff\xffc\x00\x00\x00\x04"
#: The signature that opens a binary COPY stream: seeing it means a COPY is under way.
COPY_SIGNATURE: Final = b"PGCOPY\n\xff\r\n\x00"
#: ReadyForQuery with its length: the end of the server's answer to a query.
READY_FOR_QUERY: Final = b"Z\x00\x00\x00\x05"

_CHUNK: Final = 65536
_POLL: Final = 0.05


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's socket and the server's."""

    client: socket.socket
    server: socket.socket
    # Set once the link is being torn down, so both pumps stop.
    closed: threading.Event = field(default_factory=threading.Event)
    # True after a forward-and-cut: the server's reply is drained and dropped.
    swallow: bool = False

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.server):
            _shut(sock)

    def cut_client(self) -> None:
        """Cut the client only: the server side stays up until its reply has been drained."""
        self.swallow = True
        _shut(self.client)


@dataclass
class _Trigger:
    pattern: bytes
    forward: bool
    remaining: int


class Proxy:
    """A fault-injecting TCP proxy in front of the server that `dsn` names."""

    def __init__(self, dsn: str) -> None:
        params = conninfo_to_dict(dsn)
        host = str(params.get("host") or "localhost")
        port = int(params.get("port") or 5432)
        self._base = params
        self._family: int
        self._address: str | tuple[str, int]
        if host.startswith("/"):
            self._family = socket.AF_UNIX
            self._address = f"{host}/.s.PGSQL.{port}"
        else:
            self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._address = (str(params.get("hostaddr") or host), port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._triggers: list[_Trigger] = []
        # Cleared while blackholed: pumps wait on it before each read.
        self._flowing = threading.Event()
        self._flowing.set()
        self._refusing = False
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Connections accepted, and how many cuts each fault made (for the tests' asserts).
        self.accepted = 0
        self.cuts = 0
        self.triggered = 0

    @property
    def dsn(self) -> str:
        """The server's DSN, pointed at this proxy."""
        params = {k: v for k, v in self._base.items() if k not in ("host", "hostaddr", "port")}
        return make_conninfo("", **params, host="127.0.0.1", port=str(self.port))

    # -- faults ----------------------------------------------------------------------------

    def cut_all(self) -> int:
        """Close every open connection, both sides; returns how many."""
        with self._lock:
            links = list(self._links)
            self._links.clear()
            self.cuts += len(links)
        for link in links:
            link.close()
        return len(links)

    def refuse(self, on: bool) -> None:
        """While on, every connection is cut at once (and open ones are cut now)."""
        self._refusing = on
        if on:
            self.cut_all()

    def blackhole(self, on: bool) -> None:
        """While on, nothing is forwarded either way; sockets stay open."""
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    def cut_on(self, pattern: bytes, *, forward: bool, times: int = 1) -> None:
        """Cut the connection whose client sends `pattern`, `times` times (see module doc)."""
        with self._lock:
            self._triggers.append(_Trigger(pattern, forward, times))

    @property
    def open_links(self) -> int:
        with self._lock:
            return len(self._links)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Proxy:
        self._spawn(self._accept_loop, "proxy-accept")
        return self

    def close(self) -> None:
        self._stopped.set()
        self._flowing.set()
        _shut(self._listener)
        self.cut_all()
        for thread in list(self._threads):
            thread.join(timeout=2)

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the pumps -------------------------------------------------------------------------

    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        self._listener.settimeout(_POLL)
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self._refusing:
                _shut(client)
                continue
            server = socket.socket(self._family, socket.SOCK_STREAM)
            try:
                server.settimeout(5)
                server.connect(self._address)
            except OSError:
                _shut(client)
                _shut(server)
                continue
            for sock in (client, server):
                sock.settimeout(_POLL)
            link = _Link(client, server)
            with self._lock:
                self._links.add(link)
            self._spawn(self._pump, "proxy-up", link, True)
            self._spawn(self._pump, "proxy-down", link, False)

    def _pump(self, link: _Link, upstream: bool) -> None:
        source, target = (link.client, link.server) if upstream else (link.server, link.client)
        try:
            while not link.closed.is_set():
                if not self._flowing.wait(_POLL):
                    continue
                if link.swallow and upstream:
                    return  # the client is gone; the down pump drains and closes
                try:
                    data = source.recv(_CHUNK)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                if upstream:
                    trigger = self._match(data)
                    if trigger is not None:
                        self.triggered += 1
                        if trigger.forward:
                            target.sendall(data)
                            link.cut_client()
                            continue
                        break
                    target.sendall(data)
                elif link.swallow:
                    if READY_FOR_QUERY in data:
                        break
                else:
                    target.sendall(data)
        except OSError:
            pass
        finally:
            if not (upstream and link.swallow and not link.closed.is_set()):
                self._drop(link)

    def _match(self, data: bytes) -> _Trigger | None:
        with self._lock:
            for trigger in self._triggers:
                if trigger.remaining > 0 and trigger.pattern in data:
                    trigger.remaining -= 1
                    return trigger
        return None

    def _drop(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)
        link.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


@contextlib.contextmanager
def proxy_for(dsn: str) -> Iterator[Proxy]:
    """A started proxy in front of `dsn`'s server, closed on exit."""
    proxy = Proxy(dsn)
    with proxy:
        yield proxy
