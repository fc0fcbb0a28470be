"""OpenTelemetry hook: while a span is active, entries get its `trace_id` and `span_id` in
their metadata (as lower-case hex, the W3C trace-context spelling).

Optional: nothing here imports OpenTelemetry unless `opentelemetry-api` is installed, and
`enabled` is the single module-level flag the caller's path checks, so without it the cost
is one attribute read. Keys the caller put in the metadata win over the span's.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["disable", "enable", "enabled", "trace_ids", "with_trace"]


def _installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except (ImportError, ValueError):
        return False


#: True when `opentelemetry-api` is importable and the hook was not disabled.
enabled: bool = _installed()

# `opentelemetry.trace.get_current_span`, imported on first use so that importing auditq
# never pays for importing OpenTelemetry.
_get_current_span: Callable[[], Any] | None = None


def enable() -> bool:
    """Turn the hook on (when OpenTelemetry is installed); returns whether it is on."""
    global enabled
    enabled = _installed()
    return enabled


def disable() -> None:
    """Turn the hook off: entries carry no trace ids unless the caller adds them."""
    global enabled
    enabled = False


def trace_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the active span, as hex; None without a valid active span."""
    global _get_current_span
    getter = _get_current_span
    if getter is None:
        try:
            from opentelemetry.trace import get_current_span
        except ImportError:
            disable()
            return None
        getter = _get_current_span = get_current_span
    context = getter().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def with_trace(metadata: Any) -> Any:
    """`metadata` with the active span's ids added; unchanged without an active span, or
    when it is not a mapping (the writer then rejects it with its usual reason)."""
    ids = trace_ids()
    if ids is None:
        return metadata
    if metadata is None:
        return {"trace_id": ids[0], "span_id": ids[1]}
    if not isinstance(metadata, Mapping):
        return metadata
    return {"trace_id": ids[0], "span_id": ids[1], **metadata}
