"""The `auditq` command: `init-db`, `bench`.

Configuration comes from flags, then `AUDITQ_*` environment variables, then `DATABASE_URL`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psycopg

from .config import ConfigError, dsn_from_env, options_from_env
from .dsn import Dsn
from .schema import DEFAULT_SCHEMA, DEFAULT_TABLE, create
from .writer import DEFAULT_BATCH_SIZE


def _add_target(parser: argparse.ArgumentParser, *, table: str | None = None) -> None:
    parser.add_argument(
        "--dsn", help="PostgreSQL connection string (default: $AUDITQ_DSN, then $DATABASE_URL)"
    )
    parser.add_argument("--schema", help=f"schema (default: $AUDITQ_SCHEMA or {DEFAULT_SCHEMA})")
    parser.add_argument(
        "--table", help=f"table (default: $AUDITQ_TABLE or {table or DEFAULT_TABLE})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auditq", description="Fire-and-forget audit logging to PostgreSQL."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init-db", help="create the audit table and its index")
    _add_target(init)

    check = commands.add_parser(
        "check",
        help="check the database is ready (connection, table, columns, grants); exit 0 or 1",
    )
    _add_target(check)

    bench = commands.add_parser(
        "bench",
        help="push entries through a writer and account for each one in the database",
        description="With no --dsn, $AUDITQ_DSN or $DATABASE_URL, runs on an embedded "
        "PostgreSQL that is created for the run and deleted afterwards.",
    )
    _add_target(bench, table="auditq_bench")
    bench.add_argument("-n", "--entries", type=int, default=200_000, help="calls (200000)")
    bench.add_argument("-t", "--threads", type=int, default=1, help="producer threads (1)")
    bench.add_argument(
        "--rate", type=float, default=0.0, help="pace producers to this many calls/s in total"
    )
    bench.add_argument("--batch-size", type=int, help=f"writer batch_size ({DEFAULT_BATCH_SIZE})")
    bench.add_argument("--max-queue", type=int, help="writer max_queue (100000)")
    bench.add_argument("--flush-interval", type=float, help="writer flush_interval (1.0)")
    bench.add_argument("--no-metadata", action="store_true", help="log entries without metadata")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--quiet", action="store_true", help="no progress display")
    compare = bench.add_argument_group(
        "--compare",
        "auditq against the binary COPY ceiling, naive INSERTs and executemany, in one run "
        "(cases interleaved over rounds, medians), plus caller latency, overload and idle CPU; "
        "the writer runs with its default settings (-n, -t, --rate, --batch-size, --max-queue "
        "and --flush-interval apply to the single bench only)",
    )
    compare.add_argument(
        "--compare", action="store_true", help="run the comparison instead of a single bench"
    )
    compare.add_argument("--rounds", type=int, default=3, help="rounds of every case (3)")
    compare.add_argument(
        "--compare-entries",
        type=int,
        default=200_000,
        help="rows per round for the ceiling and each auditq case (200000)",
    )
    compare.add_argument("--naive-entries", type=int, default=5_000, help="naive rows (5000)")
    compare.add_argument(
        "--executemany-entries", type=int, default=50_000, help="executemany rows (50000)"
    )
    compare.add_argument(
        "--freeze-seconds", type=float, default=3.0, help="server SIGSTOP duration (3)"
    )
    compare.add_argument(
        "--overload-seconds", type=float, default=10.0, help="overload duration (10)"
    )
    compare.add_argument("--idle-seconds", type=float, default=10.0, help="idle duration (10)")
    compare.add_argument(
        "--chart", metavar="PATH", help="also draw a PNG chart (needs auditq[bench])"
    )

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
    return parser


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
        if args.command == "init-db":
            return _init_db(args.dsn, schema, args.table or env.get("table") or DEFAULT_TABLE)
        if args.command == "check":
            return _check(args.dsn, schema, args.table or env.get("table") or DEFAULT_TABLE)
        if args.command == "bench":
            return _bench(args, env, schema)
        if args.command == "spool":
            return _spool(args, env, schema)
    except KeyboardInterrupt:
        return 130
    return 2


def _init_db(dsn: str | None, schema: str, table: str) -> int:
    with _target(dsn, embedded_ok=False) as found:
        if not found:
            print(
                "auditq: no database: pass --dsn or set AUDITQ_DSN / DATABASE_URL",
                file=sys.stderr,
            )
            return 2
        safe = Dsn(found)
        try:
            create(safe, schema=schema, table=table)
        except psycopg.Error as exc:
            print(f"auditq: init-db failed: {safe.scrub(str(exc))}", file=sys.stderr)
            return 1
        print(f"auditq: table {schema}.{table} is ready on {safe}")
    return 0


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
    if args.compare:
        return _bench_compare(args, schema)
    from .bench.run import BenchConfig, format_result, run_bench, write_json
    from .embedded import EmbeddedUnavailable

    cfg = BenchConfig(
        entries=args.entries,
        threads=max(1, args.threads),
        rate=args.rate,
        batch_size=args.batch_size or int(env.get("batch_size", DEFAULT_BATCH_SIZE)),  # type: ignore[call-overload]
        max_queue=args.max_queue or int(env.get("max_queue", 100_000)),  # type: ignore[call-overload]
        flush_interval=args.flush_interval or float(env.get("flush_interval", 1.0)),  # type: ignore[arg-type]
        table=args.table or "auditq_bench",
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


def _bench_compare(args: argparse.Namespace, schema: str) -> int:
    from .bench.compare import CompareConfig, run_compare
    from .bench.report import format_report, write_chart, write_json
    from .embedded import EmbeddedUnavailable

    cfg = CompareConfig(
        rounds=max(1, args.rounds),
        entries=args.compare_entries,
        naive_entries=args.naive_entries,
        executemany_entries=args.executemany_entries,
        freeze_seconds=args.freeze_seconds,
        overload_seconds=args.overload_seconds,
        idle_seconds=args.idle_seconds,
        table=args.table or "auditq_bench",
        schema=schema,
        progress=not args.quiet,
    )
    given = args.dsn or dsn_from_env()
    try:
        # Only a server the harness started may be frozen (SIGSTOP) for the latency case.
        with _target(args.dsn, embedded_ok=True) as found:
            assert found is not None
            safe = Dsn(found)
            target = str(safe) if given else "embedded PostgreSQL"
            try:
                result = run_compare(found, cfg, server_owned=not given)
            except psycopg.Error as exc:
                print(f"auditq: bench failed: {safe.scrub(str(exc))}", file=sys.stderr)
                return 1
    except EmbeddedUnavailable as exc:
        print(f"auditq: {exc}", file=sys.stderr)
        return 2
    print(format_report(result, target))
    if args.json:
        write_json(result, args.json, target)
    if args.chart:
        try:
            write_chart(result, args.chart)
        except RuntimeError as exc:
            print(f"auditq: {exc}", file=sys.stderr)
            return 2
    return 0 if result.consistent else 1


def _spool(args: argparse.Namespace, env: dict[str, object], schema: str) -> int:
    import json
    from pathlib import Path

    from .binary import decode_row
    from .spool import DEAD_LETTER_FILE, inspect_segments, read_records

    directory = Path(args.spool_dir)
    if not directory.is_dir():
        print(f"auditq: no spool at {directory}", file=sys.stderr)
        return 2
    if args.spool_command in {"status", "inspect"}:
        segments = inspect_segments(directory)
        dead_file = directory / DEAD_LETTER_FILE
        dead = sum(1 for _ in dead_file.open("rb")) if dead_file.exists() else 0
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
                        "dead_letters": dead,
                        "dead_letter_bytes": dead_file.stat().st_size if dead else 0,
                    },
                    indent=2,
                )
            )
            return 0
        for segment in segments:
            print(json.dumps(segment))
            if args.rows > 0:
                shown = 0
                try:
                    records = list(read_records(directory / segment["segment"], 0, _quiet))
                except FileNotFoundError:
                    continue  # replayed since it was listed
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
        writer = AuditWriter(
            found,
            schema=schema,
            table=args.table or str(env.get("table") or DEFAULT_TABLE),
            spool_dir=str(directory),
            # The application's bound (AUDITQ_SPOOL_MAX_BYTES), which the dead-letter file
            # of a replay is held to as well.
            spool_max_bytes=int(env.get("spool_max_bytes", 1024**3)),  # type: ignore[call-overload]
        )
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
