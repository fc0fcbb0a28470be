"""`auditq bench` (the main job) and `auditq --version`: option checks end in one line and
status 2; the default run is paced and shows the writer keeping up; every run says what a drop
is; the flat-out run is an option. Against a real server (the test's own table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import auditq
from auditq.benchjob import DEFAULT_RATE, DROP_MEANING, BenchConfig, BenchResult, format_result
from auditq.cli import main

from .conftest import Table


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--entries", "-5", "argument -n/--entries: must be greater than 0, not -5"),
        ("-n", "0", "argument -n/--entries: must be greater than 0, not 0"),
        ("-n", "1e3", "argument -n/--entries: '1e3' is not a whole number"),
        ("--threads", "0", "argument -t/--threads: must be greater than 0, not 0"),
        ("--batch-size", "0", "argument --batch-size: must be greater than 0, not 0"),
        ("--max-queue", "0", "argument --max-queue: must be greater than 0, not 0"),
        ("--flush-interval", "-1", "argument --flush-interval: must be greater than 0, not -1"),
        ("--flush-interval", "nan", "argument --flush-interval: must be greater than 0, not nan"),
        ("--rate", "-100", "argument --rate: must be greater than 0, not -100"),
    ],
)
def test_a_bad_number_is_one_line_and_status_2(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"auditq bench: {message} (see auditq bench --help)\n"  # one line


def test_rate_and_flat_out_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--rate", "100", "--flat-out"])
    assert exit_.value.code == 2
    assert "--flat-out: not allowed with argument --rate" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--table", "--schema"])
def test_a_name_postgresql_would_truncate_is_refused(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before any connection: the run would otherwise report on a shorter name."""
    long_name = "é" * 32  # 64 bytes in UTF-8, though 32 characters
    assert main(["bench", "--dsn", "postgresql://x@127.0.0.1:9/never", flag, long_name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{flag} {long_name!r} is longer than PostgreSQL's 63-byte limit" in err


def test_compare_points_to_the_harness(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--compare"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m benchmarks.harness" in err
    assert "benchmarks/README.md" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"auditq {auditq.__version__}\n"


def _bench(table: Table, tmp_path: Path, *options: str) -> tuple[int, dict[str, object]]:
    out = tmp_path / "bench.json"
    status = main(
        [
            "bench",
            "--dsn",
            table.dsn,
            "--schema",
            table.schema,
            "--table",
            table.name,
            "--quiet",
            "--json",
            str(out),
            *options,
        ]
    )
    return status, json.loads(out.read_text())


def test_the_default_run_is_paced_and_keeps_up(
    table: Table, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, result = _bench(table, tmp_path, "-n", "5000")
    text = capsys.readouterr().out
    assert status == 0
    config = result["config"]
    assert isinstance(config, dict) and config["rate"] == DEFAULT_RATE
    assert result["consistent"] is True and result["kept_up"] is True
    assert result["dropped_overflow"] == 0
    assert result["written"] == result["rows_in_table"] == table.count() == 5000
    assert 0 <= int(result["peak_pending"]) <= 5000  # type: ignore[call-overload]
    assert f"paced at {DEFAULT_RATE:,.0f}/s" in text
    assert "  kept up     yes: nothing dropped" in text
    assert _flat(DROP_MEANING) in _flat(text)  # what a drop is, even when there was none


def test_options_reach_the_writer(table: Table, tmp_path: Path) -> None:
    status, result = _bench(
        table, tmp_path, "-n", "300", "--batch-size", "7", "--max-queue", "50", "--rate", "3000"
    )
    assert status == 0 and result["consistent"] is True
    assert result["config"] == {
        **result["config"],  # type: ignore[dict-item]
        "batch_size": 7,
        "max_queue": 50,
        "rate": 3000.0,
        "entries": 300,
    }


def test_flat_out_is_an_option(
    table: Table, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Callers as fast as they can: whatever is dropped is counted, the rest is in the table."""
    status, result = _bench(table, tmp_path, "-n", "20000", "--max-queue", "500", "--flat-out")
    text = capsys.readouterr().out
    assert status == 0 and result["consistent"] is True
    assert result["config"]["rate"] == 0.0  # type: ignore[index]
    assert result["written"] == table.count()
    assert result["accepted"] + result["dropped_overflow"] == 20000  # type: ignore[operator]
    assert "flat out (as fast as they can)" in text


def _result(dropped: int, rate: float) -> BenchResult:
    calls = 200_000
    return BenchResult(
        config={**BenchConfig(rate=rate).__dict__},
        calls=calls,
        accepted=calls - dropped,
        written=calls - dropped,
        dropped_overflow=dropped,
        rejected=0,
        dead_lettered=0,
        rows_in_table=calls - dropped,
        distinct_ids=calls - dropped,
        seconds=1.5,
        enqueue_seconds=0.25,
        entries_per_second=(calls - dropped) / 1.5,
        offered_per_second=calls / 0.25,
        peak_pending=100_000 if dropped else 812,
        latency_ns={"p50": 600.0, "p99": 900.0, "p99.9": 50_000.0, "max": 2e6},
        latency_after_sleep_ns={},
        calls_after_sleep=0,
        timer_overhead_ns=60.0,
    )


def _flat(text: str) -> str:
    """The text with its line wrapping undone."""
    return " ".join(text.split())


def test_the_output_says_what_the_drops_were() -> None:
    text = _flat(format_result(_result(37_786, 0.0), "embedded PostgreSQL"))
    assert "flat out" in text
    assert (
        "kept up no: callers offered 800,000/s, more than the writer wrote; the queue "
        "filled (100,000) and 37,786 calls were refused (what --flat-out shows: overload, "
        "by design)" in text
    )
    assert f"a drop {_flat(DROP_MEANING)}" in text and "accounting OK" in text

    text = _flat(format_result(_result(0, DEFAULT_RATE), "embedded PostgreSQL"))
    assert "kept up yes: nothing dropped; the queue held at most 812 of 100,000" in text
    assert "the writer's own limit: --flat-out" in text


def test_bench_refuses_to_empty_a_table_it_did_not_make(table: Table) -> None:
    """`--table` naming the application's table must never cost its rows (TRUNCATE)."""
    import psycopg

    with psycopg.connect(table.dsn, autocommit=True) as conn:
        app = f'"{table.schema}"."app_{table.name}"'
        like = f'"{table.schema}"."{table.name}"'
        conn.execute(f"CREATE TABLE {app} (LIKE {like} INCLUDING DEFAULTS)")
        conn.execute(
            f'INSERT INTO "{table.schema}"."app_{table.name}" (id, occurred_at, action) '
            "VALUES (gen_random_uuid(), now(), 'precious')"
        )
    code = main(
        [
            "bench",
            "--dsn",
            table.dsn,
            "--schema",
            table.schema,
            "--table",
            f"app_{table.name}",
            "-n",
            "10",
            "--quiet",
        ]
    )
    assert code == 2
    with psycopg.connect(table.dsn, autocommit=True) as conn:
        kept = conn.execute(f'SELECT count(*) FROM "{table.schema}"."app_{table.name}"').fetchone()
        conn.execute(f'DROP TABLE "{table.schema}"."app_{table.name}"')
    assert kept == (1,)
