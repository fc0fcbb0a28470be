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
from .regclass import regclass_text

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


def chain_tables(table: str) -> tuple[str, str, str]:
    """The digests, checkpoints and retention tables of `table`."""
    return digests_table(table), checkpoints_table(table), retention_table(table)


def guard_function(table: str) -> str:
    """The trigger function that keeps the chain tables append-only."""
    return _name(table, "_chain_append_only")


def chain_index(table: str) -> str:
    """The (chain_stream, chain_pos) index on the audit table (and, cloned, its partitions).

    A BRIN, not a btree: a full `verify` reads the table in a sequential scan and a sort
    whatever the index (the planner's choice: benchmarks/chain_index.py), so the index only
    narrows the partial reads (`--since TIME`, `--tenant`) to the block ranges holding a
    stream's positions, and a btree's per-row upkeep was the largest share of what chaining
    cost the server's COPY, paid by unchained writers too (docs/tamper-evidence.md, "Cost")."""
    return _name(table, "_chain_brin")


def _guard_triggers(name: str) -> tuple[str, str]:
    return _name(name, "_no_change"), _name(name, "_no_truncate")


def q(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def chain_ddl(schema: str, table: str, *, index: bool = True) -> list[sql.Composed]:
    """The statements (each safe to run again) that make `table` chainable (`index=False`:
    all but the index, for a caller that builds it CONCURRENTLY)."""
    target = q(schema, table)
    digests = q(schema, digests_table(table))
    checkpoints = q(schema, checkpoints_table(table))
    retention = q(schema, retention_table(table))
    built_index = index_sql(schema, table)
    statements: list[sql.Composed] = [
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS chain_stream uuid, "
            "ADD COLUMN IF NOT EXISTS chain_pos bigint"
        ).format(target),
        # A table made with the earlier btree converges to the BRIN (see `chain_index`).
        sql.SQL("DROP INDEX IF EXISTS {}").format(q(schema, _name(table, "_chain_idx"))),
        built_index,
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
        ).format(q(schema, guard_function(table))),
    ]
    if not index:
        statements = [st for st in statements if st is not built_index]
    for name in (digests_table(table), checkpoints_table(table), retention_table(table)):
        guard = q(schema, guard_function(table))
        no_change, no_truncate = _guard_triggers(name)
        for trigger, when in (
            (no_change, "BEFORE UPDATE OR DELETE ON {table} FOR EACH ROW"),
            (no_truncate, "BEFORE TRUNCATE ON {table} FOR EACH STATEMENT"),
        ):
            statements.append(
                # Created when missing, and set to fire always again where someone
                # disabled it (so `auditq migrate` repairs it, as it does the table's).
                sql.SQL(
                    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = {name} "
                    "AND tgrelid = {rel}::regclass) THEN "
                    "CREATE TRIGGER {trigger} " + when + " EXECUTE FUNCTION {guard}(); END IF; "
                    "IF (SELECT tgenabled FROM pg_trigger WHERE tgname = {name} "
                    "AND tgrelid = {rel}::regclass) <> 'A' THEN "
                    "ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger}; END IF; END $$"
                ).format(
                    name=sql.Literal(trigger),
                    rel=sql.Literal(regclass_text(schema, name)),
                    trigger=sql.Identifier(trigger),
                    guard=guard,
                    table=q(schema, name),
                )
            )
    return statements


def index_sql(schema: str, table: str, *, concurrently: bool = False) -> sql.Composed:
    return sql.SQL(
        "CREATE INDEX {}IF NOT EXISTS {} ON {} USING brin (chain_stream, chain_pos)"
    ).format(
        sql.SQL("CONCURRENTLY " if concurrently else ""),
        sql.Identifier(chain_index(table)),
        q(schema, table),
    )


def create_chain_tables(
    conn: psycopg.Connection[Any], schema: str, table: str, *, index: bool = True
) -> None:
    """Add the chain columns to `table` and create its digests, checkpoints and retention
    tables; idempotent, and serialised against concurrent runs. `index=False` leaves the
    (chain_stream, chain_pos) index to the caller (`auditq migrate` builds it CONCURRENTLY
    on a plain table that may be large)."""
    with conn.transaction():
        key = hashlib.sha1(f"auditq-chain:{schema}.{table}".encode(), usedforsecurity=False)
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s)",
            (int.from_bytes(key.digest()[:8], "big", signed=True),),
        )
        # Nothing to do: no DDL at all, so a rerun (init-db, migrate) needs no ownership of
        # the table (ALTER TABLE ... IF NOT EXISTS still does).
        wanted = missing_pieces(conn, schema, table)
        if not index:
            wanted = [w for w in wanted if not w.startswith("index ")]
        if not wanted:
            return
        for statement in chain_ddl(schema, table, index=index):
            conn.execute(statement)


CHAIN_COLUMNS: Final = ("chain_stream", "chain_pos")


def missing_pieces(conn: psycopg.Connection[Any], schema: str, table: str) -> list[str]:
    """What `create_chain_tables` would still add to `schema.table` (empty: it is chained),
    so that `auditq migrate` reports what it did and does nothing the second time."""
    missing: list[str] = []
    found = {
        str(r[0])
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
            "AND NOT attisdropped AND attname = ANY(%s)",
            (regclass_text(schema, table), list(CHAIN_COLUMNS)),
        )
    }
    missing.extend(f"column {c}" for c in CHAIN_COLUMNS if c not in found)
    relations = [
        ("index", chain_index(table)),
        ("table", digests_table(table)),
        ("table", checkpoints_table(table)),
        ("table", retention_table(table)),
    ]
    for kind, name in relations:
        exists = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (regclass_text(schema, name),)
        ).fetchone()
        if not (exists and exists[0]):
            missing.append(f"{kind} {name}")
            continue
        if kind == "index":
            valid = conn.execute(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                (regclass_text(schema, name),),
            ).fetchone()
            if not (valid and valid[0]):
                missing.append(f"{kind} {name} (invalid: a concurrent build failed)")
        if kind != "table":
            continue
        triggers = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s) "
            "AND tgname = ANY(%s) AND tgenabled = 'A'",
            (regclass_text(schema, name), list(_guard_triggers(name))),
        ).fetchone()
        if not triggers or triggers[0] != 2:
            missing.append(f"append-only guards on {name}")
    return missing


def is_chained(conn: psycopg.Connection[Any], schema: str, relation: str) -> bool:
    """True when `relation` (the audit table or one of its partitions) has the chain columns."""
    row = conn.execute(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass(%s) "
        "AND attname = ANY(%s) AND NOT attisdropped",
        (regclass_text(schema, relation), list(CHAIN_COLUMNS)),
    ).fetchone()
    return bool(row and row[0] == len(CHAIN_COLUMNS))


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
