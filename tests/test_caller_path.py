"""The C caller path of `AuditWriter.log()` against the Python method it stands in for.

Every call is made twice, once through `writer.log` (the C path, where it is built) and once
through `AuditWriter.log` itself on a twin writer: both must answer the same, raise the
same, count the same and queue the same row (apart from the clock).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from auditq import AuditWriter, InvalidEntry, native
from auditq import otel as audit_otel
from auditq.context import bind, current

needs_c = pytest.mark.skipif(
    native.speedups is None, reason="C caller path not in use (not built, or AUDITQ_NO_SPEEDUPS=1)"
)

DSN = "postgresql://auditq:secret@127.0.0.1:9/never"  # no call here opens a connection
UA = "Mozilla/5.0 (X11; Linux x86_64)"


def _twin(**options: Any) -> AuditWriter:
    writer = AuditWriter(DSN, **options)
    writer._thread = threading.current_thread()  # "started": no thread, no connection
    writer._gate.started = True
    return writer


@pytest.fixture
def twins() -> Iterator[tuple[AuditWriter, AuditWriter]]:
    made = (_twin(max_queue=50), _twin(max_queue=50))
    yield made
    for writer in made:
        writer._thread = None
        writer._gate.started = False
        writer.close(timeout=0)


def _call(log: Callable[..., bool], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return log(*args, **kwargs)
    except Exception as exc:  # compared by type and message
        return (type(exc), str(exc))


def _queued(writer: AuditWriter, since: int) -> list[tuple[Any, ...]]:
    """The rows queued from index `since` on. The clock differs between two calls (and
    strict mode makes the id and the timestamp on the caller's path); nothing else may."""
    rows = list(writer._buffer.items)[since:]
    if writer.strict:
        return [("id", "clock", *row[2:]) for row in rows]
    return [(row[0], "clock" if isinstance(row[1], int) else row[1], *row[2:]) for row in rows]


def _counts(writer: AuditWriter) -> tuple[int, int, int]:
    stats = writer.stats()
    return stats.accepted, stats.dropped_overflow, stats.rejected


def same(twins: tuple[AuditWriter, AuditWriter], *args: Any, **kwargs: Any) -> Any:
    fast, reference = twins
    since = len(fast._buffer.items)
    assert len(reference._buffer.items) == since
    got = _call(fast.log, args, kwargs)
    expected = _call(lambda *a, **k: AuditWriter.log(reference, *a, **k), args, kwargs)
    assert got == expected
    assert _queued(fast, since) == _queued(reference, since)
    assert _counts(fast) == _counts(reference)
    assert fast._ledger.last_reject_reason() == reference._ledger.last_reject_reason()
    return got


@needs_c
def test_the_instance_attribute_is_the_c_path() -> None:
    writer = _twin()
    assert type(writer.log) is native.speedups.CallerPath  # type: ignore[union-attr]

    class Custom(AuditWriter):
        def log(self, action: str, /, **fields: Any) -> bool:  # type: ignore[override]
            return False

    assert not Custom(DSN).log("x")  # a subclass's own log() is never bypassed


CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    (("document.read",), {}),
    (
        ("document.read",),
        dict(
            tenant_id="tenant-42",
            actor_id="user-1",
            actor_type="user",
            resource_type="document",
            resource_id="doc-9",
            outcome="success",
            ip="203.0.113.7",
            user_agent=UA,
            request_id="req-1",
            metadata={"k": [1, 2, {"x": None}], "é": "ü"},
        ),
    ),
    (("document.read",), dict(metadata={}, tenant_id=42, actor_id=None)),
    (
        ("a",),
        dict(
            occurred_at=datetime(2026, 1, 2, tzinfo=UTC), id="0190e2c4-0000-7000-8000-0000000000aa"
        ),
    ),
    (("a",), dict(occurred_at=None, id=None, metadata=None)),
    (("a",), {"tenant_" + "id": "built at run time"}),  # a keyword that is not interned
    # refused or rejected: the Python path answers, with its reasons
    (("",), {}),
    ((17,), {}),
    ((None,), dict(tenant_id="t")),
    (("a",), dict(metadata=["not", "a", "mapping"])),
    (("a",), dict(metadata={"nan": math.nan})),
    (("a",), dict(metadata={"nul": "a\x00b"})),
    (("a",), dict(metadata={"x": object()})),
    # wrong calls: the same TypeError
    (("a", "b"), {}),
    ((), {}),
    ((), dict(action="a")),
    (("a",), dict(tenant="misspelt")),
    (("a",), dict(tenant_id="t", **{"1": "odd"})),
]


@pytest.mark.parametrize(("args", "kwargs"), CALLS, ids=[str(i) for i in range(len(CALLS))])
def test_each_call_answers_and_queues_the_same(
    twins: tuple[AuditWriter, AuditWriter], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    audit_otel.disable()
    try:
        same(twins, *args, **kwargs)
    finally:
        audit_otel.enable()


def test_bound_context_fills_what_the_call_leaves_out(
    twins: tuple[AuditWriter, AuditWriter],
) -> None:
    token = bind(
        tenant_id="t-ctx",
        actor_id="a-ctx",
        actor_type="service",
        request_id="r-ctx",
        ip="198.51.100.1",
        user_agent="ctx-agent",
    )
    try:
        same(twins, "ctx.read")
        same(twins, "ctx.read", tenant_id="explicit", ip=None, request_id="r-call")
    finally:
        current.reset(token)
    same(twins, "ctx.after")


def test_an_active_span_adds_its_ids_on_both_paths(
    twins: tuple[AuditWriter, AuditWriter],
) -> None:
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace import TracerProvider

    assert audit_otel.enable()
    tracer = TracerProvider().get_tracer("auditq-test")
    with tracer.start_as_current_span("request"):
        same(twins, "traced", metadata={"k": 1})
        same(twins, "traced")
    rows = twins[0]._buffer.items
    assert all('"trace_id"' in row[12] and '"span_id"' in row[12] for row in rows)
    same(twins, "untraced")
    assert twins[0]._buffer.items[-1][12] is None


def test_full_queue_and_closed_writer_are_counted_alike(
    twins: tuple[AuditWriter, AuditWriter],
) -> None:
    for n in range(60):  # max_queue is 50: the last 10 are dropped
        same(twins, "fill", request_id=str(n))
    assert _counts(twins[0]) == (50, 10, 0)
    for writer in twins:
        writer._gate.closed = True
    same(twins, "after.close")
    assert _counts(twins[0]) == (50, 10, 1)


def test_strict_raises_alike() -> None:
    fast, reference = _twin(strict=True), _twin(strict=True)
    pair = (fast, reference)
    assert same(pair, "ok", tenant_id="t") is True
    assert same(pair, "")[0] is InvalidEntry
    assert same(pair, "ok", ip="not an address")[0] is InvalidEntry
    fast.strict = reference.strict = False  # switchable on a live writer, as before
    assert same(pair, "ok", ip="not an address") is True
    assert len(fast._buffer.items) == 2


def test_not_started_writer_starts_through_the_method(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer = AuditWriter(DSN)
    started: list[bool] = []
    monkeypatch.setattr(writer, "_start", lambda: started.append(True))
    writer._bind_caller_path()  # the C path is handed its callbacks when it is made
    assert writer.log("first")
    assert started == [True] and len(writer._buffer.items) == 1


class _Closing(Mapping[str, Any]):
    """Metadata whose reading closes the writer: the check must come after it, as in log()."""

    def __init__(self, writer: AuditWriter) -> None:
        self.writer = writer
        self.reads = 0

    def __getitem__(self, key: str) -> Any:
        return 1

    def __iter__(self) -> Iterator[str]:
        self.reads += 1
        self.writer._gate.closed = True
        return iter(["k"])

    def __len__(self) -> int:
        return 1


def test_state_is_read_after_the_metadata_runs_caller_code() -> None:
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace import TracerProvider

    assert audit_otel.enable()
    fast, reference = _twin(), _twin()
    with TracerProvider().get_tracer("auditq-test").start_as_current_span("request"):
        # with_trace spreads the mapping (running its code) before log() reads _closed
        assert fast.log("x", metadata=_Closing(fast)) is False
        assert AuditWriter.log(reference, "x", metadata=_Closing(reference)) is False
    assert len(fast._buffer.items) == len(reference._buffer.items) == 0
    assert _counts(fast) == _counts(reference) == (0, 0, 1)


class _Unserialisable(Mapping[str, Any]):
    def __init__(self) -> None:
        self.reads = 0

    def __getitem__(self, key: str) -> Any:
        return object()

    def __iter__(self) -> Iterator[str]:
        self.reads += 1
        return iter(["k"])

    def __len__(self) -> int:
        return 1


def test_repaired_metadata_is_read_once(twins: tuple[AuditWriter, AuditWriter]) -> None:
    # Metadata JSON cannot hold is stored repaired and flagged (docs/fields.md), from a
    # single reading of the caller's mapping on either path.
    audit_otel.disable()
    try:
        fast, reference = twins
        ours, theirs = _Unserialisable(), _Unserialisable()
        assert fast.log("x", metadata=ours) is True
        assert AuditWriter.log(reference, "x", metadata=theirs) is True
        assert ours.reads == theirs.reads == 1
        for writer in (fast, reference):
            metadata = json.loads(writer._buffer.items[-1][12])
            assert metadata["_auditq"] == {"replaced": ["metadata"]}
            assert metadata["k"].startswith("<object object at 0x")
    finally:
        audit_otel.enable()
