"""The middlewares, driven in-process (pure ASGI/WSGI calls), writing to the real table."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from auditq import AuditWriter
from auditq.context import current, get_context
from auditq.middleware import AuditASGIMiddleware, AuditWSGIMiddleware, client_ip

from ..conftest import Table, WriterFactory

Message = dict[str, Any]


async def asgi_request(
    app: Any,
    path: str = "/",
    headers: list[tuple[bytes, bytes]] | None = None,
    client: tuple[str, int] | None = ("203.0.113.7", 5000),
    method: str = "GET",
) -> tuple[int, list[tuple[bytes, bytes]]]:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": headers or [],
        "client": client,
        "query_string": b"",
        "root_path": "",
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], list(start.get("headers", []))


def handler(writer: AuditWriter, status: int = 200) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.001)  # let other requests' tasks interleave
        writer.log("doc.read", resource_id=scope["path"])
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def test_asgi_binds_request_context_and_no_leak_between_tasks(
    table: Table, make_writer: WriterFactory
) -> None:
    writer = make_writer()
    app = AuditASGIMiddleware(handler(writer), writer=writer)

    async def main() -> None:
        await asyncio.gather(
            *(
                asgi_request(
                    app,
                    f"/r{i}",
                    [(b"x-request-id", f"req-{i}".encode()), (b"user-agent", f"ua-{i}".encode())],
                )
                for i in range(200)
            )
        )
        assert current.get() is None

    asyncio.run(main())
    assert writer.flush(10)
    rows = table.query("SELECT resource_id, request_id, user_agent, host(ip) FROM {table}")
    assert len(rows) == 200
    for path, request_id, agent, ip in rows:
        n = path[2:]
        assert (request_id, agent, ip) == (f"req-{n}", f"ua-{n}", "203.0.113.7")


def test_asgi_generates_request_id_and_echoes_it(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer()
    app = AuditASGIMiddleware(handler(writer), writer=writer, request_id_header="X-Trace")
    bad = "x" * 500
    status, headers = asyncio.run(asgi_request(app, "/a", [(b"x-trace", bad.encode())]))
    assert status == 200
    echoed = dict(headers)[b"x-trace"].decode()
    assert echoed != bad and len(echoed) == 36  # a fresh UUIDv7 replaces the unusable one
    assert writer.flush(10)
    assert table.query("SELECT request_id FROM {table}") == [(echoed,)]


def test_asgi_request_entries_are_opt_in(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer()
    asyncio.run(asgi_request(AuditASGIMiddleware(handler(writer), writer=writer), "/quiet"))
    logged = AuditASGIMiddleware(handler(writer, status=404), writer=writer, log_requests=True)
    asyncio.run(asgi_request(logged, "/loud", method="DELETE"))
    assert writer.flush(10)
    rows = table.query("SELECT metadata, outcome FROM {table} WHERE action = 'http.request'")
    assert len(rows) == 1
    metadata, outcome = rows[0]
    assert outcome == "failure"
    assert {k: metadata[k] for k in ("method", "path", "status")} == {
        "method": "DELETE",
        "path": "/loud",
        "status": 404,
    }
    assert metadata["duration_ms"] >= 0


def test_asgi_starlette_route_template(table: Table, make_writer: WriterFactory) -> None:
    starlette = pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    del starlette
    writer = make_writer()

    async def item(request: Any) -> PlainTextResponse:
        writer.log("item.read", resource_id=request.path_params["item_id"])
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/items/{item_id}", item)])
    app = AuditASGIMiddleware(inner, writer=writer, log_requests=True)
    assert asyncio.run(asgi_request(app, "/items/9"))[0] == 200
    assert writer.flush(10)
    assert table.query("SELECT metadata->>'route' FROM {table} WHERE action = 'http.request'") == [
        ("/items/{item_id}",)
    ]


def test_asgi_exception_is_logged_as_500_and_context_reset(
    table: Table, make_writer: WriterFactory
) -> None:
    writer = make_writer()

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    app = AuditASGIMiddleware(broken, writer=writer, log_requests=True)
    with pytest.raises(RuntimeError):
        asyncio.run(asgi_request(app))
    assert current.get() is None
    assert writer.flush(10)
    assert table.query("SELECT metadata->>'status', outcome FROM {table}") == [("500", "failure")]


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        ("203.0.113.7", "198.51.100.1", (), "203.0.113.7"),  # never trusted by default
        ("10.0.0.2", "198.51.100.1", ("10.0.0.0/8",), "198.51.100.1"),
        ("203.0.113.7", "198.51.100.1", ("10.0.0.0/8",), "203.0.113.7"),  # untrusted peer
        # right-most untrusted hop: the spoofed left-most entry is not believed
        ("10.0.0.2", "1.2.3.4, 198.51.100.1, 10.0.0.9", ("10.0.0.0/8",), "198.51.100.1"),
        ("10.0.0.2", "10.0.0.5, 10.0.0.9", ("10.0.0.0/8",), "10.0.0.5"),  # all trusted
        ("10.0.0.2", "junk, 10.0.0.9", ("10.0.0.0/8",), "10.0.0.9"),
        ("::1", "[2001:db8::5]:443", ("::1",), "2001:db8::5"),
        ("::ffff:10.0.0.2", "198.51.100.1", ("10.0.0.0/8",), "198.51.100.1"),
        ("fe80::1%eth0", None, (), "fe80::1"),  # scope dropped: the entry refuses it
        (None, "198.51.100.1", ("10.0.0.0/8",), None),  # unix socket
    ],
)
def test_client_ip(
    peer: str | None, xff: str | None, trusted: tuple[str, ...], expected: str | None
) -> None:
    from auditq.middleware import _parse_networks

    assert client_ip(peer, xff, _parse_networks(trusted)) == expected


def test_trusted_proxies_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="not-a-cidr"):
        AuditWSGIMiddleware(lambda e, s: [], trusted_proxies=["not-a-cidr"])


def wsgi_env(path: str, **headers: str) -> dict[str, Any]:
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "SCRIPT_NAME": "", "REMOTE_ADDR": "10.1.2.3"}
    env.update({f"HTTP_{k.upper()}": v for k, v in headers.items()})
    return env


def test_wsgi_context_lasts_until_close_and_streams_inside_it(
    table: Table, make_writer: WriterFactory
) -> None:
    writer = make_writer()

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"a"
        writer.log("stream.chunk")  # produced after __call__ returned: still in context
        yield b"b"

    wrapped = AuditWSGIMiddleware(
        app, writer=writer, log_requests=True, trusted_proxies="10.0.0.0/8"
    )
    statuses: list[str] = []
    result = wrapped(
        wsgi_env("/s", x_request_id="w-1", x_forwarded_for="198.51.100.4", user_agent="ua"),
        lambda status, headers, exc_info=None: statuses.append(status),
    )
    assert b"".join(result) == b"ab"
    assert get_context()["request_id"] == "w-1"  # not closed yet
    result.close()  # type: ignore[attr-defined]
    assert current.get() is None
    assert writer.flush(10)
    rows = table.query("SELECT action, request_id, host(ip), user_agent FROM {table} ORDER BY 1")
    assert rows == [
        ("http.request", "w-1", "198.51.100.4", "ua"),
        ("stream.chunk", "w-1", "198.51.100.4", "ua"),
    ]


def test_wsgi_threads_do_not_share_context(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer()
    barrier = threading.Barrier(8)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"].endswith("0"):
            barrier.wait(5)  # some requests overlap in time
        writer.log("doc.read", resource_id=environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = AuditWSGIMiddleware(app, writer=writer)

    def one(i: int) -> None:
        result = wrapped(wsgi_env(f"/{i}", x_request_id=f"t-{i}"), lambda *a: None)
        list(result)
        result.close()  # type: ignore[attr-defined]
        assert current.get() is None

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(80)))
    assert writer.flush(10)
    rows = table.query("SELECT resource_id, request_id FROM {table}")
    assert len(rows) == 80
    assert all(request_id == f"t-{path[1:]}" for path, request_id in rows)


def test_wsgi_app_error_resets_context(table: Table, make_writer: WriterFactory) -> None:
    writer = make_writer()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise KeyError("boom")

    wrapped = AuditWSGIMiddleware(app, writer=writer, log_requests=True)
    with pytest.raises(KeyError):
        wrapped(wsgi_env("/x"), lambda *a: None)
    assert current.get() is None
    assert writer.flush(10)
    assert table.query("SELECT outcome, metadata->>'status' FROM {table}") == [("failure", "500")]


def test_middleware_uses_the_default_writer(
    table: Table, default_writer: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import auditq

    monkeypatch.setenv("AUDITQ_LOG_REQUESTS", "yes")
    monkeypatch.setenv("AUDITQ_REQUEST_ID_HEADER", "X-Correlation-ID")
    wrapped = AuditWSGIMiddleware(lambda e, s: (s("204 No Content", []), [])[1])
    auditq.configure(table.dsn, schema=table.schema, table=table.name)
    result = wrapped(wsgi_env("/d", x_correlation_id="c-1"), lambda *a: None)
    result.close()  # type: ignore[attr-defined]
    assert auditq.flush(10)
    assert table.query("SELECT request_id, metadata->>'status' FROM {table}") == [("c-1", "204")]


# -- what a client sends is sanitised and cut, never fatal to the request's entries ---------
# (issue 14, item 7)

_LONG_PATH = "/" + "p" * (64 * 1024 + 10)


def _hostile_asgi(app: Any) -> None:
    async def main() -> None:
        await asgi_request(app, "/nul\x00path", [(b"x-request-id", b"h-1")])
        await asgi_request(app, _LONG_PATH, [(b"x-request-id", b"h-2")])
        await asgi_request(
            app, "/ua", [(b"x-request-id", b"h-3"), (b"user-agent", b"evil\x00agent\nX: y")]
        )

    asyncio.run(main())


def _assert_hostile_rows(table: Table) -> None:
    rows = table.query(
        "SELECT request_id, action, user_agent, metadata FROM {table} ORDER BY request_id, action"
    )
    by_key = {(r[0], r[1]): r for r in rows}
    assert sorted(by_key) == [
        ("h-1", "doc.read"),
        ("h-1", "http.request"),
        ("h-2", "doc.read"),
        ("h-2", "http.request"),
        ("h-3", "doc.read"),
        ("h-3", "http.request"),
    ]
    assert by_key["h-1", "http.request"][3]["path"] == "/nul\\x00path"
    long_path = by_key["h-2", "http.request"][3]["path"]
    assert long_path.startswith("/ppp") and len(long_path.encode()) <= 2048
    assert long_path.endswith("…")
    for action in ("doc.read", "http.request"):
        assert by_key["h-3", action][2] == "evil\\x00agent\\x0aX: y"


def test_asgi_hostile_request_values_do_not_lose_entries(
    table: Table, make_writer: WriterFactory
) -> None:
    writer = make_writer()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        writer.log("doc.read", resource_id="r")  # inherits the request's user agent
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    _hostile_asgi(AuditASGIMiddleware(app, writer=writer, log_requests=True))
    assert writer.flush(10)
    stats = writer.stats()
    assert stats.dead_lettered == 0 and stats.rejected == 0
    _assert_hostile_rows(table)


def test_wsgi_hostile_request_values_do_not_lose_entries(
    table: Table, make_writer: WriterFactory
) -> None:
    writer = make_writer()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        writer.log("doc.read", resource_id="r")
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = AuditWSGIMiddleware(app, writer=writer, log_requests=True)
    for path, request_id, agent in (
        ("/nul\x00path", "h-1", "ua"),
        (_LONG_PATH, "h-2", "ua"),
        ("/ua", "h-3", "evil\x00agent\nX: y"),
    ):
        result = wrapped(
            wsgi_env(path, x_request_id=request_id, user_agent=agent),
            lambda status, headers, exc_info=None: None,
        )
        b"".join(result)
        result.close()  # type: ignore[attr-defined]
    assert writer.flush(10)
    stats = writer.stats()
    assert stats.dead_lettered == 0 and stats.rejected == 0
    _assert_hostile_rows(table)
