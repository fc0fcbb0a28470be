"""`auditq tail`: the latest entries for a person at a terminal, and new ones as they land.

Following polls by `recorded_at`, not `occurred_at`: an entry replayed from a disk spool
after an outage lands now with an `occurred_at` from hours ago, and would never show up
behind an `occurred_at` watermark. `recorded_at` is the start of the inserting transaction,
so a row can still become visible after rows with a later `recorded_at` (its transaction
committed late). Each poll therefore reads back an overlap window before the previous poll's
time and skips the ids it already printed; a row is missed only if its transaction ran longer
than the window (the default is four times the writer's default `write_timeout`, after which
the writer gives a write up as hung).

Everything printed passes through `printable()`: audit rows carry attacker-controlled text
(user agents, resource ids), and raw escape sequences must not reach an auditor's terminal.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
import psycopg
from psycopg import IsolationLevel, sql
from psycopg.types.json import set_json_loads

from .backoff import Backoff
from .filters import Filters, NoTable, scope_session, table_columns
from .reader import ENTRY_COLUMNS, PAGE_ROWS, StoredEntry, entry_from_row
from .tables import qualified

#: How far back each poll looks again for rows whose transaction committed late.
DEFAULT_OVERLAP: Final = timedelta(seconds=60)
#: Seconds between polls.
DEFAULT_INTERVAL: Final = 1.0

# C0 and C1 controls, DEL, line and paragraph separators, and the bidirectional overrides
# that can reorder a line on screen.
_UNPRINTABLE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every control or bidi-override character shown as an escape (`\\x1b`)."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


def format_entry(entry: StoredEntry, *, show_tenant: bool = True) -> str:
    """One line: time (UTC), tenant, action, outcome, then whichever of the rest is set."""
    at = entry.occurred_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    parts = [at]
    if show_tenant:
        parts.append(entry.tenant_id or "-")
    parts.append(entry.action)
    parts.append(str(entry.outcome) if entry.outcome is not None else "-")
    for name, kind, ident in (
        ("actor", entry.actor_type, entry.actor_id),
        ("resource", entry.resource_type, entry.resource_id),
    ):
        if kind or ident:
            parts.append(f"{name}={':'.join(filter(None, (kind, ident)))}")
    for name, value in (("ip", entry.ip), ("request", entry.request_id), ("origin", entry.origin)):
        if value is not None:
            parts.append(f"{name}={value}")
    if entry.metadata:
        parts.append(orjson.dumps(entry.metadata, default=str).decode())
    return printable("  ".join(parts))


def _begin(conn: psycopg.Connection[Any], filters: Filters) -> psycopg.Cursor[Any]:
    cur = conn.cursor()
    scope_session(cur, filters.tenant)
    return cur


def latest(
    conn: psycopg.Connection[Any], filters: Filters, schema: str, table: str, n: int
) -> list[StoredEntry]:
    """The last `n` entries by `occurred_at`, oldest first."""
    if n <= 0:
        return []
    present = _columns(conn, schema, table)
    names = [name for name in ENTRY_COLUMNS if name in present]
    where, params = filters.where()
    statement = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {} DESC, {} DESC LIMIT %s").format(
        sql.SQL(", ").join(map(sql.Identifier, names)),
        qualified(schema, table),
        where,
        sql.Identifier("occurred_at"),
        sql.Identifier("id"),
    )
    with conn.transaction():
        cur = _begin(conn, filters)
        set_json_loads(orjson.loads, cur)
        rows = cur.execute(statement, [*params, n]).fetchall()
    return [entry_from_row(names, row) for row in reversed(rows)]


def _columns(conn: psycopg.Connection[Any], schema: str, table: str) -> list[str]:
    with conn.transaction(), conn.cursor() as cur:
        present = table_columns(cur, schema, table)
    if not present:
        raise NoTable(f"no table {schema}.{table}")
    if "recorded_at" not in present:
        raise NoTable(f"{schema}.{table} has no recorded_at column to follow")
    return present


class Follower:
    """New entries as they become visible, each once, in the order they are found."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        filters: Filters,
        *,
        schema: str,
        table: str,
        overlap: timedelta = DEFAULT_OVERLAP,
    ) -> None:
        self._conn = conn
        self._filters = Filters(
            tenant=filters.tenant,
            since=filters.since,
            until=filters.until,
            action=filters.action,
            actor=filters.actor,
        )
        self._schema, self._table = schema, table
        self._overlap = overlap
        # Ids printed (or present at the start) whose recorded_at is still inside the window.
        self._seen: dict[uuid.UUID, datetime] = {}
        self._lower: datetime | None = None
        self._prepare(conn)
        self._present = _columns(conn, schema, table)

    @staticmethod
    def _prepare(conn: psycopg.Connection[Any]) -> None:
        conn.autocommit = False
        conn.isolation_level = IsolationLevel.READ_COMMITTED

    def start(self) -> None:
        """Take every row visible now as already shown (the caller printed the latest)."""
        self._poll(emit=False)

    def reattach(self, conn: psycopg.Connection[Any]) -> None:
        """Go on over a new connection (the old one was lost), with the same bookkeeping."""
        with contextlib.suppress(psycopg.Error):
            self._conn.close()
        self._conn = conn
        self._prepare(conn)

    def close(self) -> None:
        """Close the connection this follower is on now."""
        self._conn.close()

    def mark_seen(self, entries: list[StoredEntry]) -> None:
        """Entries printed by other means (the latest N), not to be printed again."""
        for entry in entries:
            if entry.recorded_at is not None:
                self._seen[entry.id] = entry.recorded_at

    def poll(self) -> Iterator[StoredEntry]:
        """The rows that became visible since the last poll."""
        return self._poll(emit=True)

    def _poll(self, *, emit: bool) -> Iterator[StoredEntry]:
        # Stream under a named cursor: a window can hold many rows on a busy table.
        statement, params, names = self._statement()
        found: list[StoredEntry] = []
        with self._conn.transaction():
            cur = _begin(self._conn, self._filters)
            row = cur.execute("SELECT now()").fetchone()
            assert row is not None
            now: datetime = row[0]
            with self._conn.cursor(f"auditq_tail_{uuid.uuid4().hex}") as named:
                set_json_loads(orjson.loads, named)
                named.itersize = PAGE_ROWS
                named.execute(statement, [*params, self._lower_bound(now)])
                for values in named:
                    entry = entry_from_row(names, values)
                    if entry.id in self._seen:
                        continue
                    assert entry.recorded_at is not None
                    self._seen[entry.id] = entry.recorded_at
                    if emit:
                        found.append(entry)
        # Rows below the next poll's lower bound can never come back: forget them.
        self._lower = now - self._overlap
        self._seen = {k: v for k, v in self._seen.items() if v >= self._lower}
        return iter(found)

    def _lower_bound(self, now: datetime) -> datetime:
        return self._lower if self._lower is not None else now - self._overlap

    def _statement(self) -> tuple[sql.Composed, list[Any], list[str]]:
        names = [name for name in ENTRY_COLUMNS if name in self._present]
        where, params = self._filters.where()
        statement = sql.SQL("SELECT {} FROM {} WHERE {} AND {} >= %s ORDER BY {}, {}").format(
            sql.SQL(", ").join(map(sql.Identifier, names)),
            qualified(self._schema, self._table),
            where,
            sql.Identifier("recorded_at"),
            sql.Identifier("recorded_at"),
            sql.Identifier("id"),
        )
        return statement, params, names


def follow(
    follower: Follower,
    emit: Callable[[StoredEntry], None],
    *,
    interval: float = DEFAULT_INTERVAL,
    connect: Callable[[], psycopg.Connection[Any]] | None = None,
    say: Callable[[str], None] = lambda _text: None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll forever, handing each new entry to `emit`; ends only by an exception (Ctrl-C).

    With `connect`, a lost connection (a server restart) is replaced, with backoff, instead
    of ending the tail; the bookkeeping carries over, so rows stored meanwhile still show.
    """
    backoff = Backoff(base=0.5, cap=10.0)
    while True:
        try:
            for entry in follower.poll():
                emit(entry)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if connect is None:
                raise
            say(f"connection lost ({str(exc).strip().splitlines()[0]}); reconnecting")
            while True:
                sleep(backoff.next_delay())
                try:
                    follower.reattach(connect())
                except psycopg.OperationalError:
                    continue
                say("reconnected")
                backoff.reset()
                break
        sleep(interval)
