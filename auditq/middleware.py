"""ASGI, WSGI and Django middleware that bind the request context for every request.

Each request gets its own context: request id (from a configurable header, else generated),
client IP (the peer address; `X-Forwarded-For` only when the peer is a trusted proxy, and
none is trusted by default) and user agent. Entries logged while the request is handled
inherit them. The context is set fresh for each request and reset when it ends (for WSGI,
when the server closes the response iterable), so nothing leaks into the next request
handled by the same thread or task. Optionally each request also logs one `http.request`
entry with method, path, route, status and duration (off by default).

    app = AuditASGIMiddleware(app)                      # Starlette, FastAPI, any ASGI app
    app.wsgi_app = AuditWSGIMiddleware(app.wsgi_app)    # Flask; any WSGI callable
    MIDDLEWARE = ["auditq.middleware.AuditDjangoMiddleware", ...]   # Django

Options left unset come from `AUDITQ_REQUEST_ID_HEADER`, `AUDITQ_TRUSTED_PROXIES`
(comma-separated addresses or CIDRs) and `AUDITQ_LOG_REQUESTS`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from . import signals
from .config import middleware_options_from_env
from .context import Bound, current
from .ids import uuid7

if TYPE_CHECKING:
    from .writer import AuditWriter

__all__ = [
    "AuditASGIMiddleware",
    "AuditDjangoMiddleware",
    "AuditWSGIMiddleware",
    "RequestAuditor",
    "client_ip",
]

# ASGI types, spelled out so the module needs no ASGI package.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# WSGI types (PEP 3333).
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
App = TypeVar("App")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_REQUEST_ID_HEADER: Final = "X-Request-ID"
DEFAULT_ACTION: Final = "http.request"
#: Longest incoming request id kept; a longer or unprintable one is replaced by a new id.
MAX_REQUEST_ID: Final = 128
#: The entry's limit for user agents; longer ones are cut rather than dead-lettered.
MAX_USER_AGENT: Final = 1024
#: The most of any one request value (path, route, method) an entry records, in UTF-8
#: bytes: a client chooses these, and a 64 KiB path has no place in every entry.
MAX_RECORDED_BYTES: Final = 2048
#: What ends a value that was cut.
_CUT: Final = "…"


def recorded(value: str, limit: int = MAX_RECORDED_BYTES) -> str:
    """`value` as an entry may record it: control characters (a NUL from `%00`, a newline),
    lone surrogates and other unprintable characters escaped (`\\x00`), and at most `limit`
    UTF-8 bytes. A client sends these; PostgreSQL refuses a NUL in text and JSON, and an
    entry it refuses would take the request's other entries with it."""
    if len(value) <= limit // 4 and value.isprintable():
        return value  # the common case, at no cost
    text = "".join(c if c.isprintable() else _escape(c) for c in value[:limit])
    data = text.encode("utf-8")
    if len(value) <= limit and len(data) <= limit:
        return text
    room = limit - len(_CUT.encode())
    return data[:room].decode("utf-8", "ignore") + _CUT


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _parse_ip(text: str | None) -> IPAddress | None:
    """An address from a header or the peer; None for anything else (unix socket, junk)."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.7:1234"
        text = text.split(":", 1)[0]
    text = text.split("%", 1)[0]  # the entry refuses scoped addresses
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _parse_networks(proxies: Iterable[str] | str) -> tuple[Network, ...]:
    if isinstance(proxies, str):
        proxies = proxies.split(",")
    networks: list[Network] = []
    for item in proxies:
        item = item.strip()
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError as exc:
                raise ValueError(f"trusted proxy {item!r} is not an address or CIDR") from exc
    return tuple(networks)


def client_ip(
    peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]
) -> str | None:
    """The client's address: the peer, unless the peer is a trusted proxy; then the
    right-most `X-Forwarded-For` hop that is not a trusted proxy (hops are appended by each
    proxy, so only the part right of the first untrusted hop is believable)."""
    address = _parse_ip(peer)
    if address is None or not trusted or not forwarded_for:
        return None if address is None else str(address)
    if not _trusted(address, trusted):
        return str(address)
    for hop in reversed(forwarded_for.split(",")):
        hop_address = _parse_ip(hop)
        if hop_address is None:
            break  # a trusted proxy passed on junk: keep the last address we can vouch for
        address = hop_address
        if not _trusted(address, trusted):
            break
    return str(address)


def _trusted(address: IPAddress, trusted: tuple[Network, ...]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def _request_id(value: str | None) -> str:
    if value and len(value) <= MAX_REQUEST_ID and value.isprintable() and value.isascii():
        return value
    return str(uuid7())


class RequestAuditor:
    """What the three middlewares share: options, building the context, the request entry."""

    def __init__(
        self,
        *,
        writer: AuditWriter | None = None,
        request_id_header: str | None = None,
        trusted_proxies: Iterable[str] | str | None = None,
        log_requests: bool | None = None,
        action: str = DEFAULT_ACTION,
        echo_request_id: bool = True,
    ) -> None:
        env = middleware_options_from_env()
        if request_id_header is None:
            request_id_header = env.get("request_id_header", DEFAULT_REQUEST_ID_HEADER)
        if trusted_proxies is None:
            trusted_proxies = env.get("trusted_proxies", ())
        if log_requests is None:
            log_requests = env.get("log_requests", False)
        assert request_id_header is not None and trusted_proxies is not None
        #: None means the module-level default writer, looked up per request (it may be
        #: configured after the middleware is built, or replaced).
        self.writer = writer
        self.request_id_header = request_id_header
        self.trusted_proxies = _parse_networks(trusted_proxies)
        self.log_requests = bool(log_requests)
        self.action = action
        self.echo_request_id = echo_request_id
        self._header_bytes = request_id_header.lower().encode("latin-1")
        self._environ_key = "HTTP_" + request_id_header.upper().replace("-", "_")

    def bind(
        self, request_id: str | None, peer: str | None, xff: str | None, ua: str | None
    ) -> Bound:
        """The context tuple for one request (tenant and actor are the app's to bind)."""
        return (
            None,
            None,
            None,
            _request_id(request_id),
            client_ip(peer, xff, self.trusted_proxies),
            recorded(ua, MAX_USER_AGENT) if ua else None,
        )

    def log_request(
        self, method: str, path: str, route: str | None, status: int, started: float
    ) -> None:
        """One `http.request` entry, in the request's context (the caller's path: cheap)."""
        metadata: dict[str, Any] = {
            "method": recorded(method),
            "path": recorded(path),
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000.0, 3),
        }
        if route is not None:
            metadata["route"] = recorded(route)
        outcome = "success" if status < 400 else "failure"
        if self.writer is not None:
            self.writer.log(self.action, outcome=outcome, metadata=metadata)
            return
        from . import default

        default.log(self.action, outcome=outcome, metadata=metadata)

    def flush_writer(self) -> bool:
        """Flush the writer (bounded by its `shutdown_timeout`); True when all is durable."""
        from . import default

        writer = self.writer or default.current_writer()
        if writer is None:
            return True
        return writer.flush(getattr(writer, "shutdown_timeout", None))


def _reset(token: Any) -> None:
    try:
        current.reset(token)
    except (ValueError, RuntimeError):
        current.set(None)  # reset from another context: clear rather than leak


class _Middleware(Generic[App]):
    """What both middlewares are made of: the wrapped app and a `RequestAuditor` with the
    options (documented in docs/frameworks.md)."""

    def __init__(
        self,
        app: App,
        *,
        writer: AuditWriter | None = None,
        request_id_header: str | None = None,
        trusted_proxies: Iterable[str] | str | None = None,
        log_requests: bool | None = None,
        action: str = DEFAULT_ACTION,
        echo_request_id: bool = True,
    ) -> None:
        self.app = app
        # ASGI: whether the server runs the lifespan protocol (its shutdown flushes), and
        # whether the exit handlers were installed for lack of it.
        self._lifespan = False
        self._signals = False
        self.auditor = RequestAuditor(
            writer=writer,
            request_id_header=request_id_header,
            trusted_proxies=trusted_proxies,
            log_requests=log_requests,
            action=action,
            echo_request_id=echo_request_id,
        )


class AuditASGIMiddleware(_Middleware[ASGIApp]):
    """Pure ASGI middleware: binds the request context around each HTTP/WebSocket request.

    A task sees the context it was created in; the context is reset when the app returns,
    so the next request on the same connection (or task) starts clean.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            self._lifespan = True
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        if not self._lifespan and not self._signals:
            # No lifespan to flush on (Django's ASGI app, say): a stop signal must still
            # drain what is queued (issue: uvicorn re-raises it, and atexit never runs). On
            # the event loop's thread, the main one under uvicorn and hypercorn, auditq's
            # handlers chain to the server's; elsewhere this does nothing.
            self._signals = True
            signals.install_exit_handlers()
        signals.ensure_installed()
        auditor = self.auditor
        request_id = forwarded = agent = None
        for name, value in scope.get("headers") or ():
            name = bytes(name).lower()
            if name == auditor._header_bytes:
                request_id = bytes(value).decode("latin-1")
            elif name == b"x-forwarded-for":
                text = bytes(value).decode("latin-1")
                forwarded = text if forwarded is None else f"{forwarded},{text}"
            elif name == b"user-agent":
                agent = bytes(value).decode("latin-1")
        client = scope.get("client")
        peer = str(client[0]) if client else None
        bound = auditor.bind(request_id, peer, forwarded, agent)
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if auditor.echo_request_id:
                    headers = list(message.get("headers") or ())
                    headers.append((auditor._header_bytes, str(bound[3]).encode("latin-1")))
                    message["headers"] = headers
            await send(message)

        token = current.set(bound)
        try:
            await self.app(scope, receive, send_wrapper if kind == "http" else send)
        finally:
            if auditor.log_requests and kind == "http":
                route = getattr(scope.get("route"), "path", None)
                auditor.log_request(
                    str(scope.get("method", "GET")),
                    str(scope.get("path", "")),
                    route if isinstance(route, str) else None,
                    status,
                    started,
                )
            _reset(token)
            await signals.adrain_if_stopping()

    def _lifespan_send(self, send: Send) -> Send:
        """Flush the writer when the app reports its shutdown complete: uvicorn re-raises
        the SIGTERM it caught once it has shut down, so its workers die by the signal and
        never run `atexit` hooks (auditq's exit drain among them)."""

        async def lifespan_send(message: Message) -> None:
            if message.get("type") in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await asyncio.to_thread(self.auditor.flush_writer)
            await send(message)

        return lifespan_send


class AuditWSGIMiddleware(_Middleware[WSGIApp]):
    """WSGI middleware: binds the request context until the server closes the response.

    The response iterable is wrapped so that streaming bodies are produced inside the
    request's context, and the context is reset (and the optional request entry logged)
    when the server calls `close()` on it, as PEP 3333 requires every server to do.
    """

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        signals.ensure_installed()  # a pre-fork worker may have reset the app's handlers
        auditor = self.auditor
        bound = auditor.bind(
            environ.get(auditor._environ_key),
            environ.get("REMOTE_ADDR"),
            environ.get("HTTP_X_FORWARDED_FOR"),
            environ.get("HTTP_USER_AGENT"),
        )
        response = _WSGIResponse(auditor, environ, bound)
        # Set, not merged: a context left behind by a server that never closed a response
        # must not leak into this request.
        token = current.set(bound)
        response.token = token
        try:
            result = self.app(environ, response.start_response(start_response))
        except BaseException:
            response.status = 500
            response.finish()
            raise
        response.result = result
        return response


class _WSGIResponse:
    """The wrapped response iterable; `close()` ends the request's context."""

    __slots__ = ("auditor", "bound", "done", "environ", "result", "started", "status", "token")

    def __init__(self, auditor: RequestAuditor, environ: dict[str, Any], bound: Bound) -> None:
        self.auditor = auditor
        self.environ = environ
        self.bound = bound
        self.result: Iterable[bytes] = ()
        self.token: Any = None
        self.status = 500
        self.started = time.perf_counter()
        self.done = False

    def start_response(self, start_response: StartResponse) -> StartResponse:
        def wrapped(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            try:
                self.status = int(status.split(None, 1)[0])
            except ValueError:
                self.status = 500
            if self.auditor.echo_request_id:
                headers = [*headers, (self.auditor.request_id_header, str(self.bound[3]))]
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        return wrapped

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.result
        except BaseException:
            self.status = 500
            raise

    def close(self) -> None:
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        signals.drain_if_stopping()
        try:
            if self.auditor.log_requests:
                environ = self.environ
                self.auditor.log_request(
                    str(environ.get("REQUEST_METHOD", "GET")),
                    str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", "")),
                    _wsgi_route(environ),
                    self.status,
                    self.started,
                )
        finally:
            _reset(self.token)


def _wsgi_route(environ: Mapping[str, Any]) -> str | None:
    """The matched route template, when the framework left one where we can see it."""
    route = environ.get("auditq.route")  # any app may set this
    if isinstance(route, str):
        return route
    request = environ.get("werkzeug.request")  # Flask
    rule = getattr(getattr(request, "url_rule", None), "rule", None)
    return rule if isinstance(rule, str) else None


class AuditDjangoMiddleware:
    """Django middleware (sync): add `"auditq.middleware.AuditDjangoMiddleware"` to
    `MIDDLEWARE`, first. Options come from the `AUDITQ_MIDDLEWARE` setting (a dict of this
    module's middleware keywords), then the environment. Bodies of streaming responses are
    produced after the middleware returns, outside the context; wrap the WSGI application
    in `AuditWSGIMiddleware` instead when that matters."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        import importlib

        # Imported by name: Django ships no type information, and only Django calls this.
        settings = importlib.import_module("django.conf").settings
        options = dict(getattr(settings, "AUDITQ_MIDDLEWARE", None) or {})
        self.get_response = get_response
        self.auditor = RequestAuditor(**options)

    def __call__(self, request: Any) -> Any:
        auditor = self.auditor
        meta = request.META
        bound = auditor.bind(
            meta.get(auditor._environ_key),
            meta.get("REMOTE_ADDR"),
            meta.get("HTTP_X_FORWARDED_FOR"),
            meta.get("HTTP_USER_AGENT"),
        )
        started = time.perf_counter()
        status = 500
        token = current.set(bound)
        try:
            response = self.get_response(request)
            status = int(response.status_code)
            if auditor.echo_request_id:
                response[auditor.request_id_header] = str(bound[3])
            return response
        finally:
            if auditor.log_requests:
                match = getattr(request, "resolver_match", None)
                route = getattr(match, "route", None)
                auditor.log_request(
                    str(request.method),
                    str(request.path),
                    route if isinstance(route, str) and route else None,
                    status,
                    started,
                )
            _reset(token)
