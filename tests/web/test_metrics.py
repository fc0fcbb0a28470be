"""The Prometheus collector and the OpenTelemetry hook, on real writes."""

from __future__ import annotations

import pytest

import auditq.writer
from auditq import otel

from ..conftest import Table, WriterFactory
from ..helpers import run_python


def test_prometheus_collector_exposes_stats(table: Table, make_writer: WriterFactory) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from auditq.prometheus import register

    writer = make_writer(name="web")
    other = make_writer(name="web")  # same name: labelled apart, never a duplicate series
    for i in range(25):
        writer.log("metric.test", resource_id=str(i))
    writer.log("")  # rejected
    assert writer.flush(10)
    registry = prometheus_client.CollectorRegistry()
    register([writer, other], registry=registry)

    def value(name: str, label: str = "web") -> float | None:
        return registry.get_sample_value(name, {"writer": label})  # type: ignore[no-any-return]

    assert value("auditq_accepted_total") == value("auditq_written_total") == 25
    assert value("auditq_rejected_total") == 1
    assert value("auditq_calls_total") == 26
    assert value("auditq_pending") == 0
    assert value("auditq_batches_total", "web#2") == 0
    assert value("auditq_last_write_timestamp_seconds") is not None
    assert value("auditq_last_write_timestamp_seconds", "web#2") is None
    text = prometheus_client.generate_latest(registry).decode()
    assert 'auditq_written_total{writer="web"} 25.0' in text
    assert table.count() == 25


def test_prometheus_default_collector_sees_live_writers(make_writer: WriterFactory) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from auditq.prometheus import AuditqCollector

    writer = make_writer(name="live-one")
    registry = prometheus_client.CollectorRegistry()
    registry.register(AuditqCollector())
    assert registry.get_sample_value("auditq_accepted_total", {"writer": "live-one"}) == 0
    del writer


def test_prometheus_missing_extra_has_a_clear_error() -> None:
    done = run_python(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if the extra were not installed
        try:
            import auditq.prometheus
        except ImportError as exc:
            print(exc)
        """
    )
    assert "pip install 'auditq[prometheus]'" in done.stdout, done.stderr


def _tracer() -> object:
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    return trace.get_tracer("auditq-tests")


def test_otel_with_trace_adds_active_span_ids(table: Table, make_writer: WriterFactory) -> None:
    tracer = _tracer()
    assert otel.enabled
    assert otel.with_trace(None) is None  # no active span: nothing added
    writer = make_writer()
    with tracer.start_as_current_span("request") as span:  # type: ignore[attr-defined]
        ids = span.get_span_context()
        metadata = otel.with_trace({"k": 1, "span_id": "mine"})
        writer.log("traced", metadata=metadata)
    assert metadata == {"trace_id": format(ids.trace_id, "032x"), "span_id": "mine", "k": 1}
    assert otel.with_trace(["not", "a", "mapping"]) == ["not", "a", "mapping"]
    assert writer.flush(10)
    assert table.query("SELECT metadata->>'trace_id' FROM {table}") == [
        (format(ids.trace_id, "032x"),)
    ]


@pytest.mark.skipif(
    not hasattr(auditq.writer, "_otel"),
    reason="the writer.py hook proposed in issue 5's report is not applied yet",
)
def test_otel_ids_added_automatically(table: Table, make_writer: WriterFactory) -> None:
    tracer = _tracer()
    writer = make_writer()
    with tracer.start_as_current_span("request") as span:  # type: ignore[attr-defined]
        writer.log("traced.auto")
        expected = format(span.get_span_context().span_id, "016x")
    writer.log("untraced")
    assert writer.flush(10)
    assert table.query("SELECT action, metadata->>'span_id' FROM {table} ORDER BY 1") == [
        ("traced.auto", expected),
        ("untraced", None),
    ]


def test_otel_disable_enable() -> None:
    otel.disable()
    try:
        assert not otel.enabled
    finally:
        otel.enable()
    assert otel.enabled is (otel._installed())
