"""Request context bound with `contextvars`, so handlers need not repeat who and where.

A context is an immutable tuple in one `ContextVar`: reading it on the caller's path is one
`ContextVar.get()`, and each thread and asyncio task sees the context it was created in.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any, Final, TypeVar

#: The fields a request context can carry, in the order of the bound tuple.
CONTEXT_FIELDS: Final = ("tenant_id", "actor_id", "actor_type", "request_id", "ip", "user_agent")

Bound = tuple[Any, Any, Any, Any, Any, Any]
_EMPTY: Final[Bound] = (None, None, None, None, None, None)

current: contextvars.ContextVar[Bound | None] = contextvars.ContextVar(
    "auditq_context", default=None
)

F = TypeVar("F", bound=Callable[..., Any])


def _merged(fields: dict[str, Any]) -> Bound:
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise TypeError(f"unknown context field(s): {', '.join(sorted(unknown))}")
    base = current.get() or _EMPTY
    values = tuple(fields.get(name, base[i]) for i, name in enumerate(CONTEXT_FIELDS))
    return values  # type: ignore[return-value]


def bind(**fields: Any) -> contextvars.Token[Bound | None]:
    """Bind fields for the rest of this context (thread, task); returns a token for reset."""
    return current.set(_merged(fields))


def unbind(*names: str) -> None:
    """Forget the named fields (all of them when none are named)."""
    if not names:
        current.set(None)
        return
    unknown = set(names) - set(CONTEXT_FIELDS)
    if unknown:
        raise TypeError(f"unknown context field(s): {', '.join(sorted(unknown))}")
    base = current.get() or _EMPTY
    values = tuple(None if name in names else base[i] for i, name in enumerate(CONTEXT_FIELDS))
    current.set(None if values == _EMPTY else values)  # type: ignore[arg-type]


def get_context() -> dict[str, Any]:
    """The fields bound now, by name (None for unbound)."""
    return dict(zip(CONTEXT_FIELDS, current.get() or _EMPTY, strict=True))


class context:
    """Bind fields within a `with` block or around a function (sync or async)."""

    def __init__(self, **fields: Any) -> None:
        _merged(fields)  # fail at the call site on unknown names
        self._fields = fields
        self._tokens: list[contextvars.Token[Bound | None]] = []

    def __enter__(self) -> dict[str, Any]:
        self._tokens.append(bind(**self._fields))
        return get_context()

    def __exit__(self, *exc: object) -> None:
        current.reset(self._tokens.pop())

    def __call__(self, func: F) -> F:
        import inspect

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with context(**self._fields):
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with context(**self._fields):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]
