"""The busy application (issue 16), alone and with more rates than the harness tries: 4 threads
of pure-Python work that never call auditq, plus one thread calling `log()` at a fixed rate.
What rate does the writer sustain, and how long after `log()` is each entry written?

    python -m benchmarks.busy_app [--rates 25000,50000,...] [--seconds 10] [--dsn DSN]

The measurement is the harness's (`Harness.busy_rate` and `Harness.busy_control` in
benchmarks/compare.py, where the lag and "sustained" are defined); this script tries the rates
in ascending order, stops at the first one not sustained (unless --keep-going), and ends with
the control: the same producer with the writer asleep, the thread's own ceiling. With no
--dsn, an embedded PostgreSQL started for the run.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auditq.benchjob import prepare_table
from auditq.embedded import embedded_postgres
from benchmarks.compare import BUSY_CONTROL_SECONDS, BUSY_SPINNERS, CompareConfig, Harness

DEFAULT_RATES = "25000,50000,75000,100000,125000,150000,200000"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.busy_app", description=__doc__)
    parser.add_argument("--rates", default=DEFAULT_RATES, help="log() calls/s to try, ascending")
    parser.add_argument("--seconds", type=float, default=10.0, help="per rate (10)")
    parser.add_argument("--dsn", help="a server whose bench table may be emptied (embedded)")
    parser.add_argument("--keep-going", action="store_true", help="try every rate")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    with ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(embedded_postgres())
        cfg = CompareConfig()
        prepare_table(dsn, cfg.schema, cfg.table)
        harness = Harness(dsn, cfg, server_owned=args.dsn is None, stream=sys.stderr)
        print(
            f"{BUSY_SPINNERS} spinning threads + 1 thread logging at a fixed rate, "
            f"{args.seconds:g} s per rate, default writer settings",
            flush=True,
        )
        best = 0.0
        best_p99 = 0.0
        for rate in rates:
            r = harness.busy_rate(rate, args.seconds)
            lags = "  ".join(
                f"{name} {'-' if r[key] is None else format(r[key], '7.1f')} ms"
                for name, key in (
                    ("lag p50", "lag_p50_ms"),
                    ("p99", "lag_p99_ms"),
                    ("max", "lag_max_ms"),
                )
            )
            print(
                f"{rate:>9,.0f}/s  reached {r['reached']:>9,.0f}/s"
                f"  dropped {r['dropped_overflow']:>9,}  {lags}"
                f"  {'sustained' if r['sustained'] else 'NOT'}",
                flush=True,
            )
            if r["sustained"]:
                best, best_p99 = rate, r["lag_p99_ms"]
            elif not args.keep_going:
                break
        print(f"highest rate sustained: {best:,.0f}/s (lag p99 {best_p99:.1f} ms)", flush=True)
        asked = max(rates)
        control = harness.busy_control(asked, min(args.seconds, BUSY_CONTROL_SECONDS))
        print(
            f"control, writer asleep, asked {asked:,.0f}/s: reached {control['reached']:,.0f}/s",
            flush=True,
        )


if __name__ == "__main__":
    main()
