"""The hash chain's DDL: two columns on the audit table, and the digests, checkpoints and
retention tables beside it, all insert-only.

Kept apart from schema.py so the chain can be added to (and tested on) any audit table;
`init-db` (`schema.create`) calls `create_chain_tables` after creating the table.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Final

import psycopg
from psycopg import sql

from .chain import ChainStream, DigestRecord

DIGESTS_SUFFIX: Final = "_digests"
CHECKPOINTS_SUFFIX: Final = "_checkpoints"
RETENTION_SUFFIX: Final = "_retention"


def _name(table: str, suffix: str) -> str:
    # PostgreSQL truncates names to 63 bytes: a long table name gets a hash instead, so two
    # long tables never share a digests table.
    name = table + suffix
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha1(table.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{table.encode()[:40].decode(errors='ignore')}_{digest}{suffix}"


def digests_table(table: str) -> str:
    return _name(table, DIGESTS_SUFFIX)


def checkpoints_table(table: str) -> str:
    return _name(table, CHECKPOINTS_SUFFIX)


def retention_table(table: str) -> str:
    return _name(table, RETENTION_SUFFIX)


def q(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def chain_ddl(schema: str, table: str) -> list[sql.Composed]:
    """The statements (each safe to run again) that make `table` chainable."""
    target = q(schema, table)
    digests = q(schema, digests_table(table))
    checkpoints = q(schema, checkpoints_table(table))
    retention = q(schema, retention_table(table))
    statements: list[sql.Composed] = [
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS chain_stream uuid, "
            "ADD COLUMN IF NOT EXISTS chain_pos bigint"
        ).format(target),
        # A BRIN, not a btree: a full `verify` reads the table in a sequential scan and a
        # sort whatever the index (the planner's choice: benchmarks/chain_index.py), so the
        # index only narrows the partial reads (`--since TIME`, `--tenant`) to the block
        # ranges holding a stream's positions, and a btree's per-row upkeep was the largest
        # share of what chaining cost the server's COPY (docs/tamper-evidence.md, "Cost").
        # A table made with the earlier btree converges here (both statements idempotent).
        sql.SQL("DROP INDEX IF EXISTS {}").format(q(schema, _name(table, "_chain_idx"))),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING brin (chain_stream, chain_pos)").format(
            sql.Identifier(_name(table, "_chain_brin")), target
        ),
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {} (
    stream         uuid        NOT NULL,
    first_pos      bigint      NOT NULL CHECK (first_pos >= 1),
    pos_count      bigint      NOT NULL CHECK (pos_count >= 1),
    skipped_pos    bigint[]    NOT NULL DEFAULT '{{}}',
    skipped_reason smallint[]  NOT NULL DEFAULT '{{}}',
    root           bytea       NOT NULL,
    prev_hash      bytea       NOT NULL,
    hash           bytea       NOT NULL,
    leaves         bytea       NOT NULL,
    version        smallint    NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, first_pos)
)"""
        ).format(digests),
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {} (
    checkpoint_no bigint      PRIMARY KEY,
    note          text        NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now()
)"""
        ).format(checkpoints),
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {} (
    purge_no    bigint      PRIMARY KEY,
    note        text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
)"""
        ).format(retention),
        sql.SQL(
            """CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'auditq: % is append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$"""
        ).format(q(schema, _name(table, "_chain_append_only"))),
    ]
    for name in (digests_table(table), checkpoints_table(table), retention_table(table)):
        guard = q(schema, _name(table, "_chain_append_only"))
        for trigger, when in (
            (_name(name, "_no_change"), "BEFORE UPDATE OR DELETE ON {} FOR EACH ROW"),
            (_name(name, "_no_truncate"), "BEFORE TRUNCATE ON {} FOR EACH STATEMENT"),
        ):
            statements.append(
                sql.SQL(
                    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = {} "
                    "AND tgrelid = {}::regclass) THEN "
                    "CREATE TRIGGER {} " + when + " EXECUTE FUNCTION {}(); "
                    "ALTER TABLE {} ENABLE ALWAYS TRIGGER {}; END IF; END $$"
                ).format(
                    sql.Literal(trigger),
                    sql.Literal(f'"{schema}"."{name}"'),
                    sql.Identifier(trigger),
                    q(schema, name),
                    guard,
                    q(schema, name),
                    sql.Identifier(trigger),
                )
            )
    return statements


def create_chain_tables(conn: psycopg.Connection[Any], schema: str, table: str) -> None:
    """Add the chain columns to `table` and create its digests, checkpoints and retention
    tables; idempotent, and serialised against concurrent runs."""
    with conn.transaction():
        key = hashlib.sha1(f"auditq-chain:{schema}.{table}".encode(), usedforsecurity=False)
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s)",
            (int.from_bytes(key.digest()[:8], "big", signed=True),),
        )
        for statement in chain_ddl(schema, table):
            conn.execute(statement)


def grant_statements(
    schema: str,
    table: str,
    *,
    writer: str | None = None,
    checkpointer: str | None = None,
    verifier: str | None = None,
) -> list[sql.Composed]:
    """Grants for the three roles: the writer inserts digests, the checkpointer reads
    digests and inserts checkpoints, the verifier reads everything."""
    out: list[sql.Composed] = []
    digests = q(schema, digests_table(table))
    checkpoints = q(schema, checkpoints_table(table))
    retention = q(schema, retention_table(table))
    usage = sql.SQL("GRANT USAGE ON SCHEMA {} TO {}")
    if writer:
        out.append(usage.format(sql.Identifier(schema), sql.Identifier(writer)))
        out.append(
            sql.SQL("GRANT INSERT, SELECT ON {} TO {}").format(digests, sql.Identifier(writer))
        )
    if checkpointer:
        role = sql.Identifier(checkpointer)
        out.append(usage.format(sql.Identifier(schema), role))
        out.append(sql.SQL("GRANT SELECT ON {} TO {}").format(digests, role))
        out.append(sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(checkpoints, role))
    if verifier:
        role = sql.Identifier(verifier)
        out.append(usage.format(sql.Identifier(schema), role))
        for name in (q(schema, table), digests, checkpoints, retention):
            out.append(sql.SQL("GRANT SELECT ON {} TO {}").format(name, role))
    return out


def insert_digest_sql(schema: str, table: str) -> sql.Composed:
    """The INSERT the writer runs in the transaction of a batch's COPY (parameters from
    `digest_params`). ON CONFLICT: a replay of a committed batch finds its digest there."""
    return sql.SQL(
        "INSERT INTO {} (stream, first_pos, pos_count, skipped_pos, skipped_reason, root, "
        "prev_hash, hash, leaves, version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (stream, first_pos) DO NOTHING"
    ).format(q(schema, digests_table(table)))


def digest_params(record: DigestRecord) -> tuple[Any, ...]:
    return (
        record.stream,
        record.first_pos,
        record.count,
        [p for p, _ in record.skipped],
        [r for _, r in record.skipped],
        record.root,
        record.prev_hash,
        record.hash,
        record.leaves,
        record.version,
    )


def stream_head(
    conn: psycopg.Connection[Any], schema: str, table: str, stream: uuid.UUID
) -> tuple[int, bytes] | None:
    """(next position, head hash) of `stream` as the digests table has it: what a writer
    replaying another (dead) writer's spooled rows resumes that stream from."""
    row = conn.execute(
        sql.SQL(
            "SELECT first_pos + pos_count, hash FROM {} WHERE stream = %s "
            "ORDER BY first_pos DESC LIMIT 1"
        ).format(q(schema, digests_table(table))),
        (stream,),
    ).fetchone()
    return None if row is None else (int(row[0]), bytes(row[1]))


def resume_stream(
    conn: psycopg.Connection[Any], schema: str, table: str, stream: uuid.UUID
) -> ChainStream:
    """A `ChainStream` continuing `stream` from its last committed digest (or its start)."""
    head = stream_head(conn, schema, table, stream)
    if head is None:
        return ChainStream(stream)
    return ChainStream(stream, next_pos=head[0], head_hash=head[1])


def stored_digest(
    conn: psycopg.Connection[Any], schema: str, table: str, record: DigestRecord
) -> bool | None:
    """For an idempotent replay, in its transaction: None when no digest starts where
    `record` does (the earlier attempt did not commit: write rows and digest), True when the
    stored one is `record` (it did: write nothing), False when another digest is there (a
    bug or tampering: do not commit)."""
    row = conn.execute(
        sql.SQL("SELECT hash FROM {} WHERE stream = %s AND first_pos = %s").format(
            q(schema, digests_table(table))
        ),
        (record.stream, record.first_pos),
    ).fetchone()
    return None if row is None else bytes(row[0]) == record.hash


def insert_digest(
    conn: psycopg.Connection[Any], schema: str, table: str, record: DigestRecord
) -> None:
    conn.execute(insert_digest_sql(schema, table), digest_params(record))
