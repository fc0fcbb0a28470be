"""One tenant's chained rows with the proofs an auditor checks offline (issue 13 item 5).

`auditq export --tenant T --proofs` writes JSON Lines: a header carrying the latest signed
checkpoint, then per stream the digests from the first batch holding one of T's rows up to
the head the checkpoint signed (their fields, not their leaves), then each row: the exact
bytes its leaf is computed over (its binary COPY tuple), the values decoded from those bytes,
and the RFC 6962 inclusion path from its leaf to its batch's root. `verify_export` (and
`auditq verify-export FILE --public-key K`) needs no database: it checks the signature, that
the digests hash and link up to the signed head, that each row's values are its bytes, and
that each row's leaf reaches its batch's root.

Other tenants' data never appears: the digests carry counts, positions and hashes only, and
a path holds sibling hashes. What this proves is that every exported row is a row the writer
wrote, unchanged, at the position shown; it does not prove that none of T's rows are missing
(the auditor sees neither the other rows of T's batches nor the positions between them).
That is `auditq verify`'s job, on the whole table.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import struct
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any, Final

import psycopg
from psycopg import sql

from . import chain
from .chain import HASH_SIZE, LEAF_COLUMNS_V1, SCAN_RECORD, digest_hash, node_hash
from .chain_schema import digests_table, q
from .checkpoint import (
    Checkpoint,
    VerifierKey,
    latest_checkpoint,
    note_signed_by,
    parse_checkpoint,
)
from .filters import TENANT_SETTING
from .verify import DAMAGE, Finding, copy_chunks

FORMAT: Final = "auditq-proofs/v1"
_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_Q: Final = struct.Struct(">q")
_UUIDS: Final = frozenset({"id", "chain_stream"})
_INFINITE: Final = {(1 << 63) - 1: "infinity", -(1 << 63): "-infinity"}


class ProofsError(RuntimeError):
    """The export cannot be made (no checkpoint yet, the table is not chained); one line."""


# -- the values of a binary COPY tuple -----------------------------------------------------


def _value(column: str, raw: bytes | None) -> Any:
    """The value of one v1 leaf field, decoded from the bytes PostgreSQL sent."""
    if raw is None:
        return None
    if column in _UUIDS:
        return str(uuid.UUID(bytes=raw))
    if column == "occurred_at":
        (micros,) = _Q.unpack(raw)
        if micros in _INFINITE:
            return _INFINITE[micros]
        return (_EPOCH + timedelta(microseconds=micros)).isoformat()
    if column == "chain_pos":
        return _Q.unpack(raw)[0]
    if column == "ip":
        family, bits, _, size = raw[:4]
        address = ipaddress.ip_address(raw[4 : 4 + size])
        full = 32 if family == 2 else 128
        return str(address) if bits == full else f"{address}/{bits}"
    if column == "metadata":
        if raw[:1] != b"\x01":
            raise ValueError("jsonb field without binary format version 1")
        return json.loads(raw[1:])
    return raw.decode()


def decode(tuple_bytes: bytes) -> tuple[dict[str, Any], list[bytes | None]]:
    """(column -> value, the raw fields) of one v1 tuple."""
    fields, end = chain.tuple_fields(tuple_bytes, 0)
    if end != len(tuple_bytes) or len(fields) != len(LEAF_COLUMNS_V1):
        raise ValueError("not one auditq v1 row")
    return {c: _value(c, f) for c, f in zip(LEAF_COLUMNS_V1, fields, strict=True)}, fields


def root_from_path(leaf: bytes, index: int, size: int, path: Iterable[bytes]) -> bytes | None:
    """The root an RFC 6962 inclusion path leads to from leaf `index` of a tree of `size`
    leaves (RFC 9162 2.1.3.2); None when the path has the wrong length for them."""
    if not 0 <= index < size:
        return None
    fn, sn, node = index, size - 1, leaf
    for sibling in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            node = node_hash(sibling, node)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            node = node_hash(node, sibling)
        fn >>= 1
        sn >>= 1
    return node if sn == 0 else None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(text, validate=True)


# -- writing ---------------------------------------------------------------------------------


def _begin(conn: psycopg.Connection[Any], tenant: str, snapshot: str | None = None) -> str:
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    if snapshot:
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
    # A reader role sees its tenant's rows only through this setting (row-level security).
    conn.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, tenant))
    if snapshot:
        return snapshot
    row = conn.execute("SELECT pg_export_snapshot()").fetchone()
    return str(row[0]) if row else ""


def export_proofs(dsn: str, schema: str, table: str, tenant: str, out: IO[bytes]) -> int:
    """Write `tenant`'s chained rows with their proofs to `out`; returns the rows written.
    Two connections share one snapshot: one streams the rows (COPY), the other reads the
    digests a row needs as it comes, so memory holds one batch's leaves."""

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    digests = q(schema, digests_table(table))
    target = q(schema, table)
    with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
        snapshot = _begin(a, tenant)
        _begin(b, tenant, snapshot)
        point = latest_checkpoint(a, schema, table)
        if point is None:
            raise ProofsError(f"{schema}.{table} has no checkpoint yet: run `auditq checkpoint`")
        heads = {h.stream.bytes: h for h in point.heads}
        firsts = a.execute(
            sql.SQL(
                "SELECT chain_stream, min(chain_pos) FROM {} WHERE tenant_id = %s "
                "AND chain_stream IS NOT NULL GROUP BY 1 ORDER BY 1"
            ).format(target),
            (tenant,),
        ).fetchall()
        (unchained,) = a.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = %s AND chain_stream IS NULL").format(
                target
            ),
            (tenant,),
        ).fetchone() or (0,)
        emit(
            {
                "kind": "header",
                "format": FORMAT,
                "schema": schema,
                "table": table,
                "tenant": tenant,
                "checkpoint": point.note,
            }
        )
        for stream, first in firsts:
            head = heads.get(stream.bytes)
            if head is None:
                continue
            # A server-side cursor: a long-lived stream has many digests.
            with a.cursor(name="auditq_proofs_digests") as dcur:
                dcur.itersize = 1000
                dcur.execute(
                    sql.SQL(
                        "SELECT first_pos, pos_count, skipped_pos, skipped_reason, root, "
                        "prev_hash, hash FROM {} WHERE stream = %s AND first_pos + pos_count > %s "
                        "AND first_pos < %s ORDER BY first_pos"
                    ).format(digests),
                    (stream, first, head.next_pos),
                )
                for d in dcur:
                    emit(
                        {
                            "kind": "digest",
                            "stream": str(stream),
                            "first_pos": d[0],
                            "count": d[1],
                            "skipped": [[p, r] for p, r in zip(d[2], d[3], strict=True)],
                            "root": _b64(bytes(d[4])),
                            "prev_hash": _b64(bytes(d[5])),
                            "hash": _b64(bytes(d[6])),
                        }
                    )
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in LEAF_COLUMNS_V1)
        rows_sql = sql.SQL(
            "COPY (SELECT {} FROM {} WHERE tenant_id = {} AND chain_stream IS NOT NULL "
            "ORDER BY chain_stream, chain_pos, id) TO STDOUT (FORMAT binary)"
        ).format(columns, target, sql.Literal(tenant))
        batch: _Batch | None = None
        written = unanchored = 0
        for buf, records, _ in copy_chunks(b.cursor(), rows_sql):
            view = memoryview(buf)
            for stream_b, pos, _ident, _leaf, off, length in SCAN_RECORD.iter_unpack(records):
                tuple_bytes = bytes(view[off : off + length])
                values, _ = decode(tuple_bytes)
                line: dict[str, Any] = {
                    "kind": "row",
                    "stream": values["chain_stream"],
                    "pos": pos,
                    "row": values,
                    "tuple": _b64(tuple_bytes),
                }
                head = heads.get(stream_b)
                if head is None or pos >= head.next_pos:
                    line["unanchored"] = True
                    unanchored += 1
                else:
                    if batch is None or not batch.holds(stream_b, pos):
                        batch = _Batch.load(a, digests, stream_b, pos)
                    if batch is not None:
                        index = batch.index(pos)
                        line["batch"] = batch.first_pos
                        line["index"] = index
                        line["size"] = len(batch.leaves) // HASH_SIZE
                        line["path"] = [_b64(p) for p in batch.path(index)]
                emit(line)
                written += 1
        emit({"kind": "end", "rows": written, "unanchored": unanchored, "unchained": unchained})
        a.rollback()
        b.rollback()
    return written


def tree_levels(leaves: bytes) -> list[list[bytes]]:
    """Every level of the batch's RFC 6962 tree, leaves first (pairing left to right and
    promoting an odd last node builds the same tree as splitting at powers of two)."""
    level = [leaves[i : i + HASH_SIZE] for i in range(0, len(leaves), HASH_SIZE)]
    levels = [level]
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
        levels.append(level)
    return levels


def path_from_levels(levels: list[list[bytes]], index: int) -> list[bytes]:
    """The inclusion path of leaf `index` (what `chain.inclusion_path` returns), from levels
    built once per batch: one lookup per level instead of subtree roots per row."""
    path = []
    for level in levels[:-1]:
        sibling = index ^ 1
        if sibling < len(level):  # else the node is promoted: no sibling at this level
            path.append(level[sibling])
        index >>= 1
    return path


@dataclass
class _Batch:
    stream: bytes
    first_pos: int
    count: int
    skipped: list[int]
    leaves: bytes
    levels: list[list[bytes]] = field(default_factory=list)

    def path(self, index: int) -> list[bytes]:
        if not self.levels:
            self.levels = tree_levels(self.leaves)
        return path_from_levels(self.levels, index)

    def holds(self, stream: bytes, pos: int) -> bool:
        return stream == self.stream and self.first_pos <= pos < self.first_pos + self.count

    def index(self, pos: int) -> int:
        return pos - self.first_pos - sum(1 for s in self.skipped if s < pos)

    @classmethod
    def load(
        cls, conn: psycopg.Connection[Any], digests: sql.Composed, stream: bytes, pos: int
    ) -> _Batch | None:
        row = conn.execute(
            sql.SQL(
                "SELECT first_pos, pos_count, skipped_pos, leaves FROM {} WHERE stream = %s "
                "AND first_pos <= %s ORDER BY first_pos DESC LIMIT 1"
            ).format(digests),
            (uuid.UUID(bytes=stream), pos),
        ).fetchone()
        if row is None or not row[0] <= pos < row[0] + row[1]:
            return None  # no digest covers it: the row line goes without a path
        return cls(stream, int(row[0]), int(row[1]), sorted(row[2]), bytes(row[3]))


# -- checking, offline -----------------------------------------------------------------------


@dataclass
class ExportSummary:
    rows: int = 0
    proven: int = 0
    digests: int = 0
    findings: dict[str, int] = field(default_factory=dict)

    @property
    def damaged(self) -> bool:
        return any(self.findings.get(k) for k in DAMAGE)

    def json(self) -> dict[str, Any]:
        return {
            "kind": "SUMMARY",
            "clean": not self.damaged,
            "rows": self.rows,
            "proven": self.proven,
            "digests": self.digests,
            "findings": dict(sorted(self.findings.items())),
        }


@dataclass(frozen=True)
class _Digest:
    first_pos: int
    count: int
    skipped: tuple[tuple[int, int], ...]
    root: bytes
    prev_hash: bytes
    hash: bytes


def _lines(source: Iterable[bytes | str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(source, 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ValueError(f"line {number} is not a JSON object")
        yield number, obj


def verify_export(
    source: Iterable[bytes | str], keys: Iterable[VerifierKey], report: Any
) -> ExportSummary:
    """Check an export written by `export_proofs`, offline, against the verifier keys; each
    finding goes to `report` (a `verify.Finding`). ValueError for a file that is not one."""
    summary = ExportSummary()
    keys = tuple(keys)

    def found(finding: Finding) -> None:
        summary.findings[finding.kind] = summary.findings.get(finding.kind, 0) + 1
        report(finding)

    lines = _lines(source)
    try:
        _, header = next(lines)
    except StopIteration:
        raise ValueError("an empty file") from None
    if header.get("kind") != "header" or header.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} export")
    note = str(header.get("checkpoint", ""))
    try:
        point: Checkpoint | None = parse_checkpoint(note)
    except ValueError as exc:
        point = None
        found(Finding("BAD_SIGNATURE", detail=f"the checkpoint is unreadable: {exc}"))
    signed = point is not None and bool(keys) and any(note_signed_by(note, k) for k in keys)
    if point is not None and not signed:
        found(
            Finding(
                "BAD_SIGNATURE",
                checkpoint=point.number,
                detail="the checkpoint is not signed by the public key given",
            )
        )
    heads = {str(h.stream): h for h in point.heads} if point else {}
    number = point.number if point else None
    chains: dict[str, list[_Digest]] = {}
    ok: dict[tuple[str, int], _Digest] = {}
    checked = False
    end: dict[str, Any] | None = None
    for number, obj in lines:
        kind = obj.get("kind")
        if kind == "digest":
            d = _Digest(
                int(obj["first_pos"]),
                int(obj["count"]),
                tuple((int(p), int(r)) for p, r in obj["skipped"]),
                _unb64(obj["root"]),
                _unb64(obj["prev_hash"]),
                _unb64(obj["hash"]),
            )
            chains.setdefault(str(obj["stream"]), []).append(d)
            summary.digests += 1
            continue
        if kind == "end":
            end = obj
            continue
        if kind != "row":
            raise ValueError(f"line {number}: unknown kind {kind!r}")
        if not checked:
            ok = _check_chains(chains, heads, number, found)
            checked = True
        summary.rows += 1
        if _check_row(obj, ok, found, signed):
            summary.proven += 1
    if not checked:
        _check_chains(chains, heads, number, found)
    if end is None or end.get("rows") != summary.rows:
        found(Finding("TRUNCATED", detail="the export ends before its last line"))
    return summary


def _check_chains(
    chains: dict[str, list[_Digest]],
    heads: dict[str, Any],
    checkpoint: int | None,
    found: Any,
) -> dict[tuple[str, int], _Digest]:
    """The digests that hash right and link up to their stream's signed head."""
    good: dict[tuple[str, int], _Digest] = {}
    for stream, ds in chains.items():
        head = heads.get(stream)
        intact = head is not None
        ds.sort(key=lambda d: d.first_pos)
        for i, d in enumerate(ds):
            own = digest_hash(
                uuid.UUID(stream), d.first_pos, d.count, d.skipped, d.root, d.prev_hash
            )
            nxt = ds[i + 1] if i + 1 < len(ds) else None
            links = (
                nxt.first_pos == d.first_pos + d.count and nxt.prev_hash == d.hash
                if nxt is not None
                else head is not None
                and head.next_pos == d.first_pos + d.count
                and head.hash == d.hash
            )
            if own != d.hash or not links:
                intact = False
                found(
                    Finding(
                        "BROKEN",
                        stream,
                        d.first_pos,
                        d.first_pos + d.count - 1,
                        checkpoint=checkpoint,
                        detail="digest does not hash right"
                        if own != d.hash
                        else "digests do not link up to the signed head",
                    )
                )
        if intact:
            good.update({(stream, d.first_pos): d for d in ds})
    return good


def _check_row(
    obj: dict[str, Any], ok: dict[tuple[str, int], _Digest], found: Any, signed: bool
) -> bool:
    stream, pos = str(obj.get("stream")), int(obj.get("pos", -1))
    ident = obj.get("row", {}).get("id") if isinstance(obj.get("row"), dict) else None

    def bad(detail: str) -> bool:
        found(Finding("MODIFIED", stream, pos, pos, id=ident, detail=detail))
        return False

    try:
        tuple_bytes = _unb64(obj.get("tuple"))
        values, _ = decode(tuple_bytes)
    except (ValueError, struct.error) as exc:
        return bad(f"its bytes do not decode: {exc}")
    if values != obj.get("row"):
        return bad("its values are not the bytes its leaf covers")
    if values["chain_stream"] != stream or values["chain_pos"] != pos:
        return bad("its stream or position is not the one its bytes hold")
    if obj.get("unanchored"):
        found(Finding("UNANCHORED", stream, pos, pos, id=ident, detail="no checkpoint signs it"))
        return False
    d = ok.get((stream, int(obj.get("batch", -1))))
    if d is None:
        found(
            Finding(
                "BROKEN", stream, pos, pos, id=ident, detail="no intact digest covers its batch"
            )
        )
        return False
    skips = sorted(p for p, _ in d.skipped)
    if not d.first_pos <= pos < d.first_pos + d.count or pos in skips:
        return bad("its position is not one its batch holds")
    index = pos - d.first_pos - sum(1 for s in skips if s < pos)
    size = d.count - len(skips)
    if obj.get("index") != index or obj.get("size") != size:
        return bad("its place in the batch is not its position's")
    try:
        path = [_unb64(p) for p in obj.get("path", [])]
    except ValueError:
        return bad("its path is not base64")
    if root_from_path(chain.leaves_of(tuple_bytes), index, size, path) != d.root:
        return bad("its leaf does not reach its batch's root")
    return signed
