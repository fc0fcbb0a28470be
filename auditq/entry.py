"""The audit entry: its typed contract (`AuditEntry`), its limits, and the queued row shape.

Two shapes exist on purpose. `AuditEntry` is the documented, validated pydantic model that
callers may build (and pay ~6 µs for). The queue holds `Row`, a flat tuple in column order
whose members are atomic values, so a queue of 100k entries costs the garbage collector
nothing (tuples of atomics are untracked) and a caller pays one tuple build, not a model.
"""

from __future__ import annotations

import ipaddress
import math
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_serializer,
    field_validator,
)

from .ids import uuid7

#: Longest `action`, id and type fields, in characters.
MAX_NAME_CHARS: Final = 256
#: Longest `user_agent`, in characters (browsers send up to ~500; 1 KiB leaves room).
MAX_USER_AGENT_CHARS: Final = 1024
#: Largest `metadata`, as UTF-8 JSON. Audit rows are evidence, not payload storage.
MAX_METADATA_BYTES: Final = 64 * 1024

#: The table's columns written by COPY, in order; `Row` tuples follow this order.
COLUMNS: Final = (
    "id",
    "occurred_at",
    "action",
    "tenant_id",
    "actor_id",
    "actor_type",
    "resource_type",
    "resource_id",
    "outcome",
    "ip",
    "user_agent",
    "request_id",
    "metadata",
)

#: Text columns and their limits, by position in `Row` (id, time, ip, metadata are typed).
TEXT_LIMITS: Final = (
    (2, "action", MAX_NAME_CHARS),
    (3, "tenant_id", MAX_NAME_CHARS),
    (4, "actor_id", MAX_NAME_CHARS),
    (5, "actor_type", MAX_NAME_CHARS),
    (6, "resource_type", MAX_NAME_CHARS),
    (7, "resource_id", MAX_NAME_CHARS),
    (8, "outcome", MAX_NAME_CHARS),
    (10, "user_agent", MAX_USER_AGENT_CHARS),
    (11, "request_id", MAX_NAME_CHARS),
)

OUTCOMES: Final = frozenset({"success", "failure", "unknown"})

#: A queued entry: (id | None, occurred_at as int ns since epoch or aware datetime, action,
#: tenant_id, actor_id, actor_type, resource_type, resource_id, outcome, ip, user_agent,
#: request_id, metadata as serialised JSON text | None). `id` None means "make one from
#: occurred_at on the writer side".
Row = tuple[Any, ...]


class Outcome(StrEnum):
    """What happened to the audited action."""

    SUCCESS = "success"
    FAILURE = "failure"
    UNKNOWN = "unknown"


class InvalidEntry(ValueError):
    """An entry that can never be written: raised by strict writers and `AuditEntry`."""


def _check_text(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL, and lone surrogates cannot be encoded to UTF-8.
    if value is None:
        return value
    if "\x00" in value:
        raise ValueError("text must not contain NUL (\\x00)")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"text is not encodable as UTF-8: {exc.reason}") from None
    return value


Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS), AfterValidator(_check_text)]
OptName = Annotated[
    str | None, StringConstraints(max_length=MAX_NAME_CHARS), AfterValidator(_check_text)
]


def _now() -> datetime:
    return datetime.now(UTC)


class AuditEntry(BaseModel):
    """One audit event: who did what, to which resource, in which tenant, when, from where.

    Building one validates every field (~6 µs); `AuditWriter.log()` avoids that cost on the
    caller's path and checks the same rules on the writer thread instead.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)

    id: uuid.UUID = Field(default_factory=uuid7, description="UUIDv7, made client-side.")
    occurred_at: datetime = Field(default_factory=_now, description="When it happened (aware).")
    action: Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]
    tenant_id: OptName = None
    actor_id: OptName = None
    actor_type: OptName = None
    resource_type: OptName = None
    resource_id: OptName = None
    outcome: Outcome | None = None
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    user_agent: Annotated[
        str | None,
        StringConstraints(max_length=MAX_USER_AGENT_CHARS),
        AfterValidator(_check_text),
    ] = None
    request_id: OptName = None
    metadata: dict[str, Any] | None = None

    @field_validator("action")
    @classmethod
    def _action_text(cls, value: str) -> str:
        checked = _check_text(value)
        assert checked is not None
        return checked

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("occurred_at must be timezone-aware")
        return value

    @field_validator("ip")
    @classmethod
    def _unscoped(
        cls, value: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    ) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        if isinstance(value, ipaddress.IPv6Address) and value.scope_id:
            raise ValueError("scoped IPv6 addresses (with %zone) cannot be stored in inet")
        return value

    @field_validator("metadata")
    @classmethod
    def _json_object(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            dump_metadata(value)  # raises ValueError with the reason
        return value

    @field_serializer("ip")
    def _ip_text(self, value: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> str | None:
        return None if value is None else str(value)

    def to_row(self) -> Row:
        """This entry as a queued `Row` (already validated, so the writer trusts it)."""
        return (
            self.id,
            self.occurred_at,
            self.action,
            self.tenant_id,
            self.actor_id,
            self.actor_type,
            self.resource_type,
            self.resource_id,
            None if self.outcome is None else self.outcome.value,
            self.ip,
            self.user_agent,
            self.request_id,
            None if self.metadata is None else dump_metadata(self.metadata),
        )


# A NUL character serialises as \u0000 after an even number of backslashes; the text
# "\u0000" (a real backslash) serialises with an odd number and is fine.
_JSON_NUL: Final = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _json_default(value: Any) -> Any:
    # orjson handles datetime, UUID, enums and dataclasses itself; Decimal is common in audit
    # metadata (amounts) and has one faithful JSON form. Anything else is the caller's bug.
    from decimal import Decimal

    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON serialisable")


def _has_non_finite(value: Any) -> bool:
    # Only reached when the JSON holds a null, which is where orjson puts NaN and Infinity.
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return False


def dump_metadata(metadata: Any) -> str:
    """Serialise metadata to JSON text now, so later mutation by the caller changes nothing.

    Text, not bytes: orjson's bytes keep its ~4 KiB working buffer (a full queue of 100k
    entries took ~400 MiB); decoding to an exact-size str costs ~35 ns, an exact-size bytes
    copy ~250 ns. The writer encodes it back to UTF-8 off the caller's path.

    Raises `ValueError` with the reason when it is not a JSON object PostgreSQL can store.
    """
    if not isinstance(metadata, dict):
        if not isinstance(metadata, Mapping):
            raise ValueError(f"metadata must be a mapping, not {type(metadata).__name__}")
        metadata = dict(metadata)
    try:
        data = orjson.dumps(metadata, default=_json_default)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise ValueError(f"metadata is not serialisable as JSON: {exc}") from None
    size = len(data)
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes of JSON; the limit is {MAX_METADATA_BYTES}")
    # The scans run on the text: `in` on str costs ~35 ns, on bytes ~150 ns (3.11).
    text = data.decode()
    if "null" in text and _has_non_finite(metadata):
        raise ValueError("metadata must not contain NaN or Infinity: JSON has no such values")
    if "\\u0000" in text and _JSON_NUL.search(text):
        raise ValueError("metadata must not contain NUL (\\u0000): jsonb cannot store it")
    return text
