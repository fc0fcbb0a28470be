"""The `auditq` command: `init-db`, `migrate`, `partitions`, `retention`, `bench`, `spool`.

Configuration comes from flags, then `AUDITQ_*` environment variables, then `DATABASE_URL`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import psycopg

from . import __version__, trail_cli
from .benchjob import DEFAULT_RATE
from .config import DEFAULT_BATCH_SIZE, ConfigError, dsn_from_env, options_from_env
from .dsn import Dsn
from .tables import DEFAULT_SCHEMA, DEFAULT_TABLE


def _add_target(parser: argparse.ArgumentParser, *, table: str | None = None) -> None:
    parser.add_argument(
        "--dsn", help="PostgreSQL connection string (default: $AUDITQ_DSN, then $DATABASE_URL)"
    )
    parser.add_argument("--schema", help=f"schema (default: $AUDITQ_SCHEMA or {DEFAULT_SCHEMA})")
    parser.add_argument(
        "--table", help=f"table (default: $AUDITQ_TABLE or {table or DEFAULT_TABLE})"
    )


class _Parser(argparse.ArgumentParser):
    """Bad options end with one line (not the usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="auditq", description="Fire-and-forget audit logging to PostgreSQL.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    trail_cli.add_commands(commands, _add_target)

    check = commands.add_parser(
        "check",
        help="check the database is ready (connection, table, columns, grants); exit 0 or 1",
    )
    _add_target(check)

    bench = commands.add_parser(
        "bench",
        help="push entries through a writer and account for each one in the database",
        description="Paced by default at a rate a writer sustains, so the run shows it keeping "
        "up; --flat-out shows overload instead (drops, by design). With no --dsn, $AUDITQ_DSN "
        "or $DATABASE_URL, runs on an embedded PostgreSQL that is created for the run and "
        "deleted afterwards. The comparison harness (COPY ceiling, INSERTs, frozen server, "
        "overload) runs from a checkout: see benchmarks/README.md.",
    )
    _add_target(bench, table="auditq_bench")
    bench.add_argument(
        "-n", "--entries", type=_positive(int), default=200_000, help="calls (200000)"
    )
    bench.add_argument(
        "-t", "--threads", type=_positive(int), default=1, help="producer threads (1)"
    )
    pace = bench.add_mutually_exclusive_group()
    pace.add_argument(
        "--rate",
        type=_positive(float),
        default=DEFAULT_RATE,
        help=f"pace producers to this many calls/s in total ({DEFAULT_RATE:.0f})",
    )
    pace.add_argument(
        "--flat-out",
        action="store_true",
        help="no pacing: callers log as fast as they can, faster than any writer writes, "
        "so the queue fills and log() refuses (drops) entries",
    )
    bench.add_argument(
        "--batch-size", type=_positive(int), help=f"writer batch_size ({DEFAULT_BATCH_SIZE})"
    )
    bench.add_argument("--max-queue", type=_positive(int), help="writer max_queue (100000)")
    bench.add_argument(
        "--flush-interval", type=_positive(float), help="writer flush_interval (1.0)"
    )
    bench.add_argument("--no-metadata", action="store_true", help="log entries without metadata")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--quiet", action="store_true", help="no progress display")
    bench.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)  # moved

    spool = commands.add_parser("spool", help="look into or replay a disk spool")
    spool_commands = spool.add_subparsers(dest="spool_command", required=True)
    for name, text in (
        ("status", "segments, rows and bytes waiting, and dead letters"),
        ("inspect", "list each segment; --rows N prints its first N rows"),
        ("replay", "write every unlocked segment to the database now, then exit"),
    ):
        sub = spool_commands.add_parser(name, help=text)
        sub.add_argument("spool_dir", help="the writer's spool_dir")
        if name == "inspect":
            sub.add_argument("--rows", type=int, default=0, help="rows to print per segment")
        if name == "replay":
            _add_target(sub)
            sub.add_argument("--timeout", type=float, default=300.0, help="give up after (300s)")
        else:
            sub.set_defaults(dsn=None, schema=None, table=None)  # main() reads them
    _add_read_commands(commands)
    _add_integrity_commands(commands)
    return parser


def _add_integrity_commands(commands: argparse._SubParsersAction[_Parser]) -> None:
    from .integritycli import add_integrity_commands

    add_integrity_commands(commands)


def _add_read_commands(commands: argparse._SubParsersAction[_Parser]) -> None:
    # Values are taken as text and checked by the handlers, so each bad one is refused in
    # one line (argparse would add its usage block) with exit status 2.
    when = "ISO 8601 (2026-01-31, 2026-01-31T12:00Z; UTC when no offset) or back from now (24h, 7d)"
    export = commands.add_parser(
        "export",
        help="stream one tenant's entries as JSON Lines or CSV",
        description="Streams through COPY in constant memory, oldest first. A file is "
        "created private (0600) and appears only once the export is complete.",
    )
    _add_target(export)
    export.add_argument("--tenant", help="the tenant whose entries to export (required)")
    tail = commands.add_parser(
        "tail", help="print the latest entries; --follow prints new ones as they land"
    )
    _add_target(tail)
    tail.add_argument("--tenant", help="only this tenant's entries")
    for sub in (export, tail):
        sub.add_argument("--since", help=f"occurred at or after: {when}")
        sub.add_argument("--until", help=f"occurred before: {when}")
        sub.add_argument("--action", help="only this action")
        sub.add_argument("--actor", help="only this actor_id")
    export.add_argument("--format", default="jsonl", help="jsonl (default) or csv")
    export.add_argument("--output", "-o", help="write to this file instead of stdout")
    export.add_argument("--limit", help="at most this many entries (the oldest first)")
    export.add_argument(
        "--proofs",
        action="store_true",
        help="the tenant's hash-chained rows with their inclusion proofs and the signed "
        "checkpoint, for `auditq verify-export` (JSON Lines; docs/tamper-evidence.md)",
    )
    tail.add_argument("-n", "--lines", default="20", help="how many of the latest to print (20)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    tail.add_argument("--interval", default="1", help="seconds between polls (1)")


@contextmanager
def _target(dsn: str | None, *, embedded_ok: bool) -> Iterator[str | None]:
    found = dsn or dsn_from_env()
    if found or not embedded_ok:
        yield found
        return
    from .embedded import embedded_postgres

    print("auditq: no DSN given; starting an embedded PostgreSQL", file=sys.stderr)
    with embedded_postgres() as uri:
        yield uri


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        env = options_from_env()
    except ConfigError as exc:
        print(f"auditq: {exc}", file=sys.stderr)
        return 2
    schema = args.schema or env.get("schema") or DEFAULT_SCHEMA
    try:
        if args.command in trail_cli.COMMANDS:
            table = args.table or str(env.get("table") or DEFAULT_TABLE)
            return trail_cli.run(args, args.dsn or dsn_from_env(), schema, table)
        if args.command == "check":
            return _check(args.dsn, schema, args.table or str(env.get("table") or DEFAULT_TABLE))
        if args.command == "bench":
            return _bench(args, env, schema)
        if args.command == "spool":
            return _spool(args, env, schema)
        if args.command in {"export", "tail"}:
            from .readcli import run_export, run_tail

            table = args.table or str(env.get("table") or DEFAULT_TABLE)
            run = run_export if args.command == "export" else run_tail
            return run(args, schema, table)
        if args.command in {"keygen", "checkpoint", "verify", "verify-export"}:
            from .integritycli import run_integrity

            return run_integrity(args, env, schema)
    except KeyboardInterrupt:
        return 130
    except ConfigError as exc:  # a malformed DSN, say: one line, no traceback
        print(f"auditq: {exc}", file=sys.stderr)
        return 2
    return 2


def _check(dsn: str | None, schema: str, table: str) -> int:
    """One line per finding; exit 0 when the database is ready, 1 when anything is missing."""
    from .readiness import check

    found = dsn or dsn_from_env()
    if not found:
        print("missing: a database: pass --dsn or set AUDITQ_DSN / DATABASE_URL")
        return 1
    result = check(found, schema=schema, table=table)
    for line in result.lines():
        print(line)
    return 0 if result.ok else 1


def _bench(args: argparse.Namespace, env: dict[str, object], schema: str) -> int:
    from .benchjob import BenchConfig, NotBenchTable, format_result, run_bench, write_json
    from .embedded import EmbeddedUnavailable

    if args.compare:
        print(
            "auditq bench: --compare moved out of the package: from a checkout, run "
            "python -m benchmarks.harness (see benchmarks/README.md)",
            file=sys.stderr,
        )
        return 2
    table = args.table or "auditq_bench"
    for flag, name in (("--schema", schema), ("--table", table)):
        if len(name.encode()) > MAX_IDENTIFIER_BYTES:
            # PostgreSQL would truncate it and the run would report on another name.
            print(
                f"auditq bench: {flag} {name!r} is longer than PostgreSQL's "
                f"{MAX_IDENTIFIER_BYTES}-byte limit for a name",
                file=sys.stderr,
            )
            return 2
    cfg = BenchConfig(
        entries=args.entries,
        threads=args.threads,
        rate=0.0 if args.flat_out else args.rate,
        batch_size=_option(args.batch_size, env, "batch_size", DEFAULT_BATCH_SIZE),
        max_queue=_option(args.max_queue, env, "max_queue", 100_000),
        flush_interval=_option(args.flush_interval, env, "flush_interval", 1.0),
        table=table,
        schema=schema,
        metadata=not args.no_metadata,
        progress=not args.quiet,
    )
    try:
        with _target(args.dsn, embedded_ok=True) as found:
            assert found is not None
            safe = Dsn(found)
            try:
                result = run_bench(found, cfg)
            except NotBenchTable as exc:
                print(f"auditq bench: {exc}", file=sys.stderr)
                return 2
            except psycopg.Error as exc:
                print(f"auditq: bench failed: {safe.scrub(str(exc))}", file=sys.stderr)
                return 1
            where = str(safe) if args.dsn or dsn_from_env() else "embedded PostgreSQL"
            print(format_result(result, where))
            if args.json:
                write_json(result, args.json, safe)
    except EmbeddedUnavailable as exc:
        print(f"auditq: {exc}", file=sys.stderr)
        return 2
    return 0 if result.consistent else 1


#: PostgreSQL's limit on a name (NAMEDATALEN - 1); a longer one is silently truncated.
MAX_IDENTIFIER_BYTES = 63

_Number = TypeVar("_Number", int, float)


def _positive(kind: Callable[[str], _Number]) -> Callable[[str], _Number]:
    """An argparse `type=` for a number > 0: anything else is one line and exit status 2."""

    def parse(text: str) -> _Number:
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value > 0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _option(given: _Number | None, env: dict[str, object], key: str, default: _Number) -> _Number:
    """A flag's value, else the `AUDITQ_*` variable's, else the writer's default."""
    if given is not None:
        return given
    found: Any = env.get(key, default)  # options_from_env has parsed it already
    return type(default)(found)


def _spool(args: argparse.Namespace, env: dict[str, object], schema: str) -> int:
    import json
    from pathlib import Path

    from .binary import decode_row
    from .spool import Refused, UnsafeSpoolDir, dead_letter_count, inspect_segments, read_records

    directory = Path(args.spool_dir)
    if not directory.is_dir():
        print(f"auditq: no spool at {directory}", file=sys.stderr)
        return 2
    if args.spool_command in {"status", "inspect"}:
        # Read as a writer would: never through a symlink, never from a FIFO.
        try:
            segments = inspect_segments(directory)
            dead, dead_bytes = dead_letter_count(directory)
        except (UnsafeSpoolDir, Refused) as exc:
            print(f"auditq: {exc.strerror or exc}", file=sys.stderr)
            return 2
        if args.spool_command == "status":
            print(
                json.dumps(
                    {
                        "spool_dir": str(directory),
                        "segments": len(segments),
                        "rows": sum(s["rows"] for s in segments),
                        "bytes": sum(s["bytes"] for s in segments),
                        "owned_by_live_writers": sum(s["owned_by_live_writer"] for s in segments),
                        "damaged_bytes": sum(s["damaged_bytes"] for s in segments),
                        # Segments no writer here will replay (see `inspect` for why).
                        "refused": sum(1 for s in segments if s.get("refused")),
                        "dead_letters": dead,
                        "dead_letter_bytes": dead_bytes,
                    },
                    indent=2,
                )
            )
            return 0
        for segment in segments:
            print(json.dumps(segment))  # its header (target, created) or why it is refused
            if args.rows > 0 and not segment.get("refused"):
                shown = 0
                try:
                    records = list(read_records(directory / segment["segment"], 0, _quiet))
                except (FileNotFoundError, Refused):
                    continue  # replayed (or replaced) since it was listed
                for record in records:
                    for row in record.rows[: args.rows - shown]:
                        print("  " + json.dumps(decode_row(row), ensure_ascii=False))
                        shown += 1
                    if shown >= args.rows:
                        break
        return 0
    from .writer import AuditWriter

    with _target(args.dsn, embedded_ok=False) as found:
        if not found:
            print(
                "auditq: no database: pass --dsn or set AUDITQ_DSN / DATABASE_URL",
                file=sys.stderr,
            )
            return 2
        try:
            writer = AuditWriter(
                found,
                schema=schema,
                table=args.table or str(env.get("table") or DEFAULT_TABLE),
                spool_dir=str(directory),
                # The application's bound (AUDITQ_SPOOL_MAX_BYTES), which the dead-letter
                # file of a replay is held to as well.
                spool_max_bytes=int(env.get("spool_max_bytes", 1024**3)),  # type: ignore[call-overload]
            )
        except UnsafeSpoolDir as exc:
            print(f"auditq: {exc}", file=sys.stderr)
            return 2
        try:
            done = writer.replay_spool(timeout=args.timeout)
        finally:
            writer.close(timeout=10)
        stats = writer.stats()
        left = inspect_segments(directory)
        print(
            json.dumps(
                {
                    "replayed": stats.replayed,
                    "dead_lettered": stats.replay_dead_lettered,
                    "complete": done,
                    "segments_left": len(left),
                    "rows_left": sum(s["rows"] for s in left),
                    "last_error": stats.last_error,
                }
            )
        )
        return 0 if done else 1


def _quiet(_damage: object) -> None:
    """`inspect` already reports damaged bytes per segment: no warning per record."""


if __name__ == "__main__":
    sys.exit(main())
