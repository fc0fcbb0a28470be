"""The comparison harness, from a checkout (it is not part of the installed package):

    python -m benchmarks.harness [--rounds 5] [--json results.json] [--chart results.png]
    python benchmarks/harness.py --dsn postgresql://user@host/db   # its table is emptied

The COPY ceiling, auditq with 1 and 4 producers, the writer alone, naive INSERTs and
`executemany`, cases interleaved over rounds (medians); then the caller's `log()` latency with
the server frozen (both without and with `auditq.prefault_memory()`) and the writer thread's GIL
holds meanwhile, overload (the memory in flight), idle CPU, the busy application (4 spinning
threads, one logging at fixed rates, and its control) and close() under fire, each target
(issue 16's, and issues 4 and 11's where 16 sets none) checked. With no --dsn ($AUDITQ_DSN,
$DATABASE_URL) it runs on an embedded PostgreSQL it starts and owns, which is the only kind it
may freeze. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from auditq.config import dsn_from_env
from auditq.dsn import Dsn
from auditq.embedded import EmbeddedUnavailable, embedded_postgres
from benchmarks.compare import CompareConfig, CompareResult, run_compare
from benchmarks.report import format_report, write_chart, write_json

_DEFAULTS = CompareConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.harness",
        description="auditq against the binary COPY ceiling, naive INSERTs and executemany, "
        "in one run (cases interleaved over rounds, medians), plus caller latency (also with "
        "the server frozen, without and with auditq.prefault_memory()) and the writer's GIL "
        "holds, overload, idle CPU, the busy application and close() under fire. The writer "
        "runs with its default settings.",
    )
    parser.add_argument(
        "--dsn",
        help="PostgreSQL connection string (default: $AUDITQ_DSN, then $DATABASE_URL, then an "
        "embedded server started for the run)",
    )
    parser.add_argument("--schema", default=_DEFAULTS.schema, help="schema (public)")
    parser.add_argument(
        "--table",
        default=_DEFAULTS.table,
        help=f"table, created if needed and emptied before every case ({_DEFAULTS.table})",
    )
    parser.add_argument(
        "--rounds", type=int, default=_DEFAULTS.rounds, help="rounds of every case (3)"
    )
    parser.add_argument(
        "--entries",
        type=int,
        default=_DEFAULTS.entries,
        help="rows per round for the ceiling and each auditq case (200000)",
    )
    parser.add_argument(
        "--naive-entries", type=int, default=_DEFAULTS.naive_entries, help="naive rows (5000)"
    )
    parser.add_argument(
        "--executemany-entries",
        type=int,
        default=_DEFAULTS.executemany_entries,
        help="executemany rows (50000)",
    )
    parser.add_argument(
        "--freeze-seconds",
        type=float,
        default=_DEFAULTS.freeze_seconds,
        help="server SIGSTOP duration, each of the two frozen cases (3)",
    )
    parser.add_argument(
        "--no-prefault-case",
        action="store_true",
        help="skip the last case (the frozen server again with auditq.prefault_memory())",
    )
    parser.add_argument(
        "--overload-seconds",
        type=float,
        default=_DEFAULTS.overload_seconds,
        help="overload duration (10)",
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=_DEFAULTS.idle_seconds, help="idle duration (10)"
    )
    parser.add_argument(
        "--busy-rates",
        type=_rates,
        default=_DEFAULTS.busy_rates,
        metavar="R1,R2,...",
        help="log() calls/s the busy application's logging thread is asked for "
        "(50000,100000,150000)",
    )
    parser.add_argument(
        "--busy-seconds",
        type=float,
        default=_DEFAULTS.busy_seconds,
        help="seconds per busy-application rate (10); its control runs up to 3",
    )
    parser.add_argument(
        "--no-busy-app", action="store_true", help="skip the busy application and its control"
    )
    parser.add_argument(
        "--close-runs",
        type=int,
        default=_DEFAULTS.close_runs,
        help="runs of close() under fire (2; 0 skips it)",
    )
    parser.add_argument(
        "--close-rows",
        type=int,
        default=_DEFAULTS.close_rows,
        help="rows queued before close() under fire (50000)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--chart", metavar="PATH", help="also draw a PNG chart (needs the bench extra)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of rates: {text!r}") from exc
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive: {text!r}")
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = CompareConfig(
        rounds=max(1, args.rounds),
        entries=args.entries,
        naive_entries=args.naive_entries,
        executemany_entries=args.executemany_entries,
        freeze_seconds=args.freeze_seconds,
        overload_seconds=args.overload_seconds,
        idle_seconds=args.idle_seconds,
        frozen_with_prefault=not args.no_prefault_case,
        busy_app=not args.no_busy_app,
        busy_rates=args.busy_rates,
        busy_seconds=args.busy_seconds,
        close_runs=max(0, args.close_runs),
        close_rows=args.close_rows,
        table=args.table,
        schema=args.schema,
        progress=not args.quiet,
    )
    given = args.dsn or dsn_from_env()
    try:
        if given:
            result = _run(Dsn(given), cfg, owned=False)
            target = str(Dsn(given))
        else:
            # Only a server the harness started may be frozen (SIGSTOP) for the latency case.
            print("harness: no DSN given; starting an embedded PostgreSQL", file=sys.stderr)
            with embedded_postgres() as uri:
                result = _run(Dsn(uri), cfg, owned=True)
            target = "embedded PostgreSQL"
    except EmbeddedUnavailable as exc:
        print(f"harness: {exc}", file=sys.stderr)
        return 2
    if result is None:
        return 1
    print(format_report(result, target))
    if args.json:
        write_json(result, args.json, target)
    if args.chart:
        try:
            write_chart(result, args.chart)
        except RuntimeError as exc:
            print(f"harness: {exc}", file=sys.stderr)
            return 2
    return 0 if result.consistent else 1


def _run(dsn: Dsn, cfg: CompareConfig, *, owned: bool) -> CompareResult | None:
    try:
        return run_compare(dsn.secret_value, cfg, server_owned=owned)
    except psycopg.Error as exc:
        print(f"harness: failed: {dsn.scrub(str(exc))}", file=sys.stderr)
        return None


if __name__ == "__main__":
    sys.exit(main())
