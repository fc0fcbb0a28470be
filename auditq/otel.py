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


# (the runtime context's ContextVar, the span key): read directly, the common "no span"
# case costs one ContextVar.get and one dict lookup instead of ~6 calls through the API.
# Private to opentelemetry-api, so it is looked up defensively and the public API is the
# fallback.
_fast_path: tuple[Any, str] | None = None


def _find_fast_path() -> tuple[Any, str] | None:
    try:
        from contextvars import ContextVar

        from opentelemetry import context as otel_context
        from opentelemetry.trace import propagation

        var = getattr(otel_context._RUNTIME_CONTEXT, "_current_context", None)
        key = getattr(propagation, "_SPAN_KEY", None)
        if isinstance(var, ContextVar) and isinstance(key, str):
            return var, key
    except Exception:  # noqa: S110 - any surprise: use the public API
        pass
    return None


def trace_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the active span, as hex; None without a valid active span."""
    global _get_current_span, _fast_path
    getter = _get_current_span
    if getter is None:
        try:
            from opentelemetry.trace import get_current_span
        except ImportError:
            disable()
            return None
        getter = _get_current_span = get_current_span
        _fast_path = _find_fast_path()
    fast = _fast_path
    if fast is not None:
        current = fast[0].get()
        span = current.get(fast[1]) if current is not None else None
        if span is None:
            return None
        context = span.get_span_context()
    else:
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
