"""What a read selects: one tenant, a time range, an action, an actor; checked, then as SQL.

`read()`, `auditq export` and `auditq tail` share this, so the three select the same rows for
the same options and refuse the same bad input with the same words. Values always travel as
query parameters; identifiers go through `psycopg.sql`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg import sql

from .entry import MAX_NAME_CHARS

#: The session setting a row-level security policy reads to know the reader's tenant.
TENANT_SETTING: Final = "auditq.tenant"

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE: Final = re.compile(r"(?:\d+[smhdw])+")
_PART: Final = re.compile(r"(\d+)([smhdw])")
# Far enough back for any retention rule, near enough for PostgreSQL's timestamps.
_LONGEST: Final = 1000 * 366 * 86400
# Control characters (C0, DEL, C1) have no place in a tenant id and would hide in a terminal.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class FilterError(ValueError):
    """An option that cannot select anything meaningful; the message is one line for a person."""


Moment = datetime | timedelta
"""A point in time: an aware datetime, or a duration back from the database's clock."""


def check_tenant(tenant: str) -> str:
    """The tenant id as given, or `FilterError` when no stored tenant id could look like it.

    Strict on purpose: a tenant with a stray space or a pasted newline would silently export
    nothing, which an auditor could read as "this tenant had no events".
    """
    if not isinstance(tenant, str):
        raise FilterError(f"tenant must be text, not {type(tenant).__name__}")
    if not tenant:
        raise FilterError("tenant is empty")
    if len(tenant) > MAX_NAME_CHARS:
        raise FilterError(f"tenant is longer than {MAX_NAME_CHARS} characters")
    if _CONTROL.search(tenant):
        raise FilterError("tenant contains control characters")
    if tenant != tenant.strip():
        raise FilterError("tenant starts or ends with whitespace")
    return tenant


def parse_moment(text: str, name: str = "time") -> Moment:
    """ISO 8601 (`2026-01-31`, `2026-01-31T12:00:00+02:00`, `...Z`; no offset means UTC) or
    a duration back from now (`90s`, `15m`, `24h`, `7d`, `2w`, `1d12h`)."""
    value = text.strip()
    if not value:
        raise FilterError(f"{name} is empty")
    if _RELATIVE.fullmatch(value):
        seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(value))
        if seconds > _LONGEST:
            raise FilterError(f"{name} {text!r} is too long ago")
        return timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise FilterError(
            f"{name} {text!r} is neither an ISO 8601 time (2026-01-31T12:00Z) "
            "nor a duration back from now (24h, 7d)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _moment(name: str, value: Moment | str | None) -> Moment | None:
    if value is None or isinstance(value, timedelta):
        if isinstance(value, timedelta) and value < timedelta(0):
            raise FilterError(f"{name} must not be a negative duration")
        return value
    if isinstance(value, str):
        return parse_moment(value, name)
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise FilterError(f"{name} must be timezone-aware")
        return value
    raise FilterError(f"{name} must be a datetime, a timedelta or text, not {type(value)}")


def _optional_name(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise FilterError(f"{name} must be non-empty text")
    if "\x00" in value:
        raise FilterError(f"{name} contains NUL")
    return value


@dataclass(frozen=True, slots=True)
class Filters:
    """The rows a read selects. `since` is inclusive, `until` exclusive, both on `occurred_at`
    (when the event happened); a timedelta counts back from the database's `now()`."""

    tenant: str | None = None
    since: Moment | None = None
    until: Moment | None = None
    action: str | None = None
    actor: str | None = None
    limit: int | None = None

    @classmethod
    def checked(
        cls,
        *,
        tenant: str | None = None,
        since: Moment | str | None = None,
        until: Moment | str | None = None,
        action: str | None = None,
        actor: str | None = None,
        limit: int | None = None,
    ) -> Filters:
        """Filters from a caller's values, or `FilterError` saying which one is wrong."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise FilterError("limit must be a whole number")
        if limit is not None and limit <= 0:
            raise FilterError("limit must be at least 1")
        start, end = _moment("since", since), _moment("until", until)
        if isinstance(start, datetime) and isinstance(end, datetime) and start >= end:
            raise FilterError("since is not before until: nothing can match")
        if isinstance(start, timedelta) and isinstance(end, timedelta) and start <= end:
            raise FilterError("since is not before until: nothing can match")
        return cls(
            tenant=None if tenant is None else check_tenant(tenant),
            since=start,
            until=end,
            action=_optional_name("action", action),
            actor=_optional_name("actor", actor),
            limit=limit,
        )

    def where(self) -> tuple[sql.Composable, list[Any]]:
        """The WHERE clause (`TRUE` when nothing filters) and its parameters, in order.

        The tenant is filtered here as well as by the session setting, so a read is right
        on a table without row-level security and cannot widen on one whose policy is loose.
        """
        terms: list[sql.Composable] = []
        params: list[Any] = []
        if self.tenant is not None:
            terms.append(sql.SQL("{} = %s").format(sql.Identifier("tenant_id")))
            params.append(self.tenant)
        for bound, op in ((self.since, ">="), (self.until, "<")):
            if bound is None:
                continue
            value = sql.SQL("now() - %s") if isinstance(bound, timedelta) else sql.SQL("%s")
            terms.append(
                sql.SQL("{} {} {}").format(sql.Identifier("occurred_at"), sql.SQL(op), value)
            )
            params.append(bound)
        for column, wanted in (("action", self.action), ("actor_id", self.actor)):
            if wanted is not None:
                terms.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                params.append(wanted)
        if not terms:
            return sql.SQL("TRUE"), params
        return sql.SQL(" AND ").join(terms), params


def scope_session(cur: psycopg.Cursor[Any], tenant: str | None) -> None:
    """Tell a row-level security policy whose rows this transaction may see.

    Transaction-local (`set_config(..., true)`), so a pooled connection does not carry one
    tenant's scope into the next request's transaction.
    """
    if tenant is not None:
        cur.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, tenant))


def table_columns(cur: psycopg.Cursor[Any], schema: str, table: str) -> list[str]:
    """The table's columns in table order, read from the catalog so that columns added by a
    migration (such as `origin`) are exported without a code change; [] when it is missing."""
    cur.execute(
        """SELECT a.attname FROM pg_catalog.pg_attribute a
           JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
           ORDER BY a.attnum""",
        (schema, table),
    )
    return [str(row[0]) for row in cur.fetchall()]


class NoTable(LookupError):
    """The audit table does not exist (or this role cannot see its catalog entry)."""
