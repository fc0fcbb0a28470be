"""Retention: whole partitions older than the kept period are detached and dropped.

Never a DELETE: the guards forbid it, and dropping a month is constant-time and writes
almost no WAL. Each drop is recorded first, in the same transaction, in the append-only
`auditq_retention_log` (table, partition, range, row count, size, the kept period, when,
the current role and the session's login): the record and the drop commit together or
not at all.

A chained table (docs/tamper-evidence.md) keeps verifying after a drop: in the drop's
transaction, under the lock, the runs of chain positions the partition holds are listed
and signed (`--key`, the checkpointer's signer key) into `<table>_retention`, so `auditq
verify` reports them PURGED rather than MISSING. A partition holding chained rows that no
checkpoint has signed yet is not dropped: until a checkpoint anchors them nothing proves
what they were, and dropping them would leave an unverifiable gap.

Only the table's owner may do this: a login that is a member of the (NOLOGIN) owner role
switches to it with SET ROLE; anyone else is refused before anything is touched.
DETACH without CONCURRENTLY takes an ACCESS EXCLUSIVE lock on the parent for the moment
of the detach (writers wait that long, bounded by `lock_timeout`); CONCURRENTLY cannot run
inside the transaction that also records the drop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg import sql

from . import chain_schema
from .checkpoint import PurgedRange, SignerKey, latest_checkpoint, purged_ranges, record_retention
from .partitions import Partition, add_months, is_partitioned, list_partitions
from .tables import RETENTION_TABLE, qualified, regclass_text

_KEEP: Final = re.compile(r"(\d+)(y|mo|w|d)")
#: How long a drop waits for the parent's lock before giving up (writers queue behind it).
LOCK_TIMEOUT: Final = "10s"


class RetentionError(ValueError):
    """Why retention refuses to run; one line."""


@dataclass(frozen=True)
class Keep:
    """A kept period: calendar months and days (`13mo`, `1y6mo`, `400d`, `2w`)."""

    text: str
    months: int
    days: int

    def cutoff(self, now: datetime) -> datetime:
        """Rows older than this may go: partitions that end at or before it are dropped."""
        moment = now.astimezone(UTC) - timedelta(days=self.days)
        if not self.months:
            return moment
        shifted = add_months(moment, -self.months)
        # add_months gives a month's first instant: keep the day and time where they exist.
        day = min(moment.day, _days_in(shifted.year, shifted.month))
        return shifted.replace(
            day=day,
            hour=moment.hour,
            minute=moment.minute,
            second=moment.second,
            microsecond=moment.microsecond,
        )


def _days_in(year: int, month: int) -> int:
    following = add_months(datetime(year, month, 1, tzinfo=UTC), 1)
    return (following - timedelta(days=1)).day


def parse_keep(text: str) -> Keep:
    """`13mo` -> Keep; raises RetentionError (one line) for anything else."""
    value = text.strip().lower()
    parts = _KEEP.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        hint = " (months are 'mo': 'm' would be ambiguous)" if value.endswith("m") else ""
        raise RetentionError(
            f"--keep {text!r} does not parse: use a number and a unit, y, mo, w or d, "
            f"for example 13mo or 1y6mo{hint}"
        )
    months = days = 0
    for number, unit in parts:
        n = int(number)
        if unit == "y":
            months += 12 * n
        elif unit == "mo":
            months += n
        elif unit == "w":
            days += 7 * n
        else:
            days += n
    if months == 0 and days == 0:
        raise RetentionError(f"--keep {text!r} keeps nothing: give a period longer than zero")
    return Keep(text.strip(), months, days)


def plan(
    conn: psycopg.Connection[Any], schema: str, table: str, keep: Keep, now: datetime | None = None
) -> list[Partition]:
    """The partitions `keep` would drop: those whose whole range ends at or before the
    cutoff (a partition open at either end is dropped only when its upper bound passes)."""
    if not is_partitioned(conn, schema, table):
        raise RetentionError(
            f"{schema}.{table} is not partitioned: retention drops whole partitions and "
            f"never deletes rows; convert it first with `auditq migrate --to-partitioned`"
        )
    cutoff = keep.cutoff(now or datetime.now(UTC))
    return [
        p
        for p in list_partitions(conn, schema, table)
        if p.range_to is not None and p.range_to <= cutoff
    ]


def become_owner(conn: psycopg.Connection[Any], schema: str, table: str) -> str:
    """Act as the table's owner (SET ROLE when the login is a member of it); returns its
    name. Raises RetentionError when this login is neither the owner nor a member."""
    row = conn.execute(
        """SELECT pg_get_userbyid(c.relowner), pg_has_role(c.relowner, 'MEMBER'),
                  pg_has_role(c.relowner, 'USAGE'), current_user
           FROM pg_class c WHERE c.oid = %s::regclass""",
        (regclass_text(schema, table),),
    ).fetchone()
    assert row is not None
    owner, member, _, current = row
    if owner == current:
        return str(owner)
    # A member (a superuser is a member of every role) acts as the owner, so the record
    # names the owner as the role and the login as the session user.
    if not member:
        raise RetentionError(
            f"retention must run as the owner of {schema}.{table} ({owner}) or a member of "
            f"it; {current} is neither"
        )
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(owner)))
    return str(owner)


def chained_ranges(
    conn: psycopg.Connection[Any],
    schema: str,
    table: str,
    part: Partition,
    key: SignerKey | None,
) -> list[PurgedRange]:
    """The chain position runs `part` holds (empty when it holds no chained row), after
    checking they may go: RetentionError when there is no key to sign their record, or
    when the latest checkpoint does not anchor all of them."""
    if not chain_schema.is_chained(conn, schema, part.name):
        return []
    ranges = purged_ranges(conn, schema, part.name)
    if not ranges:
        return []
    rows = sum(r.rows for r in ranges)
    where = f"{schema}.{part.name}"
    if key is None:
        raise RetentionError(
            f"{where} holds {rows} chained rows: pass --key FILE (the checkpoint signer key) "
            f"so the drop is recorded, signed, and `auditq verify` reports them PURGED"
        )
    point = latest_checkpoint(conn, schema, table)
    signed = {h.stream: h.next_pos for h in point.heads} if point else {}
    behind = [r for r in ranges if signed.get(r.stream, 1) < r.end_pos]
    if behind:
        late = sum(r.rows for r in behind)
        raise RetentionError(
            f"{where} holds {late} chained rows no checkpoint anchors yet "
            f"(stream {behind[0].stream} up to position {behind[0].end_pos - 1}): run "
            f"`auditq checkpoint` first, then retention again"
        )
    return ranges


def drop(
    conn: psycopg.Connection[Any],
    schema: str,
    table: str,
    keep: Keep,
    partitions: list[Partition],
    *,
    key: SignerKey | None = None,
) -> list[int]:
    """Record, detach and drop each of `partitions`, one transaction each; returns the
    numbers of the chain's retention records written (none for unchained partitions).
    `key` signs those records; RetentionError (nothing of that partition dropped) when a
    partition holds chained rows and there is no key or no checkpoint anchoring them."""
    parent = qualified(schema, table)
    log = qualified(schema, RETENTION_TABLE)
    purges: list[int] = []
    for part in partitions:
        target = qualified(schema, part.name)
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
            conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(target))
            # Under the lock, so the signed record lists exactly the positions that go.
            ranges = chained_ranges(conn, schema, table, part, key)
            if ranges:
                assert key is not None
                purges.append(
                    record_retention(
                        conn,
                        schema,
                        table,
                        key,
                        ranges,
                        f"auditq retention --keep {keep.text}: partition {part.name} "
                        f"[{_bound(part.range_from)}, {_bound(part.range_to)})",
                    )
                )
            # Counted under the lock: the record states exactly what was dropped.
            counted = conn.execute(
                sql.SQL("SELECT count(*), pg_total_relation_size({}::regclass) FROM {}").format(
                    sql.Literal(regclass_text(schema, part.name)), target
                )
            ).fetchone()
            assert counted is not None
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (table_name, partition_name, range_from, range_to, "
                    "row_count, total_bytes, keep) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                ).format(log),
                (
                    table,
                    part.name,
                    part.range_from,
                    part.range_to,
                    counted[0],
                    counted[1],
                    keep.text,
                ),
            )
            conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(parent, target))
            conn.execute(sql.SQL("DROP TABLE {}").format(target))
    return purges


def _bound(value: datetime | None) -> str:
    return value.isoformat() if value is not None else "unbounded"
