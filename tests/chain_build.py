"""Builds chained rows without the writer, as the phase-2 writer will: encode, stamp, COPY
and insert the digest in one transaction. Used by tests/test_chain_*.py."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg import sql

from auditq import binary
from auditq.chain import LEAF_COLUMNS_V1, STAMPED_FIELDS_V1, ChainStream, DigestRecord
from auditq.chain_schema import create_chain_tables, insert_digest, q
from auditq.schema import create

Row = tuple[Any, ...]
ORIGIN = "billing@host-1"


def encoded(row: Row) -> bytes:
    """The row's binary COPY tuple as the writer sends it, with this test writer's origin."""
    data = binary.encode_row(row, binary.origin_field(ORIGIN))[0]
    assert struct.unpack_from(">h", data, 0)[0] == STAMPED_FIELDS_V1
    return data


def make_row(
    i: int, tenant: str = "t1", metadata: dict[str, Any] | None = None, at_ns: int | None = None
) -> Row:
    meta = metadata if metadata is not None else {"n": i, "k": "v", "f": 0.5}
    return (
        uuid.uuid4(),
        at_ns if at_ns is not None else 1_700_000_000_000_000_000 + i * 1_000_000,
        f"user.login.{i % 3}",
        tenant,
        f"actor{i}",
        "user",
        "session",
        f"res{i}",
        "success",
        "10.0.0.1",
        "agent/1",
        f"req{i}",
        orjson.dumps(meta).decode(),
    )


@dataclass
class Chained:
    dsn: str
    schema: str
    table: str

    def setup(self, partitioned: bool = False) -> None:
        create(self.dsn, schema=self.schema, table=self.table, partitioned=partitioned)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            create_chain_tables(conn, self.schema, self.table)
            # The tamperer is a superuser: the audit table's append-only guards are the
            # first thing they switch off (the chain tables' guards stay on until a test
            # switches them off too).
            conn.execute(self.compose("ALTER TABLE {t} DISABLE TRIGGER USER"))

    def write(
        self, stream: ChainStream, rows: Sequence[Row], skip: Sequence[int] = ()
    ) -> DigestRecord:
        """One batch: rows at indexes in `skip` take a position but are not inserted (as a
        dead-lettered row)."""
        data = b"".join(encoded(r) for r in rows)
        stamped, leaves, first = stream.stamp(data)
        tuples = binary.split_rows(stamped)
        keep_tuples = [t for i, t in enumerate(tuples) if i not in skip]
        keep_leaves = b"".join(
            leaves[i * 32 : i * 32 + 32] for i in range(len(rows)) if i not in skip
        )
        skipped = [(first + i, 1) for i in skip]
        record = stream.seal(keep_leaves, first, len(rows), skipped)
        cols = sql.SQL(", ").join(map(sql.Identifier, LEAF_COLUMNS_V1))
        with psycopg.connect(self.dsn) as conn, conn.transaction():
            with (
                conn.cursor() as cur,
                cur.copy(
                    sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                        q(self.schema, self.table), cols
                    )
                ) as copy,
            ):
                copy.write(binary.HEADER + b"".join(keep_tuples) + binary.TRAILER)
            insert_digest(conn, self.schema, self.table, record)
        stream.committed(record)
        return record

    def compose(self, text: str) -> sql.Composed:
        """`text` with {t} {d} {c} {r} naming the table and its digests, checkpoints and
        retention tables."""
        from auditq.chain_schema import checkpoints_table, digests_table, retention_table

        return sql.SQL(text).format(
            t=q(self.schema, self.table),
            d=q(self.schema, digests_table(self.table)),
            c=q(self.schema, checkpoints_table(self.table)),
            r=q(self.schema, retention_table(self.table)),
        )

    def sql(self, text: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run as superuser (the tamperer; the digests' guards need DISABLE TRIGGER)."""
        statement = self.compose(text)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(statement, params or None)
            return cur.fetchall() if cur.description else []

    def drop(self) -> None:
        from auditq.chain_schema import checkpoints_table, digests_table, retention_table

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for name in (
                self.table,
                digests_table(self.table),
                checkpoints_table(self.table),
                retention_table(self.table),
            ):
                conn.execute(
                    sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(q(self.schema, name))
                )
