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
  With `after=`, a trigger is armed only once another one has fired (a fault sequence);
* `cut_at(offset)`: cut the connection whose COPY stream (counted from its binary
  signature) reaches `offset` bytes: the bytes before it reach the server, none after;
* `throttle(rate)`: forward the client's bytes at most at `rate` bytes/s (a slow server or
  link: the writer's COPY data piles up in the kernel's buffers and libpq's).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
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
_SWALLOW_SECONDS: Final = 15.0
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
    swallow_until: float = 0.0
    # The client's last bytes, so a pattern split over two reads is still seen.
    tail: bytes = b""
    # Bytes of the current COPY stream forwarded so far (None before a COPY's signature).
    copy_pos: int | None = None

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.server):
            _shut(sock)

    def cut_client(self) -> None:
        """Cut the client only: the server side stays up until its reply has been drained
        (or for _SWALLOW_SECONDS: a server that never answers must not hold it forever)."""
        self.swallow_until = time.monotonic() + _SWALLOW_SECONDS
        self.swallow = True
        _shut(self.client)


@dataclass(eq=False)
class _Trigger:
    pattern: bytes
    forward: bool
    remaining: int
    after: _Trigger | None = None

    @property
    def armed(self) -> bool:
        return self.remaining > 0 and (self.after is None or self.after.remaining == 0)


@dataclass
class _OffsetCut:
    offset: int
    remaining: int
    from_end: bool = False


class Proxy:
    """A fault-injecting TCP proxy in front of the server that `dsn` names."""

    def __init__(self, dsn: str, *, rcvbuf: int | None = None) -> None:
        """`rcvbuf` bounds the kernel's receive buffer on the client side (autotuned up to
        tens of MiB otherwise): with `throttle()`, the writer's data then piles up in libpq."""
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
        if rcvbuf is not None:  # inherited by the accepted sockets
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._triggers: list[_Trigger] = []
        self._offset_cuts: list[_OffsetCut] = []
        self._rate: float | None = None
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

    def cut_on(
        self, pattern: bytes, *, forward: bool, times: int = 1, after: _Trigger | None = None
    ) -> _Trigger:
        """Cut the connection whose client sends `pattern`, `times` times (see module doc);
        with `after`, only once that trigger has fired all its times."""
        trigger = _Trigger(pattern, forward, times, after)
        with self._lock:
            self._triggers.append(trigger)
        return trigger

    def cut_at(self, offset: int, *, times: int = 1) -> None:
        """Cut the connection whose COPY stream reaches `offset` bytes (from the start of
        its binary signature), `times` times: the server gets exactly the bytes before."""
        with self._lock:
            self._offset_cuts.append(_OffsetCut(offset, times))

    def cut_at_end(self, offset: int, *, times: int = 1) -> None:
        """Cut the connection `-offset` bytes before the end of a COPY's data (the end of
        its CopyDone message; 0: right after it, so the server commits and the reply is
        lost), `times` times."""
        assert offset <= 0
        with self._lock:
            self._offset_cuts.append(_OffsetCut(offset, times, from_end=True))

    def clear(self) -> None:
        """Disarm every pending trigger and cut (between a property test's examples)."""
        with self._lock:
            self._triggers.clear()
            self._offset_cuts.clear()
        self._rate = None

    def throttle(self, rate: float | None) -> None:
        """Forward what clients send at most at `rate` bytes/s (None: at full speed)."""
        self._rate = rate

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
                    if link.swallow and not upstream and time.monotonic() > link.swallow_until:
                        break
                    continue
                except OSError:
                    break
                if not data:
                    break
                if upstream:
                    cut = self._offset_cut(link, data)
                    if cut is not None:
                        self.triggered += 1
                        target.sendall(data[:cut])
                        break
                    trigger = self._match(link, data)
                    if trigger is not None:
                        self.triggered += 1
                        if trigger.forward:
                            target.sendall(data)
                            link.cut_client()
                            continue
                        break
                    target.sendall(data)
                    rate = self._rate
                    if rate:
                        time.sleep(len(data) / rate)
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

    def _match(self, link: _Link, data: bytes) -> _Trigger | None:
        tail = link.tail
        link.tail = (tail + data)[-64:]
        with self._lock:
            for trigger in self._triggers:
                pattern = trigger.pattern
                # Only a pattern that ends in `data`: one the tail held whole was seen then.
                seen = tail[len(tail) - len(pattern) + 1 :] + data if len(pattern) > 1 else data
                if trigger.armed and pattern in seen:
                    trigger.remaining -= 1
                    return trigger
        return None

    def _offset_cut(self, link: _Link, data: bytes) -> int | None:
        """Where in `data` to cut for an armed `cut_at` (None: forward it all)."""
        start = data.rfind(COPY_SIGNATURE)
        base = -start if start >= 0 else link.copy_pos
        end = data.find(COPY_DONE_MESSAGE)
        if base is not None:
            link.copy_pos = base + len(data)
        with self._lock:
            for cut in self._offset_cuts:
                if cut.remaining <= 0:
                    continue
                if cut.from_end and end >= 0:
                    cut.remaining -= 1
                    return max(0, end + len(COPY_DONE_MESSAGE) + cut.offset)
                if not cut.from_end and base is not None and base <= cut.offset < base + len(data):
                    cut.remaining -= 1
                    return cut.offset - base
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
