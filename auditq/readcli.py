"""The handlers of `auditq export` and `auditq tail`: check the options, connect, run.

Exit status: 0 done, 1 the database or the output failed, 2 a bad option (one line on stderr,
before any connection is made).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

import psycopg

from .config import dsn_from_env
from .dsn import Dsn
from .export import Format, OutputError, check_output, export, open_output
from .filters import FilterError, Filters, NoTable
from .progress import wanted as progress_wanted


class _BadOption(Exception):
    pass


def _whole(name: str, text: str, *, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _BadOption(f"{name} must be a whole number, not {text!r}") from None
    if value < least:
        raise _BadOption(f"{name} must be at least {least}, not {value}")
    return value


def _seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _BadOption(f"{name} must be a number of seconds, not {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise _BadOption(f"{name} must be more than 0 seconds, not {text!r}")
    return value


def _filters(args: argparse.Namespace, *, limit: int | None = None) -> Filters:
    return Filters.checked(
        tenant=args.tenant,
        since=args.since,
        until=args.until,
        action=args.action,
        actor=args.actor,
        limit=limit,
    )


def _refuse(command: str, message: str) -> int:
    print(f"auditq {command}: {message}", file=sys.stderr)
    return 2


def _fail(command: str, message: str) -> int:
    print(f"auditq {command}: {message}", file=sys.stderr)
    return 1


def _dsn(args: argparse.Namespace) -> str | None:
    found: str | None = args.dsn or dsn_from_env()
    return found


def _quiet_stdout() -> None:
    # After a reader of our stdout went away (`| head`), the interpreter's final flush would
    # raise again and print a traceback; point stdout at /dev/null instead.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run_export(args: argparse.Namespace, schema: str, table: str) -> int:
    """`auditq export`: see docs/export.md."""
    try:
        if args.tenant is None:
            raise _BadOption("--tenant is required (exports are per tenant)")
        if args.format not in {f.value for f in Format}:
            raise _BadOption(f"--format must be jsonl or csv, not {args.format!r}")
        limit = None if args.limit is None else _whole("--limit", args.limit, least=1)
        filters = _filters(args, limit=limit)
        if args.output not in {None, "-"}:
            check_output(args.output)
        if args.proofs:
            others = [
                f"--{name}"
                for name in ("since", "until", "action", "actor", "limit")
                if getattr(args, name) is not None
            ]
            if others or args.format != "jsonl":
                raise _BadOption(
                    "--proofs exports all of the tenant's chained rows as JSON Lines: "
                    f"drop {' '.join(others) or '--format ' + args.format}"
                )
    except (_BadOption, FilterError, OutputError) as exc:
        return _refuse("export", str(exc))
    found = _dsn(args)
    if not found:
        return _refuse("export", "no database: pass --dsn or set AUDITQ_DSN / DATABASE_URL")
    safe = Dsn(found)
    if args.proofs:
        return _export_proofs(found, safe, args.tenant, args.output, schema, table)
    to_stdout = args.output in {None, "-"}
    try:
        with psycopg.connect(found) as conn, open_output(args.output) as out:
            export(
                conn,
                filters,
                Format(args.format),
                out,
                schema=schema,
                table=table,
                # Not over the data itself when that goes to the same terminal.
                progress=progress_wanted() and not (to_stdout and sys.stdout.isatty()),
            )
    except NoTable as exc:
        return _fail("export", str(exc))
    except psycopg.Error as exc:
        return _fail("export", f"failed: {safe.scrub(str(exc)).strip()}")
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except OSError as exc:
        return _fail("export", f"cannot write the output: {exc}")
    return 0


def _export_proofs(
    found: str, safe: Dsn, tenant: str, output: str | None, schema: str, table: str
) -> int:
    from .proofs import ProofsError, export_proofs

    try:
        with open_output(output) as out:
            export_proofs(found, schema, table, tenant, out)
    except ProofsError as exc:
        return _fail("export", str(exc))
    except psycopg.errors.UndefinedColumn:
        return _fail("export", f"{schema}.{table} is not chained: run `auditq migrate`")
    except psycopg.Error as exc:
        return _fail("export", f"failed: {safe.scrub(str(exc)).strip()}")
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except OSError as exc:
        return _fail("export", f"cannot write the output: {exc}")
    return 0


def run_tail(args: argparse.Namespace, schema: str, table: str) -> int:
    """`auditq tail`: see docs/export.md."""
    from .tail import Follower, follow, format_entry, latest

    try:
        lines = _whole("-n", args.lines, least=0)
        interval = _seconds("--interval", args.interval)
        filters = _filters(args)
    except (_BadOption, FilterError) as exc:
        return _refuse("tail", str(exc))
    found = _dsn(args)
    if not found:
        return _refuse("tail", "no database: pass --dsn or set AUDITQ_DSN / DATABASE_URL")
    safe = Dsn(found)
    show_tenant = filters.tenant is None

    def emit(entry: Any) -> None:
        print(format_entry(entry, show_tenant=show_tenant), flush=True)

    def say(text: str) -> None:
        print(f"auditq tail: {safe.scrub(text)}", file=sys.stderr, flush=True)

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(found, application_name="auditq tail")

    try:
        with connect() as conn:
            follower = None
            if args.follow:
                # Seen first, latest second: a row landing in between is printed once,
                # by whichever of the two finds it.
                follower = Follower(conn, filters, schema=schema, table=table)
                follower.start()
            entries = latest(conn, filters, schema, table, lines)
            for entry in entries:
                emit(entry)
            if follower is not None:
                follower.mark_seen(entries)
                try:
                    follow(follower, emit, interval=interval, connect=connect, say=say)
                finally:
                    follower.close()  # after a reconnect, not `conn`
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a person ends a tail.
    except NoTable as exc:
        return _fail("tail", str(exc))
    except psycopg.Error as exc:
        return _fail("tail", f"failed: {safe.scrub(str(exc)).strip()}")
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    return 0
