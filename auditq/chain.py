"""Hash chains over audit rows: the canonical encoding, leaf and node hashes, batch digests.

The one specification of what a row's hash covers (docs/tamper-evidence.md restates it). It
is written here in Python and again in C (`_chain.c`); the C functions are used when the
extension is built, and the tests hold both to the same bytes.

Why binary COPY tuples: the writer already holds each row as the tuple it sends, and the
verifier reads rows back with `COPY ... TO STDOUT (FORMAT binary)`, so both sides see the
same bytes for every column (uuid, timestamptz, text, inet and bigint round-trip exactly)
except `jsonb`, which PostgreSQL re-serialises. That one field is replaced by a structural
canonical form both sides compute from the JSON text they hold.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

from . import native

#: The columns a v1 leaf covers, in the order their fields appear in the tuple it hashes:
#: the writer's COPY columns (`binary.COPY_COLUMNS`, `origin` last), then the two chain
#: columns the writer appends. Frozen: a change is a new leaf version.
LEAF_COLUMNS_V1: Final = (
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
    "chain_stream",
    "chain_pos",
)
#: Where in a v1 tuple the jsonb field is (replaced by its canonical form before hashing).
JSON_FIELD_V1: Final = 12
#: Fields of a tuple `stamp` takes: the v1 columns before the chain columns.
STAMPED_FIELDS_V1: Final = len(LEAF_COLUMNS_V1) - 2
LEAF_VERSION: Final = 1
#: Tag that starts every leaf's hashed entry (after RFC 6962's 0x00 leaf prefix).
LEAF_TAG: Final = b"AQL1"
#: Tag that starts every digest's hashed body.
DIGEST_TAG: Final = b"AQD1"
HASH_SIZE: Final = 32
#: The previous hash of a stream's first digest.
GENESIS: Final = bytes(HASH_SIZE)
#: SHA-256 of the empty string: RFC 6962's root of an empty tree (a batch whose rows were
#: all skipped).
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()

_I16: Final = struct.Struct(">h")
_I32: Final = struct.Struct(">i")
_U32: Final = struct.Struct(">I")
_Q: Final = struct.Struct(">Q")


class Skip(IntEnum):
    """Why a position in a stream holds no row (recorded in the digest that covers it)."""

    #: The database refused the row (poison-row isolation) and it was dead-lettered.
    DEAD_LETTER = 1
    #: The writer gave up on the row at shutdown (no spool) and it was dead-lettered.
    ABANDONED = 2
    #: An idempotent replay found another row with the same id stored (not this batch's
    #: own earlier commit): the row was dead-lettered as a duplicate.
    DUPLICATE_ID = 3


class CanonicalError(ValueError):
    """The JSON text is not JSON (a writer bug or a damaged row)."""


# -- canonical JSON (the `jsonb` field) ----------------------------------------------------


class _Number(str):
    """A JSON number kept as its text, so no float rounding happens before normalising."""

    __slots__ = ()


def canonical_number(text: str) -> bytes:
    """A decimal number's canonical text: `[-]DIGITSeEXP`, DIGITS without leading or trailing
    zeros, or `0`. `1.50`, `15e-1` and `1.5E0` all give `15e-1`; `-0.0` gives `0` (jsonb's
    numeric has no negative zero, and prints `1e16` as `10000000000000000`)."""
    negative = text.startswith("-")
    body = text[1:] if negative else text
    mantissa, _, exponent_text = body.replace("E", "e").partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    exponent = (int(exponent_text) if exponent_text else 0) - len(fraction)
    if not digits:
        return b"0"
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    return f"{'-' if negative else ''}{stripped}e{exponent}".encode()


def _emit(value: Any, out: bytearray) -> None:
    if value is None:
        out += b"z"
    elif value is True:
        out += b"t"
    elif value is False:
        out += b"f"
    elif isinstance(value, _Number):
        number = canonical_number(value)
        out += b"n" + _U32.pack(len(number)) + number
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        out += b"s" + _U32.pack(len(data)) + data
    elif isinstance(value, list):
        out += b"a" + _U32.pack(len(value))
        for item in value:
            _emit(item, out)
    else:  # the member pairs of an object, in text order
        members: dict[bytes, Any] = {}
        for key, item in value:
            members[key.encode("utf-8", "surrogatepass")] = item  # the last one wins
        out += b"o" + _U32.pack(len(members))
        for key in sorted(members):
            out += _U32.pack(len(key)) + key
            _emit(members[key], out)


def _pairs(pairs: list[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    return tuple(pairs)


def _canonical_json_python(text: bytes | str) -> bytes:
    try:
        value = json.loads(
            text,
            parse_int=_Number,
            parse_float=_Number,
            parse_constant=_refuse_constant,
            object_pairs_hook=_pairs,
        )
    except (ValueError, RecursionError) as exc:
        raise CanonicalError(f"metadata is not JSON: {exc}") from None
    out = bytearray()
    _emit(value, out)
    return bytes(out)


def _refuse_constant(name: str) -> Any:
    raise CanonicalError(f"metadata holds {name}, which is not JSON")


# -- leaves, nodes, roots ------------------------------------------------------------------


def tuple_fields(data: bytes, offset: int) -> tuple[list[bytes | None], int]:
    (count,) = _I16.unpack_from(data, offset)
    offset += 2
    fields: list[bytes | None] = []
    for _ in range(count):
        (length,) = _I32.unpack_from(data, offset)
        offset += 4
        if length < 0:
            fields.append(None)
        else:
            fields.append(data[offset : offset + length])
            offset += length
    return fields, offset


def _leaf_python(fields: Sequence[bytes | None], json_field: int = JSON_FIELD_V1) -> bytes:
    parts = [b"\x00", LEAF_TAG, _I16.pack(len(fields))]
    for index, value in enumerate(fields):
        if value is None:
            parts.append(b"\xff\xff\xff\xff")
            continue
        if index == json_field:
            if value[:1] != b"\x01":
                raise CanonicalError("jsonb field without binary format version 1")
            value = _canonical_json_python(value[1:])
        parts.append(_I32.pack(len(value)))
        parts.append(value)
    return hashlib.sha256(b"".join(parts)).digest()


def _leaves_python(data: bytes, json_field: int = JSON_FIELD_V1) -> bytes:
    out = []
    offset = 0
    while offset < len(data):
        fields, offset = tuple_fields(data, offset)
        out.append(_leaf_python(fields, json_field))
    return b"".join(out)


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _root_python(leaves: bytes) -> bytes:
    level = [leaves[i : i + HASH_SIZE] for i in range(0, len(leaves), HASH_SIZE)]
    if not level:
        return EMPTY_ROOT
    # Pairing left to right and promoting an odd last node gives RFC 6962's tree (split at
    # the largest power of two below n) for every n.
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def _stamp_python(data: bytes, stream: bytes, first_pos: int) -> tuple[bytes, bytes]:
    out: list[bytes] = []
    leaves: list[bytes] = []
    offset = 0
    pos = first_pos
    while offset < len(data):
        fields, end = tuple_fields(data, offset)
        if len(fields) != STAMPED_FIELDS_V1:
            raise ValueError(f"a row with {len(fields)} fields, expected {STAMPED_FIELDS_V1}")
        fields.append(stream)
        fields.append(_Q.pack(pos))
        tuple_bytes = (
            _I16.pack(len(fields))
            + data[offset + 2 : end]
            + _I32.pack(16)
            + stream
            + _I32.pack(8)
            + _Q.pack(pos)
        )
        out.append(tuple_bytes)
        leaves.append(_leaf_python(fields))
        offset = end
        pos += 1
    return b"".join(out), b"".join(leaves)


def inclusion_path(leaves: bytes, index: int) -> list[bytes]:
    """RFC 6962 audit path of leaf `index` (for exports with proofs and for tests)."""
    nodes = [leaves[i : i + HASH_SIZE] for i in range(0, len(leaves), HASH_SIZE)]
    if not 0 <= index < len(nodes):
        raise IndexError(index)

    def path(lo: int, hi: int, at: int) -> list[bytes]:
        if hi - lo == 1:
            return []
        split = 1 << ((hi - lo - 1).bit_length() - 1)
        mid = lo + split
        if at < mid:
            return [*path(lo, mid, at), root(b"".join(nodes[mid:hi]))]
        return [*path(mid, hi, at), root(b"".join(nodes[lo:mid]))]

    return path(0, len(nodes), index)


#: The size of one record `scan_rows` returns: stream[16] pos[8] id[16] leaf[32]
#: tuple offset[4] tuple length[4].
SCAN_RECORD: Final = struct.Struct(">16sQ16s32sII")


def _scan_python(
    buf: bytes, start: int, fields: int = len(LEAF_COLUMNS_V1)
) -> tuple[int, bytes, bool, bytes]:
    out: list[bytes] = []
    at = start
    end = len(buf)
    while at < end:
        if end - at < 2:
            break
        (count,) = _I16.unpack_from(buf, at)
        if count == -1:
            return at + 2, b"".join(out), True, b"".join(r[40:72] for r in out)
        # a complete tuple?
        probe = at + 2
        complete = True
        for _ in range(count):
            if probe + 4 > end:
                complete = False
                break
            (length,) = _I32.unpack_from(buf, probe)
            probe += 4 + max(length, 0)
            if probe > end:
                complete = False
                break
        if not complete:
            break
        if count != fields:
            raise ValueError(f"a row with {count} fields, expected {fields}")
        values, after = tuple_fields(buf, at)
        ident = values[0] if values[0] is not None and len(values[0]) == 16 else bytes(16)
        stream = values[-2] if values[-2] is not None and len(values[-2]) == 16 else bytes(16)
        pos_bytes = values[-1] if values[-1] is not None and len(values[-1]) == 8 else bytes(8)
        (pos,) = _Q.unpack(pos_bytes)
        out.append(SCAN_RECORD.pack(stream, pos, ident, _leaf_python(values), at, after - at))
        at = after
    return at, b"".join(out), False, b"".join(r[40:72] for r in out)


# -- the C twins, when built ---------------------------------------------------------------

_c = native.speedups
#: True when leaves and roots are computed by the C extension.
ACCELERATED: Final = _c is not None and hasattr(_c, "chain_leaves")

if ACCELERATED:
    assert _c is not None
    canonical_json = _c.chain_canonical_json
    leaves_of = _c.chain_leaves
    root = _c.chain_root
    stamp = _c.chain_stamp
    scan_rows = _c.chain_scan
    sha256_backend = _c.chain_sha256_backend
else:
    canonical_json = _canonical_json_python
    leaves_of = _leaves_python
    root = _root_python
    stamp = _stamp_python
    scan_rows = _scan_python

    def sha256_backend(portable: bool | None = None) -> str:
        return "hashlib"


# Docs for the dispatched names (the C and Python versions behave the same):
# canonical_json(text) -> bytes: the canonical form of a JSON text (see _emit).
# leaves_of(data, json_field=JSON_FIELD_V1) -> bytes: the 32-byte leaf of each binary COPY
#   tuple in `data`, concatenated.
# root(leaves) -> bytes: RFC 6962 Merkle root over concatenated 32-byte leaves.
# stamp(data, stream, first_pos) -> (tuples, leaves): append chain_stream and chain_pos
#   (first_pos, first_pos + 1, ...) to each tuple and return the new tuples and their leaves.
# scan_rows(buf, start, fields=16) -> (next, records, ended, leaves): the complete tuples
#   of a COPY TO stream from `start`, one SCAN_RECORD each (and their leaves again,
#   contiguous); stops before an incomplete tuple or after the trailer (ended).


def leaf_of_fields(fields: Sequence[bytes | None], json_field: int = JSON_FIELD_V1) -> bytes:
    """The leaf of one row given as its binary COPY field values (None for NULL)."""
    return _leaf_python(fields, json_field)


# -- batch digests -------------------------------------------------------------------------


@dataclass(frozen=True)
class DigestRecord:
    """One committed batch of a stream: the positions it covers and the hashes that bind it.

    `count` counts positions, skipped ones included: the next batch starts at
    `first_pos + count`. `leaves` holds the present rows' leaves in position order, so the
    verifier can name the exact row that changed, not only the batch.
    """

    stream: uuid.UUID
    first_pos: int
    count: int
    skipped: tuple[tuple[int, int], ...]
    root: bytes
    prev_hash: bytes
    leaves: bytes = field(repr=False)
    version: int = LEAF_VERSION

    @property
    def hash(self) -> bytes:
        return digest_hash(
            self.stream, self.first_pos, self.count, self.skipped, self.root, self.prev_hash
        )

    @property
    def next_pos(self) -> int:
        return self.first_pos + self.count


def digest_hash(
    stream: uuid.UUID,
    first_pos: int,
    count: int,
    skipped: Iterable[tuple[int, int]],
    root_hash: bytes,
    prev_hash: bytes,
    version: int = LEAF_VERSION,
) -> bytes:
    """SHA-256 of the digest body (docs/tamper-evidence.md, "Digests")."""
    skips = sorted(skipped)
    body = [
        DIGEST_TAG,
        bytes([version]),
        stream.bytes,
        _Q.pack(first_pos),
        _Q.pack(count),
        _U32.pack(len(skips)),
    ]
    for pos, reason in skips:
        body.append(_Q.pack(pos) + bytes([reason]))
    body.append(root_hash)
    body.append(prev_hash)
    return hashlib.sha256(b"".join(body)).digest()


class ChainError(ValueError):
    """A batch handed to `ChainStream.seal` does not continue the stream."""


class ChainStream:
    """One writer stream: a random id, the next position, the last committed digest's hash.

    Not thread-safe: one writer thread owns it. A forked child must open a new stream
    (positions and prev hash would otherwise fork). Positions are handed out by `stamp`
    once per row and never reused: a retry resends the same stamped bytes, and a row the
    database refuses leaves its position skipped in the digest that covers it.
    """

    __slots__ = ("_next", "_pending", "head_hash", "id", "sealed_pos")

    def __init__(
        self, stream: uuid.UUID | None = None, next_pos: int = 1, head_hash: bytes = GENESIS
    ) -> None:
        self.id = stream or uuid.uuid4()
        self._next = next_pos
        #: The first position not yet covered by a committed digest.
        self.sealed_pos = next_pos
        self.head_hash = head_hash
        #: Positions given out and then resolved without a row (dead-lettered), waiting for
        #: the digest that covers them.
        self._pending: dict[int, int] = {}

    @property
    def next_pos(self) -> int:
        return self._next

    def stamp(self, data: bytes) -> tuple[bytes, bytes, int]:
        """Number the rows of a block of tuples: returns the tuples with `chain_stream` and
        `chain_pos` appended, their leaves, and the first position given."""
        first = self._next
        stamped, leaves = stamp(data, self.id.bytes, first)
        self._next += len(leaves) // HASH_SIZE
        return stamped, leaves, first

    def seal(
        self, leaves: bytes, first_pos: int, count: int, skipped: Sequence[tuple[int, int]] = ()
    ) -> DigestRecord:
        """The digest of a batch that covers `count` positions from `first_pos` (the present
        rows' `leaves` in position order, the `skipped` (position, Skip) pairs). Pure: the
        stream's head moves only when `committed` is told the transaction committed."""
        if first_pos != self.sealed_pos:
            raise ChainError(f"batch starts at {first_pos}, the stream at {self.sealed_pos}")
        present = len(leaves) // HASH_SIZE
        if present + len(skipped) != count or len(leaves) % HASH_SIZE:
            raise ChainError(f"{present} leaves and {len(skipped)} skips do not make {count}")
        for pos, _reason in skipped:
            if not first_pos <= pos < first_pos + count:
                raise ChainError(f"skipped position {pos} outside the batch")
        return DigestRecord(
            stream=self.id,
            first_pos=first_pos,
            count=count,
            skipped=tuple(sorted((int(p), int(r)) for p, r in skipped)),
            root=root(leaves),
            prev_hash=self.head_hash,
            leaves=leaves,
        )

    def skip(self, pos: int, reason: Skip) -> None:
        """Record that stamped position `pos` will hold no row (its row was dead-lettered);
        the next `seal_through` that reaches it lists it as skipped."""
        if not self.sealed_pos <= pos < self._next:
            raise ChainError(f"position {pos} is not waiting for a digest")
        self._pending[pos] = int(reason)

    def seal_through(self, leaves: bytes, end_pos: int) -> DigestRecord:
        """The digest covering every position from the stream's sealed end up to `end_pos`
        (exclusive): the rows that were written (their `leaves`, in position order) and the
        positions `skip` recorded. What the sink calls after each committed sub-batch of a
        poison-row split, and with no leaves for a batch whose last rows were all refused."""
        skipped = sorted((p, r) for p, r in self._pending.items() if p < end_pos)
        return self.seal(leaves, self.sealed_pos, end_pos - self.sealed_pos, skipped)

    def committed(self, record: DigestRecord) -> None:
        """Move the head after `record`'s transaction committed."""
        if record.first_pos != self.sealed_pos or record.prev_hash != self.head_hash:
            raise ChainError("committed digest does not continue the stream")
        self.sealed_pos = record.next_pos
        self._next = max(self._next, record.next_pos)
        self.head_hash = record.hash
        for pos, _reason in record.skipped:
            self._pending.pop(pos, None)

    def skipped(self, pos: int) -> bool:
        """Is `pos` recorded as skipped, waiting for the digest that covers it?"""
        return pos in self._pending

    def pending_run(self) -> int:
        """The end (exclusive) of the run of skipped positions starting at the sealed end:
        how far a digest with no rows may seal without claiming any position that could
        still be written (`sealed_pos` when there is none)."""
        end = self.sealed_pos
        while end in self._pending:
            end += 1
        return end

    def resync(self, sealed_pos: int, head_hash: bytes, reserve_to: int = 0) -> None:
        """Take the stream's committed head as the database has it (an idempotent replay
        after a commit cut in flight, or a stream resumed from another writer's spool), and
        let positions up to `reserve_to` (exclusive) be skipped and sealed. Skips below
        the new head are forgotten: the digest that covered them is committed."""
        self.sealed_pos = sealed_pos
        self.head_hash = head_hash
        self._next = max(self._next, sealed_pos, reserve_to)
        self._pending = {p: r for p, r in self._pending.items() if p >= sealed_pos}

    def pending(self) -> dict[int, int]:
        """The skips waiting for a digest: position -> `Skip` reason."""
        return dict(self._pending)
