"""A Prometheus collector for auditq writers: `pip install 'auditq[prometheus]'`.

    from auditq.prometheus import register
    register()                       # every writer in this process, on the default registry

Each scrape takes one `stats()` snapshot per writer (a lock held for a few counters) and
exposes it as `auditq_*` counters and gauges labelled `writer` (the writer's `name`, by
default `schema.table`). Numbers are per process: under a pre-fork server every worker has
its own writer, so scrape each worker, or aggregate the rows in the table instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import REGISTRY, CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised by the missing-extra test
    raise ImportError(
        "auditq.prometheus needs the prometheus-client package: pip install 'auditq[prometheus]'"
    ) from exc

if TYPE_CHECKING:
    from .stats import WriterStats
    from .writer import AuditWriter

__all__ = ["AuditqCollector", "register"]

#: (metric name, help, WriterStats attribute) for the counters; `_total` is added on exposition.
COUNTERS: Final = (
    ("auditq_calls", "Entries offered to the writer, whatever became of them.", "calls"),
    ("auditq_accepted", "Entries accepted into the queue.", "accepted"),
    ("auditq_written", "Entries committed to the table.", "written"),
    ("auditq_dropped_overflow", "Entries refused because the queue was full.", "dropped_overflow"),
    ("auditq_rejected", "Entries refused as invalid, or after close().", "rejected"),
    ("auditq_dead_lettered", "Accepted entries that will never be written.", "dead_lettered"),
    ("auditq_filtered", "Entries the before_write hook dropped on purpose.", "filtered"),
    ("auditq_batches", "COPY transactions committed.", "batches"),
    ("auditq_retries", "Failed write attempts that were retried.", "retries"),
)
GAUGES: Final = (
    ("auditq_pending", "Entries queued or in flight.", "pending"),
    ("auditq_spooled", "Entries on disk waiting for replay.", "spooled"),
)

WriterSource = Callable[[], Iterable["AuditWriter"]]


def _live_writers() -> Iterable[AuditWriter]:
    from .writer import live_writers

    return live_writers()


class AuditqCollector:
    """A custom collector over some writers (by default every live writer in the process)."""

    def __init__(self, writers: Iterable[AuditWriter] | WriterSource | None = None) -> None:
        if writers is None:
            self._source: WriterSource = _live_writers
        elif callable(writers):
            self._source = writers
        else:
            fixed = list(writers)
            self._source = lambda: fixed

    def snapshots(self) -> list[tuple[str, WriterStats]]:
        """(label, stats) for each writer; repeated names get `#2`, `#3`, ... appended."""
        seen: dict[str, int] = {}
        found: list[tuple[str, WriterStats]] = []
        for writer in sorted(self._source(), key=lambda w: w.name):
            count = seen.get(writer.name, 0) + 1
            seen[writer.name] = count
            label = writer.name if count == 1 else f"{writer.name}#{count}"
            found.append((label, writer.stats()))
        return found

    def collect(self) -> Iterator[Metric]:
        snapshots = self.snapshots()
        for name, doc, attribute in COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=["writer"])
            for label, stats in snapshots:
                counter.add_metric([label], float(getattr(stats, attribute)))
            yield counter
        for name, doc, attribute in GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["writer"])
            for label, stats in snapshots:
                gauge.add_metric([label], float(getattr(stats, attribute)))
            yield gauge
        last = GaugeMetricFamily(
            "auditq_last_write_timestamp_seconds",
            "When the last batch committed (Unix time); absent before the first.",
            labels=["writer"],
        )
        for label, stats in snapshots:
            if stats.last_write_at is not None:
                last.add_metric([label], stats.last_write_at.timestamp())
        yield last

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples, so registering never takes a snapshot."""
        for name, doc, _ in COUNTERS:
            yield CounterMetricFamily(name, doc, labels=["writer"])
        for name, doc, _ in GAUGES:
            yield GaugeMetricFamily(name, doc, labels=["writer"])
        yield GaugeMetricFamily("auditq_last_write_timestamp_seconds", "", labels=["writer"])


def register(
    writers: Iterable[AuditWriter] | WriterSource | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> AuditqCollector:
    """Build an `AuditqCollector` and register it (default: the global registry)."""
    collector = AuditqCollector(writers)
    registry.register(collector)
    return collector
