"""`auditq export`: one tenant's entries out of the database as JSON Lines or CSV.

The server does the work: `COPY (SELECT ...) TO STDOUT` sends rows as it produces them and
this process writes each one on, so memory stays flat however many rows there are. For JSON
Lines the server builds each line (`row_to_json`) and COPY runs in CSV format with a quote
and delimiter (U+0001, U+0002) that JSON text never holds raw (PostgreSQL escapes every
control character in JSON as `\\u00XX`): no field is ever quoted, so each line is exactly the
JSON object, whereas COPY's text format would double every backslash.

All of it runs in one REPEATABLE READ, READ ONLY transaction, so the count behind the
progress bar and the rows exported come from the same snapshot.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Final

import psycopg
from psycopg import IsolationLevel, sql

from .filters import Filters, NoTable, scope_session, table_columns
from .progress import ProgressBar
from .tables import qualified

#: Rows between progress checks: a clock read per row would cost more than the write.
_PROGRESS_EVERY: Final = 4096
#: Output buffer: few system calls per megabyte, still a constant.
_OUT_BUFFER: Final = 1 << 20


class Format(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"


def copy_statement(
    schema: str, table: str, columns: list[str], filters: Filters, fmt: Format
) -> tuple[sql.Composed, list[Any]]:
    """The COPY statement (parameters are merged client-side: COPY takes none) for `fmt`."""
    where, params = filters.where()
    rows = sql.SQL("SELECT {} FROM {} WHERE {}").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), qualified(schema, table), where
    )
    order = sql.SQL(" ORDER BY {}, {}").format(sql.Identifier("occurred_at"), sql.Identifier("id"))
    limit = sql.SQL("")
    if filters.limit is not None:
        limit = sql.SQL(" LIMIT %s")
        params.append(filters.limit)
    if fmt is Format.CSV:
        query = sql.Composed([rows, order, limit])
        options = sql.SQL("FORMAT csv, HEADER true, ENCODING 'UTF8'")
    else:
        query = sql.SQL("SELECT row_to_json(r) FROM ({}) r ORDER BY r.{}, r.{}{}").format(
            rows, sql.Identifier("occurred_at"), sql.Identifier("id"), limit
        )
        options = sql.SQL(r"FORMAT csv, QUOTE E'\x01', DELIMITER E'\x02', ENCODING 'UTF8'")
    return sql.SQL("COPY ({}) TO STDOUT WITH ({})").format(query, options), params


def count_statement(schema: str, table: str, filters: Filters) -> tuple[sql.Composed, list[Any]]:
    """How many rows the export will write (for the progress bar's end)."""
    where, params = filters.where()
    inner = sql.SQL("SELECT 1 FROM {} WHERE {}").format(qualified(schema, table), where)
    if filters.limit is not None:
        inner = sql.SQL("{} LIMIT %s").format(inner)
        params.append(filters.limit)
    return sql.SQL("SELECT count(*) FROM ({}) n").format(inner), params


def export(
    conn: psycopg.Connection[Any],
    filters: Filters,
    fmt: Format,
    out: IO[bytes],
    *,
    schema: str,
    table: str,
    progress: bool = False,
) -> int:
    """Write the selected rows to `out`, oldest first; returns how many were written.

    `conn` must be idle and not in autocommit's way: the export sets its own transaction
    characteristics. Every column of the table is exported, in table order, so columns added
    after this code was written (such as `origin`) come along.
    """
    conn.autocommit = False
    conn.isolation_level = IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    with conn.transaction(), conn.cursor() as cur:
        columns = table_columns(cur, schema, table)
        if not columns:
            raise NoTable(f"no table {schema}.{table}")
        scope_session(cur, filters.tenant)
        # Times in exports are UTC and ISO 8601 whatever the role's or server's defaults.
        cur.execute("SELECT set_config('TimeZone', 'UTC', true)")
        cur.execute("SELECT set_config('DateStyle', 'ISO, YMD', true)")
        bar = None
        if progress:
            counted, count_params = count_statement(schema, table, filters)
            total = cur.execute(counted, count_params).fetchone()
            bar = ProgressBar(int(total[0]) if total else None)
        statement, params = copy_statement(schema, table, columns, filters, fmt)
        messages = 0
        check = _PROGRESS_EVERY
        with cur.copy(statement, params) as copy:
            for data in copy:
                out.write(data)
                messages += 1
                if bar is not None and messages >= check:
                    check = messages + _PROGRESS_EVERY
                    bar.update(messages)
        out.flush()
        written = cur.rowcount
        if bar is not None:
            bar.finish(written)
    return written


class OutputError(ValueError):
    """An output path that cannot take the export (a directory, a missing parent)."""


def check_output(path: str) -> None:
    """Refuse, before connecting, an output that cannot work."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{path} is a directory")
    if not target.exists() and not target.parent.is_dir():
        raise OutputError(f"no directory {target.parent}")


@contextlib.contextmanager
def open_output(path: str | None) -> Iterator[IO[bytes]]:
    """The stream to export into: stdout, or a private (0600) file.

    A regular file is written under a temporary name beside it and renamed into place only
    when the export completed, so a failed or interrupted export never leaves a truncated
    file that looks like a whole one. A device or pipe (`/dev/null`, a FIFO) is written to
    directly.
    """
    if path is None or path == "-":
        stdout = os.fdopen(os.dup(1), "wb", buffering=_OUT_BUFFER)
        with stdout:
            yield stdout
        return
    target = Path(path)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(target.stat().st_mode):
            with open(target, "wb", buffering=_OUT_BUFFER) as special:
                yield special
            return
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb", buffering=_OUT_BUFFER) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
