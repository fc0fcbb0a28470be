"""Signed checkpoints over every stream's head, as C2SP signed notes with Ed25519 keys.

Why signed notes: the format is text an auditor can read, carries several signatures (key
rotation, a witness's cosignature) and has a published specification (C2SP signed-note,
tlog-checkpoint). Why Ed25519 and not an HMAC: a verifier needs only the public key, so
holding what verifies never lets anyone forge. The private key lives with the checkpointer
(cron or a sidecar, its own role), never on the application's hosts.

`cryptography` is imported only here and only when a key is used (the `integrity` extra).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql

from .chain_schema import checkpoints_table, digests_table, q, retention_table

#: The first line of a checkpoint's extension lines says what it is.
CHECKPOINT_FORMAT: Final = "auditq-checkpoint/v1"
RETENTION_FORMAT: Final = "auditq-retention/v1"
_ALG_ED25519: Final = b"\x01"
_SIG_LINE: Final = re.compile(r"^\u2014 (\S+) (\S+)$")


class KeyFileError(ValueError):
    """A key file that cannot be read (the message says why)."""


class MissingExtra(RuntimeError):
    """The `cryptography` package is not installed."""


def crypto_module() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingExtra(
            "signing and checking signatures need the cryptography package: "
            "pip install 'auditq[integrity]'"
        ) from None
    return ed25519


def key_id(name: str, public: bytes) -> bytes:
    """C2SP signed-note key hash: SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + _ALG_ED25519 + public).digest()[:4]


@dataclass(frozen=True)
class VerifierKey:
    name: str
    public: bytes

    @property
    def id(self) -> bytes:
        return key_id(self.name, self.public)

    def text(self) -> str:
        """C2SP verifier key: name+hexhash+base64(0x01 || key)."""
        encoded = base64.b64encode(_ALG_ED25519 + self.public).decode()
        return f"{self.name}+{self.id.hex()}+{encoded}"

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        parts = text.strip().split("+", 2)  # base64 may hold '+'; names and hashes do not
        if len(parts) != 3:
            raise KeyFileError("not a verifier key (name+hash+key)")
        name, hexid, encoded = parts
        try:
            raw = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise KeyFileError("the key is not base64") from None
        if raw[:1] != _ALG_ED25519 or len(raw) != 33:
            raise KeyFileError("not an Ed25519 key")
        key = cls(name, raw[1:])
        if key.id.hex() != hexid:
            raise KeyFileError("the key hash does not match the key")
        return key


@dataclass(frozen=True)
class SignerKey:
    name: str
    seed: bytes

    def verifier(self) -> VerifierKey:
        ed = crypto_module()
        public = ed.Ed25519PrivateKey.from_private_bytes(self.seed).public_key()
        from cryptography.hazmat.primitives import serialization

        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return VerifierKey(self.name, raw)

    def text(self) -> str:
        """C2SP-style signer key: PRIVATE+KEY+name+hexhash+base64(0x01 || seed)."""
        encoded = base64.b64encode(_ALG_ED25519 + self.seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.verifier().id.hex()}+{encoded}"

    @classmethod
    def parse(cls, text: str) -> SignerKey:
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise KeyFileError("not a signer key (PRIVATE+KEY+name+hash+key)")
        raw = base64.b64decode(parts[4])
        if raw[:1] != _ALG_ED25519 or len(raw) != 33:
            raise KeyFileError("not an Ed25519 key")
        key = cls(parts[2], raw[1:])
        if key.verifier().id.hex() != parts[3]:
            raise KeyFileError("the key hash does not match the key")
        return key

    def sign(self, body: bytes) -> bytes:
        ed = crypto_module()
        signature: bytes = ed.Ed25519PrivateKey.from_private_bytes(self.seed).sign(body)
        return signature


def keygen(name: str) -> SignerKey:
    if not name or any(c in name for c in "+ \n\u2014") or not name.isprintable():
        raise KeyFileError("a key name is printable, without spaces or '+'")
    crypto_module()
    return SignerKey(name, os.urandom(32))


def write_private(path: Path, text: str) -> None:
    """Create `path` 0600 (refusing to overwrite: a lost signer key cannot be recovered)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")


def read_verifier(path: Path) -> VerifierKey:
    return VerifierKey.parse(path.read_text())


def read_signer(path: Path) -> SignerKey:
    if path.stat().st_mode & 0o077:
        raise KeyFileError(f"{path} is readable by others; chmod 600 it")
    return SignerKey.parse(path.read_text())


# -- signed notes ------------------------------------------------------------------------


def sign_note(body: str, key: SignerKey) -> str:
    """A C2SP signed note: the body, a blank line, one signature line."""
    if not body.endswith("\n"):
        raise ValueError("a note body ends with a newline")
    signature = key.sign(body.encode())
    encoded = base64.b64encode(key.verifier().id + signature).decode()
    return f"{body}\n\u2014 {key.name} {encoded}\n"


def split_note(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    """(body, [(key name, key hash + signature)]); ValueError when malformed."""
    body, sep, sigs = note.rpartition("\n\n")
    if not sep:
        raise ValueError("no signature block")
    signatures = []
    for line in sigs.splitlines():
        match = _SIG_LINE.match(line)
        if not match:
            raise ValueError("malformed signature line")
        signatures.append((match.group(1), base64.b64decode(match.group(2))))
    return body + "\n", signatures


def note_signed_by(note: str, key: VerifierKey) -> bool:
    """True when a signature of `key` on the note checks out."""
    ed = crypto_module()
    from cryptography.exceptions import InvalidSignature

    try:
        body, signatures = split_note(note)
    except ValueError:
        return False
    public = ed.Ed25519PublicKey.from_public_bytes(key.public)
    for name, blob in signatures:
        if name != key.name or blob[:4] != key.id:
            continue
        try:
            public.verify(blob[4:], body.encode())
        except InvalidSignature:
            return False
        return True
    return False


# -- checkpoints -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    stream: uuid.UUID
    next_pos: int
    hash: bytes


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    number: int
    time: datetime
    prev: bytes | None
    heads: tuple[Head, ...]
    note: str

    @property
    def hash(self) -> bytes:
        return hashlib.sha256(self.note.encode()).digest()


def _heads_root(heads: Iterable[Head]) -> bytes:
    lines = "".join(_head_line(h) for h in heads)
    return hashlib.sha256(lines.encode()).digest()


def _head_line(head: Head) -> str:
    return f"head {head.stream} {head.next_pos} {base64.b64encode(head.hash).decode()}\n"


def checkpoint_body(
    origin: str, number: int, time: datetime, prev: bytes | None, heads: Iterable[Head]
) -> str:
    """The note body: C2SP's origin / size / root lines (size = the checkpoint number, root =
    SHA-256 of the head lines), then the format, time, previous note hash and every head."""
    ordered = sorted(heads, key=lambda h: h.stream.bytes)
    lines = [
        origin,
        str(number),
        base64.b64encode(_heads_root(ordered)).decode(),
        CHECKPOINT_FORMAT,
        f"time {time.astimezone(UTC).isoformat()}",
        f"prev {base64.b64encode(prev).decode() if prev else '-'}",
    ]
    return "\n".join(lines) + "\n" + "".join(_head_line(h) for h in ordered)


def parse_checkpoint(note: str) -> Checkpoint:
    """ValueError when the note is not a checkpoint or its root does not match its heads."""
    body, _ = split_note(note)
    lines = body.splitlines()
    if len(lines) < 6 or lines[3] != CHECKPOINT_FORMAT:
        raise ValueError("not an auditq checkpoint")
    heads = []
    for line in lines[6:]:
        kind, stream, next_pos, encoded = line.split(" ")
        if kind != "head":
            raise ValueError("unexpected line in a checkpoint")
        heads.append(Head(uuid.UUID(stream), int(next_pos), base64.b64decode(encoded)))
    if base64.b64decode(lines[2]) != _heads_root(heads):
        raise ValueError("the checkpoint's root does not match its heads")
    prev_text = lines[5].removeprefix("prev ")
    return Checkpoint(
        origin=lines[0],
        number=int(lines[1]),
        time=datetime.fromisoformat(lines[4].removeprefix("time ")),
        prev=None if prev_text == "-" else base64.b64decode(prev_text),
        heads=tuple(heads),
        note=note,
    )


def stream_heads(conn: psycopg.Connection[Any], schema: str, table: str) -> list[Head]:
    """Every stream's latest digest."""
    rows = conn.execute(
        sql.SQL(
            "SELECT DISTINCT ON (stream) stream, first_pos + pos_count, hash FROM {} "
            "ORDER BY stream, first_pos DESC"
        ).format(q(schema, digests_table(table)))
    ).fetchall()
    return [Head(r[0], r[1], bytes(r[2])) for r in rows]


def latest_checkpoint(conn: psycopg.Connection[Any], schema: str, table: str) -> Checkpoint | None:
    row = conn.execute(
        sql.SQL("SELECT note FROM {} ORDER BY checkpoint_no DESC LIMIT 1").format(
            q(schema, checkpoints_table(table))
        )
    ).fetchone()
    return parse_checkpoint(row[0]) if row else None


class Inconsistent(RuntimeError):
    """The heads now do not extend the last checkpoint's: the checkpointer refuses to sign."""


def make_checkpoint(
    conn: psycopg.Connection[Any],
    schema: str,
    table: str,
    key: SignerKey,
    *,
    origin: str | None = None,
    directory: Path | None = None,
) -> Checkpoint:
    """Sign the heads of all streams, store the note (and a copy in `directory`).

    Refuses (`Inconsistent`) when a stream's head went backwards or its digests no longer
    link from the head last signed: a log must never sign a checkpoint inconsistent with
    one it signed before (C2SP tlog-checkpoint)."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        previous = latest_checkpoint(conn, schema, table)
        heads = stream_heads(conn, schema, table)
        if previous is not None:
            _check_extends(conn, schema, table, previous, heads)
        number = previous.number + 1 if previous else 1
        body = checkpoint_body(
            origin or f"auditq/{schema}.{table}",
            number,
            datetime.now(UTC),
            previous.hash if previous else None,
            heads,
        )
        note = sign_note(body, key)
        conn.execute(
            sql.SQL("INSERT INTO {} (checkpoint_no, note) VALUES (%s, %s)").format(
                q(schema, checkpoints_table(table))
            ),
            (number, note),
        )
    if directory is not None:
        write_external(directory, number, note)
    return parse_checkpoint(note)


def write_external(directory: Path, number: int, note: str) -> Path:
    """Write the note to `directory/checkpoint-<n>.note` (0600, complete or absent)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"checkpoint-{number:012d}.note"
    temp = directory / f".{path.name}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(note)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)
    return path


def read_external(directory: Path) -> list[str]:
    return [p.read_text() for p in sorted(directory.glob("checkpoint-*.note"))]


def _check_extends(
    conn: psycopg.Connection[Any], schema: str, table: str, previous: Checkpoint, heads: list[Head]
) -> None:
    now = {h.stream: h for h in heads}
    for old in previous.heads:
        new = now.get(old.stream)
        if new is None or new.next_pos < old.next_pos:
            raise Inconsistent(f"stream {old.stream} is behind checkpoint {previous.number}")
        if new.next_pos == old.next_pos:
            if new.hash != old.hash:
                raise Inconsistent(f"stream {old.stream}'s head changed since the checkpoint")
            continue
        rows = conn.execute(
            sql.SQL(
                "SELECT first_pos, pos_count, prev_hash, hash FROM {} WHERE stream = %s "
                "AND first_pos >= %s ORDER BY first_pos"
            ).format(q(schema, digests_table(table))),
            (old.stream, old.next_pos),
        ).fetchall()
        expected_pos, expected_prev = old.next_pos, old.hash
        for first_pos, count, prev_hash, digest in rows:
            if first_pos != expected_pos or bytes(prev_hash) != expected_prev:
                raise Inconsistent(
                    f"stream {old.stream} does not link from checkpoint {previous.number}"
                )
            expected_pos, expected_prev = first_pos + count, bytes(digest)


# -- retention records -----------------------------------------------------------------------


@dataclass(frozen=True)
class PurgedRange:
    stream: uuid.UUID
    first_pos: int
    end_pos: int  # exclusive
    rows: int


def retention_body(
    origin: str, number: int, time: datetime, ranges: Iterable[PurgedRange], reason: str
) -> str:
    """What the retention command signs before it drops rows (docs/tamper-evidence.md)."""
    lines = [origin, str(number), RETENTION_FORMAT, f"time {time.astimezone(UTC).isoformat()}"]
    lines.append("reason " + reason.replace("\n", " "))
    for r in sorted(ranges, key=lambda r: (r.stream.bytes, r.first_pos)):
        lines.append(f"purge {r.stream} {r.first_pos} {r.end_pos} {r.rows}")
    return "\n".join(lines) + "\n"


def parse_retention(note: str) -> tuple[int, list[PurgedRange]]:
    body, _ = split_note(note)
    lines = body.splitlines()
    if len(lines) < 5 or lines[2] != RETENTION_FORMAT:
        raise ValueError("not an auditq retention record")
    ranges = []
    for line in lines[5:]:
        kind, stream, first, end, rows = line.split(" ")
        if kind != "purge":
            raise ValueError("unexpected line in a retention record")
        ranges.append(PurgedRange(uuid.UUID(stream), int(first), int(end), int(rows)))
    return int(lines[1]), ranges


def purged_ranges(conn: psycopg.Connection[Any], schema: str, relation: str) -> list[PurgedRange]:
    """The runs of consecutive positions each stream has in `relation` (the partition about
    to be dropped): what its retention record must list. Run it under the lock that
    precedes the drop, so the record states exactly what goes."""
    rows = conn.execute(
        sql.SQL(
            "SELECT chain_stream, min(chain_pos), max(chain_pos) + 1, count(*) FROM ("
            "SELECT chain_stream, chain_pos, chain_pos - row_number() OVER "
            "(PARTITION BY chain_stream ORDER BY chain_pos) AS run FROM {} "
            "WHERE chain_stream IS NOT NULL) s GROUP BY chain_stream, run ORDER BY 1, 2"
        ).format(q(schema, relation))
    ).fetchall()
    return [PurgedRange(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]


def record_retention(
    conn: psycopg.Connection[Any],
    schema: str,
    table: str,
    key: SignerKey,
    ranges: Iterable[PurgedRange],
    reason: str,
    *,
    origin: str | None = None,
) -> int:
    """Insert a signed retention record (the retention command calls this in the
    transaction that drops the rows); returns its number."""
    target = q(schema, retention_table(table))
    (number,) = conn.execute(
        sql.SQL("SELECT coalesce(max(purge_no), 0) + 1 FROM {}").format(target)
    ).fetchone() or (1,)
    body = retention_body(
        origin or f"auditq/{schema}.{table}", number, datetime.now(UTC), ranges, reason
    )
    conn.execute(
        sql.SQL("INSERT INTO {} (purge_no, note) VALUES (%s, %s)").format(target),
        (number, sign_note(body, key)),
    )
    return int(number)
