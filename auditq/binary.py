"""PostgreSQL binary COPY rows, encoded and checked in one pass on the writer thread.

psycopg's `write_row` needs a Python object per typed field (a `uuid.UUID`, a `datetime`, an
`ipaddress` object) and building those costs more than encoding the row itself (measured on
this project's machine: ~7 µs/row with object building against ~2 µs/row here). So the
writer encodes the binary tuple itself, from the caller's primitives, and streams the bytes
into `COPY ... FROM STDIN (FORMAT BINARY)`.

Text fields repeat heavily in audit traffic (tenants, actor types, actions, user agents), so
each checked-and-encoded text is cached: a cache hit is both the check and the encoding. The
caches are bounded; when one fills it is emptied and refills with what is hot now.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Final

from . import ids, native
from .entry import COLUMNS, MAX_NAME_CHARS, MAX_USER_AGENT_CHARS, OUTCOMES, Row

#: The binary COPY stream's header (signature, flags, header extension length) and trailer.
HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER: Final = b"\xff\xff"
NULL: Final = b"\xff\xff\xff\xff"
FIELD_COUNT: Final = 13
#: Where the id's 16 bytes start in a tuple: after the field count and the id's length.
_ID_AT: Final = 6

_PG_EPOCH_US: Final = 946_684_800_000_000  # 2000-01-01T00:00:00Z in Unix microseconds
_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US: Final = timedelta(microseconds=1)
_M64: Final = (1 << 64) - 1
# field count, uuid length, uuid high/low halves, timestamptz length, timestamptz value
_HEAD: Final = struct.Struct(">hiQQiq").pack
_I32: Final = struct.Struct(">i").pack
#: Entries each text cache holds before it is emptied.
CACHE_ENTRIES: Final = 16_384


class EncodeError(ValueError):
    """Why a row cannot be written; the message names the field."""


def _check_text(value: str, name: str, limit: int) -> bytes:
    """The length-prefixed UTF-8 field for `value`, or `EncodeError` naming the field."""
    if len(value) > limit:
        raise EncodeError(f"{name}: {len(value)} characters; the limit is {limit}")
    if "\x00" in value:
        raise EncodeError(f"{name}: contains NUL (\\x00), which PostgreSQL text cannot store")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EncodeError(f"{name}: not encodable as UTF-8 ({exc.reason})") from None
    return _I32(len(data)) + data


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


class _TextCache(dict[str, bytes]):
    """str -> checked, encoded field, for one length limit."""

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def field(self, value: Any, name: str) -> bytes:
        if value is None:
            return NULL
        if type(value) is str:
            hit = self.get(value)
            if hit is not None:
                return hit
            encoded = _check_text(value, name, self.limit)
            if len(self) >= CACHE_ENTRIES:
                self.clear()
            self[value] = encoded
            return encoded
        return _check_text(_coerce_text(value, name), name, self.limit)


_names = _TextCache(MAX_NAME_CHARS)
_agents = _TextCache(MAX_USER_AGENT_CHARS)
_OUTCOME_FIELDS: Final = {o: _I32(len(o)) + o.encode() for o in OUTCOMES}


def _unique_text(value: Any, name: str) -> bytes:
    # Request ids are unique per request: caching them would only evict useful entries.
    if value is None:
        return NULL
    if type(value) is not str:
        value = _coerce_text(value, name)
    return _check_text(value, name, MAX_NAME_CHARS)


# address text -> inet field; a dict (not an lru_cache) so the C encoder reads it too.
_ips: dict[str, bytes] = {}


def _inet_text(text: str) -> bytes:
    hit = _ips.get(text)
    if hit is None:
        hit = _inet(ipaddress.ip_address(text))
        if len(_ips) >= CACHE_ENTRIES:
            _ips.clear()
        _ips[text] = hit
    return hit


def _inet(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    # inet binary: family (2 = v4, 3 = v6), prefix bits, is_cidr, address length, address.
    if isinstance(address, ipaddress.IPv4Address):
        return b"\x00\x00\x00\x08\x02\x20\x00\x04" + address.packed
    if address.scope_id:
        raise ValueError("scoped IPv6 addresses (with %zone) cannot be stored in inet")
    return b"\x00\x00\x00\x14\x03\x80\x00\x10" + address.packed


def _ip_field(value: Any) -> bytes:
    try:
        if type(value) is str:
            return _inet_text(value)
        if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return _inet(value)
    except ValueError as exc:
        raise EncodeError(f"ip: {exc}") from None
    raise EncodeError(f"ip: expected an address string, got {type(value).__name__}")


def _occurred(value: Any) -> tuple[int, int]:
    """(Unix ns for the id prefix, Unix µs for the column) from the caller's timestamp."""
    if type(value) is int:
        return value, value // 1000
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise EncodeError("occurred_at: must be timezone-aware")
        micros = (value - _UNIX_EPOCH) // _ONE_US
        return micros * 1000, micros
    raise EncodeError(f"occurred_at: expected datetime, got {type(value).__name__}")


def _ident(value: Any) -> int:
    if isinstance(value, uuid.UUID):
        return value.int
    try:
        return uuid.UUID(str(value)).int
    except ValueError:
        raise EncodeError("id: not a UUID") from None


def _outcome_field(value: Any) -> bytes:
    if value is None:
        return NULL
    if isinstance(value, Enum):
        value = value.value
    found = _OUTCOME_FIELDS.get(value) if type(value) is str else None
    if found is None:
        raise EncodeError(f"outcome: {value!r:.40} is not one of {sorted(OUTCOMES)}")
    return found


#: The order COPY sends the columns in (any order works; this one puts the fields that
#: repeat across rows next to each other, so one cache hit encodes all six of them).
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
)
#: Positions in a queued `Row` (which follows `entry.COLUMNS`) of the cached group.
_GROUP_FIELDS: Final = ((2, "action"), (3, "tenant_id"), (5, "actor_type"), (6, "resource_type"))

# (action, tenant_id, actor_type, resource_type, outcome, user_agent) -> their six fields
_groups: dict[tuple[Any, ...], bytes] = {}
_VERSION_BITS: Final = 0x7000  # in the high half: version 7
_VARIANT_BITS: Final = 0x8000_0000_0000_0000  # in the low half: RFC 9562 variant
_LOW_RANDOM: Final = (1 << 62) - 1
_rand = ids.random_bits  # bound method: ids.reseed() reseeds the same generator


def _group_slow(key: tuple[Any, ...], row: Row) -> bytes:
    """Check and encode the six repeating fields; cache them when all are plain text.

    Only exact str (or None) keys are cached: `1 == True == 1.0` would otherwise let a
    value of the wrong type hit the entry of another, and both encoders trust a hit."""
    action = row[2]
    if not action:
        raise EncodeError("action: must be a non-empty string")
    parts = [_names.field(row[index], name) for index, name in _GROUP_FIELDS]
    parts.append(_outcome_field(row[8]))
    parts.append(_agents.field(row[10], "user_agent"))
    encoded = b"".join(parts)
    if all(value is None or type(value) is str for value in key):
        if len(_groups) >= CACHE_ENTRIES:
            _groups.clear()
        _groups[key] = encoded
    return encoded


def encode_row(row: Row) -> tuple[bytes, int]:
    """The binary COPY tuple for `row` (columns in `COPY_COLUMNS` order) and its id as an
    int; raises `EncodeError` naming the field.

    Written for speed: it runs once per row on the writer thread, holding the GIL the
    callers need. The common case is two dict hits, one struct pack and one join; anything
    unusual (a cache miss, a non-str value, a datetime, an explicit id) takes a slow helper.
    """
    if len(row) != FIELD_COUNT:
        raise EncodeError(f"malformed entry: {len(row)} fields")
    stamp = row[1]
    if type(stamp) is int:
        micros = stamp // 1000
    else:
        stamp, micros = _occurred(stamp)
    if row[0] is None:
        if stamp < 0:
            raise EncodeError("occurred_at: before 1970, too early for a UUIDv7 id; pass an id")
        rand = _rand(74)
        high = ((stamp // 1_000_000) << 16) | _VERSION_BITS | (rand >> 62)
        low = _VARIANT_BITS | (rand & _LOW_RANDOM)
    else:
        ident = _ident(row[0])
        high = ident >> 64
        low = ident & _M64
    key = (row[2], row[3], row[5], row[6], row[8], row[10])
    try:
        group = _groups.get(key) or _group_slow(key, row)
    except TypeError:  # unhashable value: the slow path names the field
        group = _group_slow(key, row)
    get = _names.get
    # A cache hit is the check; anything else (a miss, None, an int id, something
    # unhashable) goes through the checked path, which names the field.
    value = row[4]
    actor_f = get(value) if type(value) is str else None
    if actor_f is None:
        actor_f = _names.field(value, "actor_id")
    value = row[7]
    rid_f = get(value) if type(value) is str else None
    if rid_f is None:
        rid_f = _names.field(value, "resource_id")
    value = row[9]
    ip_f = NULL if value is None else _ip_field(value)
    value = row[11]
    request_f = NULL if value is None else _unique_text(value, "request_id")
    meta = row[12]
    if meta is None:
        meta_len = NULL
        meta = b""
        version = b""
    elif type(meta) is str:
        meta = meta.encode()
        meta_len = _I32(len(meta) + 1)
        version = b"\x01"
    else:
        raise EncodeError("metadata: expected serialised JSON text")
    return (
        b"".join(
            (
                _HEAD(FIELD_COUNT, 16, high, low, 8, micros - _PG_EPOCH_US),
                group,
                actor_f,
                rid_f,
                ip_f,
                request_f,
                meta_len,
                version,
                meta,
            )
        ),
        (high << 64) | low,
    )


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
    rows: Sequence[Row], items: list[Item], bad: list[tuple[Row, str]]
) -> bytes:
    """`encode_chunk` in Python: the reference the C encoder is tested against."""
    start = len(items)
    append = items.append
    for row in rows:
        try:
            data = encode_row(row)[0]
        except Exception as exc:  # EncodeError, or a caller-supplied value's __str__ failing
            bad.append((row, str(exc) or type(exc).__name__))
            continue
        append((data, row))
    return b"".join([item[0] for item in items[start:]])


if native.speedups is not None:
    native.speedups.configure(_groups, _ips, encode_row, os.urandom)
#: True when rows are encoded by the C extension (`auditq._speedups`).
ACCELERATED: Final = native.speedups is not None

#: `encode_chunk(rows, items, bad) -> bytes`: encode `rows`; append `(tuple, row)` to
#: `items` for each good row and `(row, reason)` to `bad` for each rejected one; return the
#: good rows' tuples joined, ready for one COPY write. The C encoder takes the common row
#: and hands anything else to `encode_row`, so both produce the same bytes and errors
#: (ids aside: each draws its own random bits).
encode_chunk: Callable[[Sequence[Row], list[Item], list[tuple[Row, str]]], bytes] = (
    _encode_chunk_python if native.speedups is None else native.speedups.encode_chunk
)


def _encode_block_python(rows: Sequence[Row], kept: list[Row], bad: list[tuple[Row, str]]) -> bytes:
    """`encode_block` in Python, through `encode_chunk`'s reference."""
    items: list[Item] = []
    data = _encode_chunk_python(rows, items, bad)
    kept.extend(item[1] for item in items)  # type: ignore[misc]
    return data


#: `encode_block(rows, kept, bad) -> bytes`: `encode_chunk` without an Item per row, for the
#: first attempt at a COPY, which usually succeeds and then needs nothing but the bytes it
#: sent. Each good row is appended to `kept`; `items_of_block` makes the Items when a retry
#: needs them. Saves a bytes object, a tuple and a copy per row on the writer thread (which
#: shares the GIL with the callers).
encode_block: Callable[[Sequence[Row], list[Row], list[tuple[Row, str]]], bytes] = (
    _encode_block_python if native.speedups is None else native.speedups.encode_block
)


def items_of_block(data: bytes, kept: Sequence[Row]) -> list[Item]:
    """The Items of one `encode_block` result (for a retry, a split or a dead letter): its
    tuples cut apart as the spool cuts a record's."""
    return list(zip(split_rows(data), kept, strict=True))


# -- decoding, for dead letters and `auditq spool inspect` --------------------------------


def decode_row(data: bytes) -> dict[str, Any]:
    """A binary tuple made by `encode_row` as a JSON-friendly dict."""
    (count,) = struct.unpack_from(">h", data, 0)
    offset = 2
    out: dict[str, Any] = {}
    for index in range(count):
        (length,) = struct.unpack_from(">i", data, offset)
        offset += 4
        name = COPY_COLUMNS[index] if index < len(COPY_COLUMNS) else f"field{index}"
        if length < 0:
            out[name] = None
            continue
        raw = data[offset : offset + length]
        offset += length
        if index == 0:
            out[name] = str(uuid.UUID(bytes=raw))
        elif index == 1:
            (micros,) = struct.unpack(">q", raw)
            out[name] = (_UNIX_EPOCH + timedelta(microseconds=micros + _PG_EPOCH_US)).isoformat()
        elif name == "ip":
            out[name] = str(ipaddress.ip_address(raw[4:]))
        elif name == "metadata":
            out[name] = raw[1:].decode("utf-8", "replace")
        else:
            out[name] = raw.decode("utf-8", "replace")
    return out


def describe_row(row: Row) -> dict[str, Any]:
    """A JSON-friendly view of a queued row (which may hold anything the caller passed)."""
    view: dict[str, Any] = {}
    for name, value in zip(COLUMNS, row, strict=False):
        if name == "occurred_at" and type(value) is int:
            value = (_UNIX_EPOCH + timedelta(microseconds=value // 1000)).isoformat()
        elif name == "metadata" and isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, str):
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        elif value is not None and not isinstance(value, (int, float, bool)):
            value = _shown(value)
        view[name] = value
    return view


def _shown(value: object) -> str:
    """str() of a uuid or datetime, else repr(); a caller's object whose repr() fails is
    named by its type and address (a dead letter must never fail to be reported)."""
    try:
        return str(value) if isinstance(value, (uuid.UUID, datetime)) else repr(value)
    except Exception:
        return object.__repr__(value)


def split_rows(data: bytes) -> list[bytes]:
    """Cut a concatenation of binary tuples back into one bytes object per tuple."""
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
        rows.append(data[start:offset])
    return rows
