"""The database-shape commands of `auditq`: init-db, migrate, partitions, retention.

Kept apart from cli.py (which wires them in) so that each command's options and checks
sit next to each other. Bad options end with one line on stderr and exit status 2; a
database that refuses ends with one line and exit status 1. No command here deletes rows:
retention drops whole partitions, and only when asked without --dry-run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import Any, Final

import psycopg

from .dsn import Dsn
from .tables import DEFAULT_AHEAD

#: What a role name may look like on the command line (PostgreSQL takes more, quoted;
#: auditq keeps to names that need no quoting to be typed in psql as well).
#: The commands `run()` takes.
COMMANDS: Final = frozenset({"init-db", "migrate", "partitions", "retention"})
_ROLE_NAME: Final = re.compile(r"[a-z_][a-z0-9_$]{0,62}")
Target = Callable[..., Any]


def add_commands(commands: Any, add_target: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add init-db, migrate, partitions and retention to the `auditq` subparsers."""
    init = commands.add_parser(
        "init-db",
        help="create the audit table, its index and its append-only guards",
        description="Creates the table with append-only guards (UPDATE, DELETE and TRUNCATE "
        "are refused). See docs/audit-trail.md.",
    )
    add_target(init)
    init.add_argument(
        "--partitioned", action="store_true", help="monthly range partitions on occurred_at"
    )
    init.add_argument(
        "--ahead",
        type=int,
        default=DEFAULT_AHEAD,
        help=f"with --partitioned: months created after the current one ({DEFAULT_AHEAD})",
    )
    _add_roles(init)
    init.add_argument(
        "--distributed",
        action="store_true",
        help="print the Citus DDL (distributed by tenant_id) instead of running anything",
    )
    init.add_argument("--output", metavar="PATH", help="with --distributed: write the DDL here")

    migrate = commands.add_parser(
        "migrate",
        help="bring an existing audit table to the current shape (idempotent)",
        description="Adds origin, drops the outcome vocabulary CHECK, installs the guards "
        "(and the roles with --roles), records the schema version. --to-partitioned also "
        "converts a plain table to monthly partitions (see docs/audit-trail.md for the locks).",
    )
    add_target(migrate)
    migrate.add_argument(
        "--to-partitioned", action="store_true", help="convert to monthly partitions"
    )
    migrate.add_argument(
        "--ahead", type=int, default=DEFAULT_AHEAD, help="with --to-partitioned: months ahead"
    )
    _add_roles(migrate)

    parts = commands.add_parser("partitions", help="list partitions with row counts and sizes")
    add_target(parts)
    parts.add_argument(
        "--estimate",
        action="store_true",
        help="the planner's row estimates (fast) instead of counts",
    )
    parts.add_argument("--json", action="store_true", help="one JSON object per partition")
    parts.add_argument(
        "--create-ahead",
        type=int,
        metavar="N",
        help="first create the current month and N more (as the owner)",
    )

    retention = commands.add_parser(
        "retention",
        help="drop whole partitions older than --keep (owner only; never a DELETE)",
        description="Detaches and drops each partition that ends before now minus --keep, "
        "recording each drop in auditq_retention_log. Runs as the table's owner (a login "
        "that is a member of it switches with SET ROLE). A partition holding hash-chained "
        "rows needs --key (its positions are signed into <table>_retention, so `auditq "
        "verify` reports them PURGED) and a checkpoint anchoring them. See "
        "docs/audit-trail.md and docs/tamper-evidence.md.",
    )
    add_target(retention)
    retention.add_argument(
        "--keep", required=True, help="how long to keep: 13mo, 1y, 400d, 2w, 1y6mo"
    )
    retention.add_argument(
        "--dry-run", action="store_true", help="show what would be dropped, drop nothing"
    )
    retention.add_argument(
        "--key",
        metavar="FILE",
        help="the checkpoint signer key (from `auditq keygen`): signs the record of the chain "
        "positions a dropped partition held; needed when it holds chained rows",
    )


def _add_roles(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("roles")
    group.add_argument(
        "--roles",
        action="store_true",
        help="create the owner (NOLOGIN), writer (INSERT), reader (SELECT, one tenant), "
        "checkpointer and verifier roles",
    )
    group.add_argument("--role-prefix", default="auditq", help="role names' prefix (auditq)")
    group.add_argument("--owner-role", help="owner role name (<prefix>_owner)")
    group.add_argument("--writer-role", help="writer role name (<prefix>_writer)")
    group.add_argument("--reader-role", help="reader role name (<prefix>_reader)")
    group.add_argument(
        "--checkpointer-role", help="hash chain checkpointer role name (<prefix>_checkpointer)"
    )
    group.add_argument(
        "--verifier-role", help="role that verifies the hash chain (<prefix>_verifier)"
    )


class BadOption(ValueError):
    """One line for the user; exit status 2."""


def _roles(args: argparse.Namespace) -> Any:
    from .roles import RoleNames

    given = [
        args.owner_role,
        args.writer_role,
        args.reader_role,
        args.checkpointer_role,
        args.verifier_role,
    ]
    if not args.roles:
        if any(given) or args.role_prefix != "auditq":
            raise BadOption("--role-prefix and --*-role need --roles")
        return None
    base = RoleNames.with_prefix(args.role_prefix)
    names = RoleNames(
        args.owner_role or base.owner,
        args.writer_role or base.writer,
        args.reader_role or base.reader,
        args.checkpointer_role or base.checkpointer,
        args.verifier_role or base.verifier,
    )
    for _, name in names.kinds():
        if not _ROLE_NAME.fullmatch(name):
            raise BadOption(
                f"role name {name!r} is not valid: lower-case letters, digits, _ and $, "
                f"starting with a letter or _, at most 63 characters"
            )
    return names


def _check_ahead(value: int | None, option: str) -> None:
    if value is not None and not 0 <= value <= 120:
        raise BadOption(f"{option} {value}: give a number of months from 0 to 120")


def run(args: argparse.Namespace, dsn: str | None, schema: str, table: str) -> int:
    """Run one of this module's commands; `dsn` is the resolved connection string."""
    try:
        return _run(args, dsn, schema, table)
    except BadOption as exc:
        print(f"auditq {args.command}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, dsn: str | None, schema: str, table: str) -> int:
    from .migrate import MigrateError
    from .retention import RetentionError, parse_keep
    from .roles import RoleError
    from .tables import SchemaError

    command = args.command
    if command in ("init-db", "migrate"):
        _check_ahead(args.ahead, "--ahead")
        roles = _roles(args)
    if command == "partitions":
        _check_ahead(args.create_ahead, "--create-ahead")
    keep = None
    key = None
    if command == "retention":
        try:
            keep = parse_keep(args.keep)
        except RetentionError as exc:
            raise BadOption(str(exc)) from None
        if args.key:
            key = _signer(args.key)
    if command == "init-db":
        if args.output and not args.distributed:
            raise BadOption("--output goes with --distributed")
        if args.distributed:
            return _distributed(args, schema, table, roles)
    if command == "migrate" and args.to_partitioned and roles is not None:
        raise BadOption("run `auditq migrate --roles` and `--to-partitioned` separately")
    if not dsn:
        raise BadOption("no database: pass --dsn or set AUDITQ_DSN / DATABASE_URL")
    safe = Dsn(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            if command == "init-db":
                from .schema import create

                create(
                    conn,
                    schema=schema,
                    table=table,
                    partitioned=args.partitioned,
                    ahead=args.ahead,
                    roles=roles,
                )
                what = "partitioned table" if args.partitioned else "table"
                print(f"auditq: {what} {schema}.{table} is ready on {safe}")
                if roles is not None:
                    print(
                        f"auditq: roles {roles.owner} (owner, NOLOGIN), {roles.writer} "
                        f"(writer), {roles.reader} (reader, tenant from auditq.tenant), "
                        f"{roles.checkpointer} (checkpointer), {roles.verifier} (verifier)"
                    )
                return 0
            if command == "migrate":
                return _migrate(conn, args, schema, table, roles)
            if command == "partitions":
                return _partitions(conn, args, schema, table)
            assert keep is not None
            return _retention(conn, args, schema, table, keep, key)
    except (RoleError, RetentionError, SchemaError) as exc:
        print(f"auditq {command}: {exc}", file=sys.stderr)
        return 2
    except MigrateError as exc:
        print(f"auditq {command}: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        first = safe.scrub(str(exc)).strip().splitlines()
        print(
            f"auditq {command} failed: {first[0] if first else type(exc).__name__}", file=sys.stderr
        )
        return 1


def _signer(path: str) -> Any:
    from pathlib import Path

    from .checkpoint import KeyFileError, MissingExtra, read_signer

    try:
        return read_signer(Path(path))
    except (OSError, KeyFileError, MissingExtra, ValueError) as exc:
        raise BadOption(f"--key: {exc}") from None


def _distributed(args: argparse.Namespace, schema: str, table: str, roles: Any) -> int:
    from .distributed import script

    text = script(schema, table, partitioned=args.partitioned, ahead=args.ahead, roles=roles)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            raise BadOption(f"cannot write {args.output}: {exc.strerror}") from None
        print(f"auditq: Citus DDL for {schema}.{table} written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _migrate(
    conn: psycopg.Connection[Any], args: argparse.Namespace, schema: str, table: str, roles: Any
) -> int:
    from .migrate import migrate, to_partitioned

    if args.to_partitioned:
        report = to_partitioned(conn, schema, table, ahead=args.ahead)
    else:
        report = migrate(conn, schema, table, roles=roles)
    if not report.steps:
        print(f"auditq: {schema}.{table} is already up to date")
    for step in report.steps:
        print(f"auditq: {schema}.{table}: {step}")
    return 0


def _partitions(
    conn: psycopg.Connection[Any], args: argparse.Namespace, schema: str, table: str
) -> int:
    from .guards import unguarded
    from .partitions import create_ahead, is_partitioned, list_partitions

    if not is_partitioned(conn, schema, table):
        print(f"auditq partitions: {schema}.{table} is not a partitioned table", file=sys.stderr)
        return 2
    if args.create_ahead is not None:
        with conn.transaction():
            create_ahead(conn, schema, table, args.create_ahead)
    found = list_partitions(conn, schema, table, exact=not args.estimate)
    problems = unguarded(conn, schema, table)
    for part in found:
        start = part.range_from.isoformat() if part.range_from else "MINVALUE"
        end = part.range_to.isoformat() if part.range_to else "MAXVALUE"
        record = {
            "partition": part.name,
            "from": start,
            "to": end,
            "rows": part.rows,
            "estimated": part.estimated,
            "bytes": part.total_bytes,
        }
        if args.json:
            print(json.dumps(record))
        else:
            rows = f"~{part.rows}" if part.estimated else str(part.rows)
            print(
                f"{part.name:<40} {start[:10]:>10} .. {end[:10]:<10} "
                f"{rows:>12} rows {_size(part.total_bytes):>10}"
            )
    for problem in problems:
        print(f"auditq partitions: unguarded: {problem} (run `auditq migrate`)", file=sys.stderr)
    return 1 if problems else 0


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def _retention(
    conn: psycopg.Connection[Any],
    args: argparse.Namespace,
    schema: str,
    table: str,
    keep: Any,
    key: Any,
) -> int:
    from .chain_schema import retention_table
    from .retention import become_owner, chained_ranges, drop, plan

    # The owner only, for a dry run too: counting a partition's rows reads it directly,
    # and no other role holds rights on partitions.
    become_owner(conn, schema, table)
    doomed = plan(conn, schema, table, keep)
    verb = "would drop" if args.dry_run else "dropping"
    if not doomed:
        print(f"auditq retention: nothing older than {keep.text} in {schema}.{table}")
        return 0
    for part in doomed:
        start = part.range_from.isoformat() if part.range_from else "MINVALUE"
        end = part.range_to.isoformat() if part.range_to else "MAXVALUE"
        # Checked for every partition before any is dropped (and again under each drop's
        # lock): a refusal leaves them all in place.
        ranges = chained_ranges(conn, schema, table, part, key)
        chained = (
            f", {sum(r.rows for r in ranges)} chained in {len(ranges)} position "
            f"run{'s' if len(ranges) > 1 else ''}"
            if ranges
            else ""
        )
        print(
            f"auditq retention: {verb} {schema}.{part.name} [{start}, {end}) "
            f"{part.rows} rows{chained}, {_size(part.total_bytes)}"
        )
    if not args.dry_run:
        purges = drop(conn, schema, table, keep, doomed, key=key)
        signed = (
            f" and signed chain records {', '.join(map(str, purges))} in {retention_table(table)}"
            if purges
            else ""
        )
        print(
            f"auditq retention: dropped {len(doomed)} partition(s), "
            f"recorded in auditq_retention_log{signed}"
        )
    return 0
