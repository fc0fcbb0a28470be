"""Where a COPY goes on a partitioned table: straight into the partition that holds every row
of the batch, when the writer may insert there; else into the parent.

Through the parent, the server finds each row's partition itself, a cost per row that direct
COPYs into the month's own partition do not pay (benchmarks/README.md, "partitioned COPY").
A writer's rows nearly all carry "now", so nearly every batch falls in the current month.

What routing never changes: the rows, the constraints and row triggers they meet (a
partition inherits the parent's CHECKs, and the append-only triggers are on every
partition), and the idempotent replay, which always goes through the parent. What it does
change: statement-level INSERT triggers on the parent do not fire for a routed COPY (auditq
installs none; docs/audit-trail.md says so).

A route is only a shortcut. When a routed COPY fails because of the route (the partition
was dropped or detached, INSERT on it was revoked, a later chunk of the batch belongs to
another month), the batch is retried at once through the parent, and routing rests for
`REST_SECONDS`; the partition list is read again after that, or when a batch's month has no
known route (a month the writer just created) and the last read is older than
`RELOAD_SECONDS`. A table that is not partitioned is never asked again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg import sql

from .binary import occurred_span
from .tables import qualified, regclass_text

#: How long routing rests after a routed COPY failed because of its route.
REST_SECONDS: Final = 60.0
#: The least time between two reads of the partition list on a miss.
RELOAD_SECONDS: Final = 60.0
#: SQLSTATEs of a routed COPY that blame the route, not the rows or the server: undefined
#: table (dropped), insufficient privilege (revoked, or never granted on a new month),
#: feature not supported (row-level security enabled on the partition) and a check
#: violation without a constraint name (a row outside the partition's range).
ROUTE_FAILURES: Final = frozenset({"42P01", "42501", "0A000", "23514"})

_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_ONE_US: Final = timedelta(microseconds=1)

# The range partitions (FROM a bound TO a bound, no MINVALUE/MAXVALUE) of the table that the
# current role may INSERT into, without row-level security of their own.
_ROUTES_SQL: Final = """
SELECT (SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass(%(t)s)),
       n.nspname, c.relname, b[1]::timestamptz, b[2]::timestamptz
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_namespace n ON n.oid = c.relnamespace,
LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                     '^FOR VALUES FROM \\(''([^'']*)''\\) TO \\(''([^'']*)''\\)$') AS b
WHERE i.inhparent = to_regclass(%(t)s) AND c.relkind = 'r' AND NOT c.relrowsecurity
  AND has_table_privilege(c.oid, 'INSERT')
  AND b[1] NOT LIKE '%%infinity' AND b[2] NOT LIKE '%%infinity'
UNION ALL
SELECT (SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass(%(t)s)),
       NULL, NULL, NULL, NULL
"""


def _micros(moment: datetime) -> int:
    return (moment - _PG_EPOCH) // _ONE_US


@dataclass(frozen=True)
class Route:
    """One partition: the rows whose occurred_at is in [first, end) (microseconds since
    2000-01-01 UTC, as the encoder writes them) may be copied into it with `copy`."""

    first: int
    end: int
    copy: sql.Composed


class Routes:
    """The writer's routes for one table; used by the writer thread alone."""

    def __init__(self, schema: str, table: str, columns: sql.Composable) -> None:
        self._schema, self._table = schema, table
        self._columns = columns
        self._routes: list[Route] = []
        #: None until a read finds the table; False for a table that is not partitioned.
        self.partitioned: bool | None = None
        self._read_at = 0.0
        self._missed = False
        self._rest_until = 0.0

    def copy_for(self, data: bytes) -> sql.Composed | None:
        """The COPY statement into the one partition holding every row of `data`, or None
        (go through the parent)."""
        if not self._routes or time.monotonic() < self._rest_until:
            return None
        span = occurred_span(data)
        if span is None:
            return None
        first, last = span
        for route in reversed(self._routes):  # newest first: most rows are "now"
            if route.first <= first and last < route.end:
                return route.copy
        self._missed = True
        return None

    def due(self) -> bool:
        """Whether to read the partition list (again) before this batch."""
        if self.partitioned is False:
            return False
        now = time.monotonic()
        if now < self._rest_until:
            return False
        if self.partitioned is None:
            return True
        return self._missed and now - self._read_at >= RELOAD_SECONDS

    def load(self, conn: psycopg.Connection[Any]) -> None:
        """Read the partitions the connection's role may insert into (one query). Leaves
        no transaction open on a connection that is not in autocommit."""
        found = conn.execute(
            _ROUTES_SQL, {"t": regclass_text(self._schema, self._table)}
        ).fetchall()
        if not conn.autocommit:
            conn.rollback()
        routes = [
            Route(
                _micros(lo),
                _micros(hi),
                sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                    qualified(str(part_schema), str(name)), self._columns
                ),
            )
            for _, part_schema, name, lo, hi in found
            if name is not None and isinstance(lo, datetime) and isinstance(hi, datetime)
        ]
        routes.sort(key=lambda route: route.first)
        kind = found[0][0] if found else None
        self.partitioned = None if kind is None else bool(kind)  # None: no such table yet
        self._routes = routes if self.partitioned else []
        self._read_at = time.monotonic()
        self._missed = False

    def failed(self) -> None:
        """A routed COPY failed because of its route: forget the routes and rest."""
        self._routes = []
        self._missed = False
        self.partitioned = None if self.partitioned else self.partitioned
        self._rest_until = time.monotonic() + REST_SECONDS
