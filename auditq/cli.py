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
    bench.add_argument("--batch-size", type=int, help="writer batch_size (5000)")
    bench.add_argument("--max-queue", type=int, help="writer max_queue (100000)")
    bench.add_argument("--flush-interval", type=float, help="writer flush_interval (1.0)")
    bench.add_argument("--no-metadata", action="store_true", help="log entries without metadata")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--quiet", action="store_true", help="no progress display")
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
        if args.command == "bench":
            return _bench(args, env, schema)
    except KeyboardInterrupt:
        return 130
    return 2


def _init_db(dsn: str | None, schema: str, table: str) -> int:
    with _target(dsn, embedded_ok=False) as found:
        if not found:
            print("auditq: no database: pass --dsn or set AUDITQ_DSN / DATABASE_URL", file=sys.stderr)
            return 2
        safe = Dsn(found)
        try:
            create(safe, schema=schema, table=table)
        except psycopg.Error as exc:
            print(f"auditq: init-db failed: {safe.scrub(str(exc))}", file=sys.stderr)
            return 1
        print(f"auditq: table {schema}.{table} is ready on {safe}")
    return 0


def _bench(args: argparse.Namespace, env: dict[str, object], schema: str) -> int:
    from .bench.run import BenchConfig, format_result, run_bench, write_json
    from .embedded import EmbeddedUnavailable

    cfg = BenchConfig(
        entries=args.entries,
        threads=max(1, args.threads),
        rate=args.rate,
        batch_size=args.batch_size or int(env.get("batch_size", 5_000)),  # type: ignore[call-overload]
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
            print(format_result(result, str(safe) if args.dsn or dsn_from_env() else "embedded PostgreSQL"))
            if args.json:
                write_json(result, args.json, safe)
    except EmbeddedUnavailable as exc:
        print(f"auditq: {exc}", file=sys.stderr)
        return 2
    return 0 if result.consistent else 1


if __name__ == "__main__":
    sys.exit(main())
