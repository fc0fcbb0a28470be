"""Writer-side checks and coercion: a queued `Row` becomes a COPY-ready row or a reason.

This is where the costs kept off the caller's path are paid: making the UUIDv7, turning the
caller's nanosecond timestamp into a datetime, parsing the IP address, and every size and
character check. A row that fails any check is never sent; the caller's batch goes on
without it and the reason reaches the dead-letter path.
"""

from __future__ import annotations

import functools
import ipaddress
import uuid
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Final

from .entry import OUTCOMES, TEXT_LIMITS, Row, uuid7_int

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class EncodeError(ValueError):
    """Why a row cannot be written; the message names the field."""


@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> IpAddress:
    # Client addresses repeat heavily (proxies, NAT, keep-alive), so a cache turns the ~2 µs
    # parse into a dict hit for most rows.
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ValueError("scoped IPv6 addresses (with %zone) cannot be stored in inet")
    return address


def _text(value: Any, name: str, limit: int) -> str | None:
    if value is None:
        return None
    if type(value) is not str:
        value = _coerce_text(value, name)
    if len(value) > limit:
        raise EncodeError(f"{name}: {len(value)} characters; the limit is {limit}")
    if "\x00" in value:
        raise EncodeError(f"{name}: contains NUL (\\x00), which PostgreSQL text cannot store")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EncodeError(f"{name}: not encodable as UTF-8 ({exc.reason})") from None
    return value


def _coerce_text(value: Any, name: str) -> str:
    # Ids are often ints or UUIDs in the caller's code; their text form is unambiguous.
    if isinstance(value, Enum) and isinstance(value.value, str):
        return value.value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    raise EncodeError(f"{name}: expected text, got {type(value).__name__}")


def _occurred(value: Any) -> tuple[datetime, int]:
    """The aware datetime and its ns since the epoch (the UUIDv7 prefix)."""
    if type(value) is int:
        return _EPOCH + timedelta(microseconds=value // 1000), value
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise EncodeError("occurred_at: must be timezone-aware")
        return value, int(value.timestamp() * 1_000_000) * 1000
    raise EncodeError(f"occurred_at: expected datetime, got {type(value).__name__}")


def _ip(value: Any) -> IpAddress | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return _parse_ip(value)
        except ValueError as exc:
            raise EncodeError(f"ip: {exc}") from None
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        if isinstance(value, ipaddress.IPv6Address) and value.scope_id:
            raise EncodeError("ip: scoped IPv6 addresses (with %zone) cannot be stored in inet")
        return value
    raise EncodeError(f"ip: expected an address string, got {type(value).__name__}")


def encode_row(row: Row) -> tuple[Any, ...]:
    """The values COPY sends for `row`, in `COLUMNS` order; raises `EncodeError`."""
    if len(row) != 13:
        raise EncodeError(f"malformed entry: {len(row)} fields")
    occurred_at, unix_ns = _occurred(row[1])
    ident = row[0]
    if ident is None:
        ident = uuid.UUID(int=uuid7_int(unix_ns))
    elif not isinstance(ident, uuid.UUID):
        try:
            ident = uuid.UUID(str(ident))
        except ValueError:
            raise EncodeError("id: not a UUID") from None
    values: list[Any] = list(row)
    values[0] = ident
    values[1] = occurred_at
    for index, name, limit in TEXT_LIMITS:
        values[index] = _text(row[index], name, limit)
    if not values[2]:
        raise EncodeError("action: must be a non-empty string")
    outcome = values[8]
    if outcome is not None and outcome not in OUTCOMES:
        raise EncodeError(f"outcome: {outcome!r} is not one of {sorted(OUTCOMES)}")
    values[9] = _ip(row[9])
    metadata = row[12]
    if metadata is not None and not isinstance(metadata, bytes):
        raise EncodeError("metadata: expected serialised JSON bytes")
    return tuple(values)


def describe(row: Row) -> dict[str, Any]:
    """A JSON-friendly view of a queued row, for dead letters and logs."""
    from .entry import COLUMNS

    view: dict[str, Any] = {}
    for name, value in zip(COLUMNS, row, strict=False):
        if name == "occurred_at" and type(value) is int:
            value = (_EPOCH + timedelta(microseconds=value // 1000)).isoformat()
        elif name == "metadata" and isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            value = str(value)
        view[name] = value
    return view
