"""PostgreSQL binary COPY rows, encoded and checked in one pass on the writer thread.

psycopg's `write_row` needs a Python object per typed field (a `uuid.UUID`, a `datetime`, an
`ipaddress` object) and building those costs more than encoding the row itself (measured on
this project's machine: ~7 µs/row with object building against ~2 µs/row here). So the
writer encodes the binary tuple itself, from the caller's primitives, and streams the bytes
into `COPY ... FROM STDIN (FORMAT BINARY)`.

Text fields repeat heavily in audit traffic (tenants, actor types, actions, user agents), so
each checked-and-encoded text is cached: a cache hit is both the check and the encoding. The
caches are bounded; when one fills it is emptied and refills with what is hot now. Only exact
`str` keys are cached (a subclass may define equality as it likes) and only values stored as
given, so a hit never needs a repair.

An event is never lost for its content: a value the table cannot hold as given is stored
repaired (cut, characters replaced, NULL) and the row records what was repaired in
`metadata._auditq` (docs/fields.md has the table). The flags are added to the caller's
metadata JSON without parsing it. Only a row that cannot be a row (no action) or whose
values' own code raises is rejected, with a reason.

Every tuple ends with the writer's `origin`, encoded once per writer (`origin_field`) and
passed to `encode_chunk` / `encode_block`, so a row pays one copy of a few bytes for it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Final, Protocol

import orjson

from . import ids, native
from .entry import (
    COLUMNS,
    FLAGS_KEY,
    MAX_METADATA_BYTES,
    MAX_NAME_CHARS,
    MAX_OUTCOME_CHARS,
    MAX_USER_AGENT_CHARS,
    RepairedJSON,
    Row,
    oversized_metadata,
    shown,
    storable,
)

#: The binary COPY stream's header (signature, flags, header extension length) and trailer.
HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER: Final = b"\xff\xff"
NULL: Final = b"\xff\xff\xff\xff"
#: Fields in a COPY tuple: the queued `Row`'s 13 and the writer's `origin`.
FIELD_COUNT: Final = 14
#: Where the id's 16 bytes start in a tuple: after the field count and the id's length.
_ID_AT: Final = 6

_PG_EPOCH_US: Final = 946_684_800_000_000  # 2000-01-01T00:00:00Z in Unix microseconds
#: The timestamptz range PostgreSQL accepts, in its own microseconds (4714 BC to 294277).
_PG_MIN_US: Final = -211_813_488_000_000_000
_PG_END_US: Final = 9_223_371_331_200_000_000
_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US: Final = timedelta(microseconds=1)
_M64: Final = (1 << 64) - 1
# field count, uuid length, uuid high/low halves, timestamptz length, timestamptz value
_HEAD: Final = struct.Struct(">hiQQiq").pack
_I32: Final = struct.Struct(">i").pack
#: Entries each cache holds before it is emptied.
CACHE_ENTRIES: Final = 16_384


class EncodeError(ValueError):
    """Why a row cannot be written; the message names the field."""


# -- repairs: what the row records in metadata._auditq (see docs/fields.md) -------------

#: A repair made while encoding one row: (kind, field, text kept of the original or None).
#: Kinds: "truncated" (cut to its limit), "replaced" (characters PostgreSQL cannot store
#: replaced by U+FFFD), "invalid" (not storable as given: stored NULL, or replaced for id
#: and occurred_at, the original's text kept under the field's name), "assumed_utc".
Flag = tuple[str, str, str | None]
_KINDS: Final = ("truncated", "replaced", "invalid", "assumed_utc")
_COLUMN_ORDER: Final = {name: n for n, name in enumerate(COLUMNS)}


def _flags_object(flags: list[Flag], into: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `_auditq` object for `flags`, merged into `into` (flags already recorded)."""
    out: dict[str, Any] = {} if into is None else into
    for kind in _KINDS:
        fields = {field for k, field, _ in flags if k == kind}
        known = out.get(kind)
        if isinstance(known, list):
            fields.update(f for f in known if isinstance(f, str))
        if fields:
            out[kind] = sorted(fields, key=lambda f: (_COLUMN_ORDER.get(f, 99), f))
    for _, field, kept in flags:
        if kept is not None:
            out[field] = kept
    return out


def _with_flags(text: str | None, flags: list[Flag]) -> str:
    """Metadata JSON text with `flags` recorded under `_auditq`. A plain text (the caller's
    JSON object, from `dump_metadata`) is not parsed: the key is added before its final
    brace, so it comes last and wins over a caller's own `_auditq` (jsonb keeps the last of
    duplicate keys). A `RepairedJSON` already ends with auditq's key: merged into it."""
    if text is None:
        return orjson.dumps({FLAGS_KEY: _flags_object(flags)}).decode()
    if isinstance(text, RepairedJSON):
        # The standard library's parser: orjson reads integers past 64 bits as floats.
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict):
            known = body.pop(FLAGS_KEY, None)
            body[FLAGS_KEY] = _flags_object(flags, known if isinstance(known, dict) else None)
            return json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    body = text.rstrip()
    if not body.endswith("}") or not body.lstrip().startswith("{"):
        # Not a JSON object (a hand-made row): kept as text, like any value not storable.
        flags = [*flags, ("invalid", "metadata", shown(text))]
        return orjson.dumps({FLAGS_KEY: _flags_object(flags)}).decode()
    head = body[:-1].rstrip()
    # "{" before the final brace can only be the object's own opening one: it is empty.
    separator = "" if head.endswith("{") else ","
    added = orjson.dumps(_flags_object(flags)).decode()
    return f'{head}{separator}"{FLAGS_KEY}":{added}}}'


# -- text fields ------------------------------------------------------------------------


def _clean_field(text: str, limit: int) -> bytes | None:
    """The length-prefixed UTF-8 field for `text` when it can be stored as given, else None."""
    if len(text) > limit or "\x00" in text:
        return None
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return None
    return _I32(len(data)) + data


def _repaired_field(text: str, name: str, limit: int, flags: list[Flag]) -> bytes:
    """`text` cut to `limit` characters and with NUL and lone surrogates replaced by U+FFFD,
    each repair flagged."""
    if len(text) > limit:
        text = text[:limit]
        flags.append(("truncated", name, None))
    fixed = storable(text)
    if fixed != text:
        flags.append(("replaced", name, None))
    data = fixed.encode("utf-8")
    return _I32(len(data)) + data


def _coerce_text(value: Any) -> str | None:
    """The text form of an id-like value, or None when it has no unambiguous one."""
    # Ids are often ints or UUIDs in the caller's code. The base classes' own methods give
    # their text: a subclass's __str__ is not asked (it could say anything, or raise).
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, Enum):
        inner = value.value
        return str.__str__(inner) if isinstance(inner, str) else _coerce_text(inner)
    if isinstance(value, int) and not isinstance(value, bool):
        return int.__repr__(value)
    if isinstance(value, uuid.UUID):
        return uuid.UUID.__str__(value)
    return None


def _text_field(value: Any, name: str, limit: int, flags: list[Flag]) -> bytes:
    """Any value of a text column, uncached: coerced, checked, repaired when needed."""
    if value is None:
        return NULL
    text = value if type(value) is str else _coerce_text(value)
    if text is None:
        flags.append(("invalid", name, shown(value)))
        return NULL
    return _clean_field(text, limit) or _repaired_field(text, name, limit, flags)


class _TextCache(dict[str, bytes]):
    """str -> encoded field, for one length limit. Only exact str keys, and only values
    stored as given: a hit is both the check and the encoding, and flags nothing."""

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def field(self, value: Any, name: str, flags: list[Flag]) -> bytes:
        if type(value) is str:
            hit = self.get(value)
            if hit is not None:
                return hit
            encoded = _clean_field(value, self.limit)
            if encoded is None:
                return _repaired_field(value, name, self.limit, flags)
            if len(self) >= CACHE_ENTRIES:
                self.clear()
            self[value] = encoded
            return encoded
        return _text_field(value, name, self.limit, flags)


_names = _TextCache(MAX_NAME_CHARS)
_outcomes = _TextCache(MAX_OUTCOME_CHARS)
_agents = _TextCache(MAX_USER_AGENT_CHARS)


# -- addresses --------------------------------------------------------------------------

# address text -> inet field; a dict (not an lru_cache) so the C encoder reads it too.
_ips: dict[str, bytes] = {}


def _inet(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    # inet binary: family (2 = v4, 3 = v6), prefix bits, is_cidr, address length, address.
    if isinstance(address, ipaddress.IPv4Address):
        return b"\x00\x00\x00\x08\x02\x20\x00\x04" + address.packed
    if address.scope_id:
        raise ValueError("scoped IPv6 addresses (with %zone) cannot be stored in inet")
    return b"\x00\x00\x00\x14\x03\x80\x00\x10" + address.packed


def _ip_field(value: Any, flags: list[Flag]) -> bytes:
    """An address that does not parse (or is scoped, which inet cannot hold) is stored as
    NULL, its text kept in the flags."""
    if value is None:
        return NULL
    if type(value) is str:
        hit = _ips.get(value)
        if hit is not None:
            return hit
        try:
            hit = _inet(ipaddress.ip_address(value))
        except ValueError:
            flags.append(("invalid", "ip", shown(value)))
            return NULL
        if len(_ips) >= CACHE_ENTRIES:
            _ips.clear()
        _ips[value] = hit
        return hit
    try:
        if isinstance(value, str):
            return _inet(ipaddress.ip_address(str.__str__(value)))
        if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return _inet(value)
    except ValueError:
        pass
    kept = value if isinstance(value, str) else None
    if kept is None and isinstance(value, ipaddress.IPv6Address):
        kept = ipaddress.IPv6Address.__str__(value)
    flags.append(("invalid", "ip", shown(value if kept is None else kept)))
    return NULL


# -- time and id ------------------------------------------------------------------------


def _occurred(value: Any, flags: list[Flag]) -> tuple[int, int]:
    """(Unix ns for the id prefix, PostgreSQL µs for the column) from the caller's time. A
    naive datetime is taken as UTC (what `datetime.utcnow()` gives); a value that is no time
    PostgreSQL can hold is replaced by the time it is encoded, its text kept."""
    if type(value) is int:
        micros = value // 1000 - _PG_EPOCH_US
        if _PG_MIN_US <= micros < _PG_END_US:
            return value, micros
    elif isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            value = value.replace(tzinfo=UTC)
            flags.append(("assumed_utc", "occurred_at", None))
        micros = (value - _UNIX_EPOCH) // _ONE_US
        return micros * 1000, micros - _PG_EPOCH_US
    flags.append(("invalid", "occurred_at", shown(value)))
    now = time.time_ns()
    return now, now // 1000 - _PG_EPOCH_US


def _ident(value: Any, flags: list[Flag]) -> int | None:
    """An explicit id as an int; None (a new id is made, the value kept) when it is not a
    UUID."""
    if isinstance(value, uuid.UUID):
        return value.int
    try:
        return uuid.UUID(str(value)).int
    except ValueError:
        flags.append(("invalid", "id", shown(value)))
        return None


#: The order COPY sends the columns in (any order works; this one puts the fields that
#: repeat across rows next to each other, so one cache hit encodes all six of them).
#: `origin` is the writer's, the same for all its rows: last, after the row's own fields.
COPY_COLUMNS: Final = (
    "id",
    "occurred_at",
    "action",
    "tenant_id",
    "actor_type",
    "resource_type",
    "outcome",
    "user_agent",
    "actor_id",
    "resource_id",
    "ip",
    "request_id",
    "metadata",
    "origin",
)
#: Positions in a queued `Row` (which follows `entry.COLUMNS`) of the cached group.
_GROUP_FIELDS: Final = ((3, "tenant_id"), (5, "actor_type"), (6, "resource_type"))
_PLAIN: Final = frozenset({str, type(None)})

# (action, tenant_id, actor_type, resource_type, outcome, user_agent) -> their six fields
_groups: dict[tuple[Any, ...], bytes] = {}
_VERSION_BITS: Final = 0x7000  # in the high half: version 7
_VARIANT_BITS: Final = 0x8000_0000_0000_0000  # in the low half: RFC 9562 variant
_LOW_RANDOM: Final = (1 << 62) - 1
_MAX_MS: Final = 1 << 48  # a UUIDv7 holds 48 bits of Unix milliseconds
#: Int timestamps below this need no range check (the C encoder's fast path takes them).
_FAST_NS: Final = 1 << 63
_rand = ids.random_bits  # bound method: ids.reseed() reseeds the same generator


def _group_slow(key: tuple[Any, ...], row: Row, flags: list[Flag]) -> bytes:
    """Check and encode the six repeating fields; cache them when all are plain text stored
    as given.

    Only exact str (or None) keys are cached: `1 == True == 1.0` (or a str subclass with
    an __eq__ of its own) would otherwise let another value hit the entry, and both
    encoders trust a hit."""
    action = row[2]
    if action is None or (isinstance(action, str) and not action):
        raise EncodeError("action: must be a non-empty string")
    own: list[Flag] = []
    action_f = _names.field(action, "action", own)
    if action_f is NULL:
        raise EncodeError(f"action: expected text, got {type(action).__name__}")
    parts = [action_f]
    parts.extend(_names.field(row[index], name, own) for index, name in _GROUP_FIELDS)
    outcome = row[8]
    parts.append(NULL if outcome is None else _outcomes.field(outcome, "outcome", own))
    value = row[10]
    parts.append(NULL if value is None else _agents.field(value, "user_agent", own))
    encoded = b"".join(parts)
    if own:
        flags.extend(own)
    elif {type(value) for value in key} <= _PLAIN:
        if len(_groups) >= CACHE_ENTRIES:
            _groups.clear()
        _groups[key] = encoded
    return encoded


def _metadata_field(meta: Any, flags: list[Flag]) -> tuple[bytes, bytes, bytes]:
    """(length, jsonb version byte, JSON) for the metadata with the row's flags added."""
    if meta is not None and type(meta) is not str and not isinstance(meta, RepairedJSON):
        if isinstance(meta, str):
            meta = str.__str__(meta)
        else:
            flags.append(("invalid", "metadata", shown(meta)))
            meta = None
    if meta is not None:
        try:
            data = meta.encode()
        except UnicodeEncodeError:  # lone surrogates: only in a hand-made row
            meta = storable(meta)
            flags.append(("replaced", "metadata", None))
            data = meta.encode()
        if len(data) > MAX_METADATA_BYTES:
            meta = oversized_metadata(data)
    if flags:
        meta = _with_flags(meta, flags)
    elif meta is None:
        return NULL, b"", b""
    data = meta.encode()
    return _I32(len(data) + 1), b"\x01", data


def encode_row(row: Row, origin: bytes = NULL) -> tuple[bytes, int]:
    """The binary COPY tuple for `row` (columns in `COPY_COLUMNS` order, `origin` being the
    writer's pre-encoded field, see `origin_field`) and its id as an int.

    A value the table cannot hold as given is stored repaired and flagged in the row's
    metadata (docs/fields.md). Raises `EncodeError` only for a row that cannot be a row (no
    action, not a Row), or when the caller's own code (a __str__, an Enum's value) raises,
    whatever it raises: that must never escape into the writer thread.
    """
    # Written for speed as the Python reference (the C encoder does the common row): two
    # dict hits, one struct pack and one join; anything unusual takes a slow helper. The
    # try costs nothing until something raises.
    try:
        if len(row) != len(COLUMNS):
            raise EncodeError(f"malformed entry: {len(row)} fields")
        flags: list[Flag] = []
        stamp = row[1]
        if type(stamp) is int and 0 <= stamp < _FAST_NS:
            micros = stamp // 1000 - _PG_EPOCH_US
        else:
            stamp, micros = _occurred(stamp, flags)
            if not 0 <= stamp // 1_000_000 < _MAX_MS:  # before 1970, or past UUIDv7's range
                stamp = time.time_ns()  # for the id only
        ident = None if row[0] is None else _ident(row[0], flags)
        if ident is None:
            rand = _rand(74)
            high = ((stamp // 1_000_000) << 16) | _VERSION_BITS | (rand >> 62)
            low = _VARIANT_BITS | (rand & _LOW_RANDOM)
        else:
            high = ident >> 64
            low = ident & _M64
        key = action, tenant, actor_type, resource_type, outcome, agent = (
            row[2], row[3], row[5], row[6], row[8], row[10]
        )  # fmt: skip
        group = None
        # Only exact str (or None) may hit: a str subclass may equal a cached key and differ.
        if (
            type(action) is str
            and (tenant is None or type(tenant) is str)
            and (actor_type is None or type(actor_type) is str)
            and (resource_type is None or type(resource_type) is str)
            and (outcome is None or type(outcome) is str)
            and (agent is None or type(agent) is str)
        ):
            group = _groups.get(key)
        if group is None:
            group = _group_slow(key, row, flags)
        get = _names.get
        # A cache hit is the check; anything else (a miss, None, an int id, something
        # unhashable) goes through the checked path.
        value = row[4]
        actor_f = get(value) if type(value) is str else None
        if actor_f is None:
            actor_f = NULL if value is None else _names.field(value, "actor_id", flags)
        value = row[7]
        rid_f = get(value) if type(value) is str else None
        if rid_f is None:
            rid_f = NULL if value is None else _names.field(value, "resource_id", flags)
        value = row[9]
        ip_f = NULL if value is None else _ip_field(value, flags)
        value = row[11]
        # Request ids are unique per request: caching them would only evict useful entries.
        request_f = (
            NULL if value is None else _text_field(value, "request_id", MAX_NAME_CHARS, flags)
        )
        meta = row[12]
        meta_data = b""
        if type(meta) is str and not flags and len(meta) <= MAX_METADATA_BYTES // 4:
            try:  # short enough to be under the limit in any encoding
                meta_data = meta.encode()
            except UnicodeEncodeError:  # lone surrogates (a hand-made row): repaired below
                pass
        if meta_data:
            meta_len, version = _I32(len(meta_data) + 1), b"\x01"
        elif meta is None and not flags:
            meta_len, version = NULL, b""
        else:
            meta_len, version, meta_data = _metadata_field(meta, flags)
        return (
            b"".join(
                (
                    _HEAD(FIELD_COUNT, 16, high, low, 8, micros),
                    group,
                    actor_f,
                    rid_f,
                    ip_f,
                    request_f,
                    meta_len,
                    version,
                    meta_data,
                    origin,
                )
            ),
            (high << 64) | low,
        )
    except EncodeError:
        raise
    except BaseException as exc:
        raise EncodeError(f"a value's own code failed while it was encoded: {_said(exc)}") from None


def origin_field(origin: str | None) -> bytes:
    """A writer's `origin` (where its events occur: service and host), encoded once for all
    its rows; NULL for None. Raises `ValueError` for an origin the table could not store as
    given: it is configuration, refused when the writer is made, not repaired per row."""
    if origin is None:
        return NULL
    if not isinstance(origin, str):
        raise ValueError(f"origin must be text, not {type(origin).__name__}")
    encoded = _clean_field(str.__str__(origin), MAX_NAME_CHARS)
    if encoded is None:
        raise ValueError(
            f"origin must be at most {MAX_NAME_CHARS} characters of UTF-8 text without NUL"
        )
    return encoded


def upgrade_row(data: bytes) -> bytes:
    """A tuple spooled before `origin` existed (13 fields) with a NULL origin added, so it
    matches `COPY_COLUMNS`; a current one as it is."""
    if data[:2] == b"\x00\x0d":
        return b"\x00\x0e" + data[2:] + NULL
    return data


def _said(exc: BaseException) -> str:
    """What an exception says, for a reason: its type and message. Its own __str__ may
    raise (or return something else): then its type's name."""
    try:
        text = str(exc)
    except BaseException:
        text = ""
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _reason(exc: BaseException) -> str:
    """Why a row was rejected: str(exc), or its type's name when that is empty or fails
    (the C encoder's `reason_of` says the same)."""
    try:
        text = str(exc)
    except BaseException:
        text = ""
    return text or type(exc).__name__


#: A row on its way to the table: (its binary COPY tuple, the queued Row, or None when it
#: came back from the spool).
Item = tuple[bytes, Row | None]


def item_id(item: Item) -> int:
    """The id of an encoded row, read back from its tuple (needed only to tell which rows
    a replay inserted, so it is not kept beside every row)."""
    return int.from_bytes(item[0][_ID_AT : _ID_AT + 16], "big")


def entry_view(item: Item) -> Row | dict[str, Any]:
    """What a dead letter shows of `item`: its queued Row, or the row decoded back when it
    came from the spool, which keeps only the encoded bytes."""
    row = item[1]
    return decode_row(item[0]) if row is None else row


def _encode_chunk_python(
    rows: Sequence[Row], items: list[Item], bad: list[tuple[Row, str]], origin: bytes = NULL
) -> bytes:
    """`encode_chunk` in Python: the reference the C encoder is tested against."""
    start = len(items)
    append = items.append
    for row in rows:
        try:
            data = encode_row(row, origin)[0]
        except BaseException as exc:  # EncodeError; nothing else escapes encode_row
            bad.append((row, _reason(exc)))
            continue
        append((data, row))
    return b"".join([item[0] for item in items[start:]])


if native.speedups is not None:
    native.speedups.configure(_groups, _ips, encode_row, os.urandom)
#: True when rows are encoded by the C extension (`auditq._speedups`).
ACCELERATED: Final = native.speedups is not None


#: `encode_chunk(rows, items, bad, origin=NULL) -> bytes`: encode `rows`; append
#: `(tuple, row)` to `items` for each good row and `(row, reason)` to `bad` for each
#: rejected one; return the good rows' tuples joined, ready for one COPY write. `origin` is
#: the writer's pre-encoded origin field (`origin_field`), the last field of every tuple:
#: made once per writer, so a row pays one copy of it. The C encoder takes the common row
#: and hands anything else to `encode_row`, so both produce the same bytes, repairs and
#: errors (ids aside: each draws its own random bits).
class EncodeChunk(Protocol):
    """`encode_chunk`'s signature, which the C and the Python encoder share."""

    def __call__(
        self,
        rows: Sequence[Row],
        items: list[Item],
        bad: list[tuple[Row, str]],
        origin: bytes = ...,
        /,
    ) -> bytes: ...


class EncodeBlock(Protocol):
    """`encode_block`'s signature, which the C and the Python encoder share."""

    def __call__(
        self,
        rows: Sequence[Row],
        kept: list[Row],
        bad: list[tuple[Row, str]],
        origin: bytes = ...,
        /,
    ) -> bytes: ...


encode_chunk: EncodeChunk = (
    _encode_chunk_python if native.speedups is None else native.speedups.encode_chunk
)


def _encode_block_python(
    rows: Sequence[Row], kept: list[Row], bad: list[tuple[Row, str]], origin: bytes = NULL
) -> bytes:
    """`encode_block` in Python, through `encode_chunk`'s reference."""
    items: list[Item] = []
    data = _encode_chunk_python(rows, items, bad, origin)
    kept.extend(item[1] for item in items)  # type: ignore[misc]
    return data


#: `encode_block(rows, kept, bad, origin=NULL) -> bytes`: `encode_chunk` without an Item
#: per row, for the first attempt at a COPY, which usually succeeds and then needs nothing
#: but the bytes it sent. Each good row is appended to `kept`; `items_of_block` makes the
#: Items when a retry needs them. Saves a bytes object, a tuple and a copy per row on the
#: writer thread (which shares the GIL with the callers).
encode_block: EncodeBlock = (
    _encode_block_python if native.speedups is None else native.speedups.encode_block
)


def items_of_block(data: bytes, kept: Sequence[Row]) -> list[Item]:
    """The Items of one `encode_block` result (for a retry, a split or a dead letter): its
    tuples cut apart as the spool cuts a record's."""
    return list(zip(split_rows(data), kept, strict=True))


# -- decoding, for dead letters and `auditq spool inspect` --------------------------------


def decode_row(data: bytes) -> dict[str, Any]:
    """A binary tuple made by `encode_row` as a JSON-friendly dict. Total: a field that
    does not decode is shown as hex (`"\\x..."`, as PostgreSQL shows bytea), and bytes past
    what the tuple's lengths account for as `"undecoded"`; a damaged record must still be
    reported, never stop a replay."""
    out: dict[str, Any] = {}
    end = len(data)
    if end < 2:
        out["undecoded"] = _hex(data)
        return out
    (count,) = struct.unpack_from(">h", data, 0)
    offset = 2
    for index in range(max(count, 0)):
        if offset + 4 > end:
            break
        (length,) = struct.unpack_from(">i", data, offset)
        offset += 4
        name = _DECODED_NAMES[index] if index < len(_DECODED_NAMES) else f"field{index}"
        if length < 0:
            out[name] = None
            continue
        if offset + length > end:
            offset -= 4
            break
        raw = data[offset : offset + length]
        offset += length
        try:
            out[name] = _decoded(index, name, raw)
        except Exception:
            out[name] = _hex(raw)
    if offset < end:
        out["undecoded"] = _hex(data[offset:])
    return out


#: Names of the fields `decode_row` shows: the writer's columns, then the two a chained row
#: carries (`chain.LEAF_COLUMNS_V1`).
_DECODED_NAMES: Final = (*COPY_COLUMNS, "chain_stream", "chain_pos")


def _decoded(index: int, name: str, raw: bytes) -> Any:
    if name == "chain_stream":
        return str(uuid.UUID(bytes=raw))
    if name == "chain_pos":
        return struct.unpack(">q", raw)[0]
    if index == 0:
        return str(uuid.UUID(bytes=raw))
    if index == 1:
        (micros,) = struct.unpack(">q", raw)
        return (_UNIX_EPOCH + timedelta(microseconds=micros + _PG_EPOCH_US)).isoformat()
    if name == "ip":
        if raw[:4] not in (b"\x02\x20\x00\x04", b"\x03\x80\x00\x10") or len(raw) != 4 + raw[3]:
            raise ValueError("not an inet field of one address")
        return str(ipaddress.ip_address(raw[4:]))
    if name == "metadata":
        if raw[:1] != b"\x01":
            raise ValueError("not jsonb version 1")
        return raw[1:].decode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def _hex(raw: bytes) -> str:
    return "\\x" + raw.hex()


def describe_row(row: Row, origin: str | None = None) -> dict[str, Any]:
    """A JSON-friendly view of a queued row (which may hold anything the caller passed),
    with the writer's `origin` when given (a queued row does not hold it)."""
    view: dict[str, Any] = {}
    for name, value in zip(COLUMNS, row, strict=False):
        if name == "occurred_at" and type(value) is int:
            try:
                value = (_UNIX_EPOCH + timedelta(microseconds=value // 1000)).isoformat()
            except OverflowError:
                pass
        elif name == "metadata" and isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, str):
            value = str.__str__(value).encode("utf-8", "backslashreplace").decode("utf-8")
        elif value is not None and not isinstance(value, (int, float, bool)):
            value = _shown(value)
        view[name] = value
    if origin is not None:
        view["origin"] = origin
    return view


def _shown(value: object) -> str:
    """str() of a uuid or datetime, else repr(); a caller's object whose repr() fails is
    named by its type and address (a dead letter must never fail to be reported)."""
    try:
        return str(value) if isinstance(value, (uuid.UUID, datetime)) else repr(value)
    except BaseException:
        return object.__repr__(value)


def split_rows(data: bytes) -> list[bytes]:
    """Cut a concatenation of binary tuples back into one bytes object per tuple. A tuple
    spooled before `origin` existed comes out with a NULL one (`upgrade_row`), so a spool
    left by an older version replays into today's columns."""
    rows: list[bytes] = []
    offset = 0
    end = len(data)
    while offset < end:
        start = offset
        (count,) = struct.unpack_from(">h", data, offset)
        offset += 2
        for _ in range(count):
            (length,) = struct.unpack_from(">i", data, offset)
            offset += 4 + max(length, 0)
        row = data[start:offset]
        rows.append(row if count == FIELD_COUNT else upgrade_row(row))
    return rows


def _occurred_span_python(data: bytes) -> tuple[int, int] | None:
    """`occurred_span` in Python."""
    first = last = None
    offset, end = 0, len(data)
    try:
        while offset < end:
            (count,) = struct.unpack_from(">h", data, offset)
            offset += 2
            if count < 2:
                return None
            for field in range(count):
                (length,) = struct.unpack_from(">i", data, offset)
                offset += 4
                if field == 1:
                    if length != 8:
                        return None
                    (micros,) = struct.unpack_from(">q", data, offset)
                    first = micros if first is None else min(first, micros)
                    last = micros if last is None else max(last, micros)
                offset += max(length, 0)
    except struct.error:
        return None
    if first is None or last is None or offset != end:
        return None
    return first, last


#: `occurred_span(data) -> (first, last) | None`: the earliest and latest occurred_at
#: (microseconds since 2000-01-01 UTC) of the encoded tuples in `data`, which decides
#: whether a COPY may go straight into one partition (`auditq.routes`).
occurred_span: Callable[[bytes], tuple[int, int] | None] = (
    _occurred_span_python if native.speedups is None else native.speedups.occurred_span
)
