"""The audit entry: its typed contract (`AuditEntry`), its limits, and the queued row shape.

Two shapes exist on purpose. `AuditEntry` is the documented, validated pydantic model that
callers may build (and pay ~6 µs for). The queue holds `Row`, a flat tuple in column order
whose members are atomic values, so a queue of 100k entries costs the garbage collector
nothing (tuples of atomics are untracked) and a caller pays one tuple build, not a model.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Annotated, Any, Final

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_serializer,
    field_validator,
)

from .ids import uuid7

#: Longest `action`, id and type fields, in characters.
MAX_NAME_CHARS: Final = 256
#: Longest `outcome`, in characters: a word from `OUTCOMES` or the caller's own term.
MAX_OUTCOME_CHARS: Final = 64
#: Longest `user_agent`, in characters (browsers send up to ~500; 1 KiB leaves room).
MAX_USER_AGENT_CHARS: Final = 1024
#: Largest `metadata`, as UTF-8 JSON. Audit rows are evidence, not payload storage.
MAX_METADATA_BYTES: Final = 64 * 1024
#: Longest original text kept in `metadata._auditq` for a value that could not be stored
#: (an address that does not parse, say), in characters.
MAX_KEPT_CHARS: Final = 256
#: Longest prefix of an oversized metadata's JSON kept in `metadata._auditq.metadata_prefix`.
MAX_METADATA_PREFIX_CHARS: Final = 1024
#: The key under which auditq records, in a row's metadata, what it repaired in that row.
FLAGS_KEY: Final = "_auditq"

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

#: Mapping keys accepted besides the field names: the original TypeScript service's
#: camelCase spelling, so `write_audit_log({...})` payloads keep working.
ALIASES: Final = {
    "tenantId": "tenant_id",
    "actorId": "actor_id",
    "actorType": "actor_type",
    "resourceType": "resource_type",
    "resourceId": "resource_id",
    "userAgent": "user_agent",
    "requestId": "request_id",
    "occurredAt": "occurred_at",
    "ipAddress": "ip",
}
_COLUMN_SET: Final = frozenset(COLUMNS)


def mapping_fields(entry: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A mapping's fields under their own names (camelCase accepted), and the reason to
    reject it when it names a field the entry does not have (else None)."""
    fields = {ALIASES.get(key, key): value for key, value in entry.items()}
    unknown = set(fields) - _COLUMN_SET
    if unknown:
        return fields, f"unknown field(s): {', '.join(sorted(map(str, unknown)))}"
    return fields, None


#: The documented outcome vocabulary. Any other text (up to `MAX_OUTCOME_CHARS`) is stored
#: as given: an event is never refused for using a word of its own.
OUTCOMES: Final = frozenset({"success", "failure", "denied", "error", "unknown"})

#: A queued entry: (id | None, occurred_at as int ns since epoch or aware datetime, action,
#: tenant_id, actor_id, actor_type, resource_type, resource_id, outcome, ip, user_agent,
#: request_id, metadata as serialised JSON text | None). `id` None means "make one from
#: occurred_at on the writer side".
Row = tuple[Any, ...]


class Outcome(StrEnum):
    """The suggested words for what happened to the audited action (any text is stored)."""

    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"
    ERROR = "error"
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


def _id_text(value: Any) -> Any:
    # What the writer stores as text without a flag (an int or a UUID id), strict mode
    # accepts too; anything else is left for the str validation to refuse.
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, int) and not isinstance(value, (bool, Enum)):
        return int.__repr__(value)
    return value


OptName = Annotated[
    str | None,
    BeforeValidator(_id_text),
    StringConstraints(max_length=MAX_NAME_CHARS),
    AfterValidator(_check_text),
]
OptOutcome = Annotated[
    str | None, StringConstraints(max_length=MAX_OUTCOME_CHARS), AfterValidator(_check_text)
]


def _now() -> datetime:
    return datetime.now(UTC)


class AuditEntry(BaseModel):
    """One audit event: who did what, to which resource, in which tenant, when, from where.

    Building one validates every field (~6 µs) and raises for anything outside the limits.
    `AuditWriter.log()` avoids that cost on the caller's path: the writer thread stores such
    a value repaired and flagged instead (see docs/fields.md), so the two agree on the limits
    and differ only in what they do about a value past them.
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
    outcome: OptOutcome = Field(
        default=None, description="A word from OUTCOMES (see `Outcome`) or the caller's own."
    )
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

    @field_validator("ip", mode="before")
    @classmethod
    def _address_text(cls, value: Any) -> Any:
        # pydantic would take an int as an address; the writer does not (which address an
        # int means is a guess), so strict mode does not either.
        if value is None or isinstance(value, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return value
        raise ValueError(f"ip must be an address or its text, not {type(value).__name__}")

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
            check_metadata(value)  # raises ValueError with the reason
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
            None if self.outcome is None else str.__str__(self.outcome),
            self.ip,
            self.user_agent,
            self.request_id,
            None if self.metadata is None else dump_metadata(self.metadata),
        )


# A NUL character serialises as \u0000 after an even number of backslashes; the text
# "\u0000" (a real backslash) serialises with an odd number and is fine.
_JSON_NUL: Final = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
#: What PostgreSQL text cannot hold: NUL, and lone surrogates (not encodable as UTF-8).
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")
#: How deep repaired metadata may nest; deeper parts (or a cycle) become a marker.
_MAX_DEPTH: Final = 128


def storable(text: str) -> str:
    """`text` with each character PostgreSQL cannot store (NUL, lone surrogates) replaced
    by U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)


def shown(value: object, limit: int = MAX_KEPT_CHARS) -> str:
    """The text kept of a value that could not be stored as given: a str itself, anything
    else its repr(), made storable and cut to `limit` characters. Caller code that fails
    (a raising __repr__) gives the type's name instead: keeping evidence must not fail."""
    if isinstance(value, str):
        text = str.__str__(value)
    else:
        try:
            text = repr(value)
        except Exception:
            text = f"<{type(value).__name__} object>"
    return storable(text[:limit])


class RepairedJSON(str):
    """Metadata JSON text that `dump_metadata` repaired: its last key is auditq's own
    `_auditq` object. The writer merges its own flags into that object (instead of adding a
    second `_auditq` key, which would replace it); a plain str's `_auditq` key, if any, is
    the caller's, and auditq's key is added after it and so wins."""

    __slots__ = ()


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


def check_metadata(metadata: Any) -> str:
    """`metadata` as JSON text, or `ValueError` saying why it cannot be stored as given
    (the strict check: `AuditEntry` and strict writers raise where `dump_metadata` repairs)."""
    if not isinstance(metadata, dict):
        if not isinstance(metadata, Mapping):
            raise ValueError(f"metadata must be a mapping, not {type(metadata).__name__}")
        metadata = dict(metadata)
    try:
        data = orjson.dumps(metadata, default=_json_default)
    except (TypeError, orjson.JSONEncodeError) as exc:
        text = _repaired(metadata)  # integers past 64 bits need no repair, only json
        if isinstance(text, RepairedJSON):
            raise ValueError(f"metadata is not serialisable as JSON: {exc}") from None
        data = text.encode()
    size = len(data)
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes of JSON; the limit is {MAX_METADATA_BYTES}")
    text = data.decode()
    if "null" in text and _has_non_finite(metadata):
        raise ValueError("metadata must not contain NaN or Infinity: JSON has no such values")
    if "\\u0000" in text and _JSON_NUL.search(text):
        raise ValueError("metadata must not contain NUL (\\u0000): jsonb cannot store it")
    return text


def dump_metadata(metadata: Any) -> str:
    """Serialise metadata to JSON text now, so later mutation by the caller changes nothing.

    Text, not bytes: orjson's bytes keep its ~4 KiB working buffer (a full queue of 100k
    entries took ~400 MiB); decoding to an exact-size str costs ~35 ns, an exact-size bytes
    copy ~250 ns. The writer encodes it back to UTF-8 off the caller's path.

    Never raises for its content (an audit event is not lost for its metadata): what JSON
    or jsonb cannot hold is repaired and flagged, and metadata over `MAX_METADATA_BYTES` is
    replaced by a bounded summary, as `RepairedJSON` (see docs/fields.md). The common case
    costs what it did when this raised instead: the checks only run on what orjson made.
    """
    if type(metadata) is not dict:
        return _dump_other(metadata)
    try:
        data = orjson.dumps(metadata, default=_json_default)
    except Exception:  # an int past 64 bits, a value JSON has no form for, a key not text
        return _repaired(metadata)
    if len(data) > MAX_METADATA_BYTES:
        return oversized_metadata(data)
    # The scans run on the text: `in` on str costs ~35 ns, on bytes ~150 ns (3.11).
    text = data.decode()
    if "null" in text and _has_non_finite(metadata):
        return _repaired(metadata)
    if "\\u0000" in text and _JSON_NUL.search(text):
        return _repaired(metadata)
    return text


def _dump_other(metadata: Any) -> str:
    """A mapping that is not a dict is copied into one; anything else cannot be metadata
    (a JSON object) and is kept, as text, in the flags."""
    if isinstance(metadata, Mapping):
        try:
            copied = dict(metadata)
        except Exception:
            copied = None
        if copied is not None:
            return dump_metadata(copied)
    return flags_only({"invalid": ["metadata"], "metadata": shown(metadata)})


def flags_only(flags: dict[str, Any]) -> RepairedJSON:
    """Metadata holding nothing but auditq's flags."""
    return RepairedJSON(orjson.dumps({FLAGS_KEY: flags}).decode())


def oversized_metadata(data: bytes) -> RepairedJSON:
    """What is stored for metadata over `MAX_METADATA_BYTES` (its UTF-8 JSON, `data`): its
    size and the beginning of its JSON, flagged as truncated (the whole of it would make the
    row payload storage). Only the beginning is decoded: this may run on the caller's path."""
    head = data[: 4 * MAX_METADATA_PREFIX_CHARS].decode("utf-8", "ignore")
    return flags_only(
        {
            "truncated": ["metadata"],
            "metadata_bytes": len(data),
            "metadata_prefix": storable(head[:MAX_METADATA_PREFIX_CHARS]),
        }
    )


def _repaired(metadata: dict[Any, Any]) -> str:
    """`metadata` with what JSON or jsonb cannot hold replaced (NUL and lone surrogates by
    U+FFFD, NaN and Infinity by null, other values by their repr(), keys by their text),
    flagged `replaced`. Only reached when the plain serialisation failed or needs a fix.
    Never raises: when even that fails, the metadata is kept as text in the flags."""
    try:
        return _cleaned(metadata)
    except Exception:
        return flags_only({"invalid": ["metadata"], "metadata": shown(metadata)})


def _cleaned(metadata: dict[Any, Any]) -> str:
    changed = [False]

    def clean(value: Any, depth: int) -> Any:
        if isinstance(value, str):
            text = str.__str__(value)
            fixed = storable(text)
            if fixed is not text and fixed != text:
                changed[0] = True
            return fixed
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            changed[0] = True
            return None
        if value is None or isinstance(value, (bool, int)):
            return value
        if depth >= _MAX_DEPTH:
            changed[0] = True
            return "<nested too deep>"
        if isinstance(value, Mapping):
            try:
                pairs = list(value.items())
            except Exception:
                changed[0] = True
                return shown(value)
            return {key_text(k): clean(v, depth + 1) for k, v in pairs}
        if isinstance(value, (list, tuple)):
            return [clean(v, depth + 1) for v in value]
        if isinstance(value, (set, frozenset)):
            members = list(value)
            try:
                members.sort(key=repr)  # what _json_default does with a set
            except Exception:
                changed[0] = True
            return [clean(v, depth + 1) for v in members]
        try:
            plain = orjson.loads(orjson.dumps(value, default=_json_default))
        except Exception:
            changed[0] = True
            return shown(value)
        return clean(plain, depth + 1)

    def key_text(key: Any) -> str:
        if isinstance(key, str):
            return clean(key, 0)  # type: ignore[no-any-return]
        if key is None or isinstance(key, bool):
            text = orjson.dumps(key).decode()  # null, true, false: what json.dumps does
        elif isinstance(key, (int, float)):
            text = repr(key)
        else:
            text = shown(key)
        changed[0] = True
        return text

    body = clean(metadata, 0)
    if not isinstance(body, dict):  # a Mapping whose items() failed
        return flags_only({"invalid": ["metadata"], "metadata": body})
    if changed[0]:
        body.pop(FLAGS_KEY, None)  # auditq's key replaces a caller's, as in the writer
        body[FLAGS_KEY] = {"replaced": ["metadata"]}
    # The standard library's encoder: integers past 64 bits (which orjson refuses) are exact
    # JSON numbers, and jsonb keeps them as numeric.
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    if len(text) > MAX_METADATA_BYTES and len(data := text.encode()) > MAX_METADATA_BYTES:
        return oversized_metadata(data)
    return RepairedJSON(text) if changed[0] else text
