"""`auditq.configure()` from the environment: every option is readable from AUDITQ_*, and a bad
value fails at configure time with one error naming the variable."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import auditq
from auditq import AuditWriter
from auditq.config import OPTIONS, ConfigError

from ..conftest import Table

VALID = {
    "table": "audit_x",
    "schema": "audit_s",
    "name": "web",
    "max_queue": "123",
    "batch_size": "45",
    "flush_interval": "0.25",
    "shutdown_timeout": "0",
    "write_timeout": "7.5",
    "connect_timeout": "3",
    "retry_backoff_max": "2",
    "warn_interval": "30",
    "strict": "yes",
    "spool_dir": "/tmp/auditq-test-env-spool",  # noqa: S108
    "spool_after": "2.5",
    "spool_max_bytes": "1048576",
    "spool_fsync": "Always",
    "origin": "billing@web-1",
    "wake_rows": "700",
    "chain": "on",
}
EXPECTED = {
    "table": "audit_x",
    "schema": "audit_s",
    "name": "web",
    "max_queue": 123,
    "batch_size": 45,
    "flush_interval": 0.25,
    "shutdown_timeout": 0.0,
    "write_timeout": 7.5,
    "connect_timeout": 3.0,
    "retry_backoff_max": 2.0,
    "warn_interval": 30.0,
    "strict": True,
    "spool_dir": "/tmp/auditq-test-env-spool",  # noqa: S108
    "spool_after": 2.5,
    "spool_max_bytes": 1048576,
    "spool_fsync": "always",
    "origin": "billing@web-1",
    "wake_rows": 700,
    "chain": True,
}
INVALID = {
    "table": ["x" * 64],
    "schema": ["é" * 32],  # 64 bytes
    "max_queue": ["abc", "0", "-5", "1.5"],
    "batch_size": ["ten", "0"],
    "flush_interval": ["soon", "0", "-1", "nan", "inf"],
    "shutdown_timeout": ["-1", "x"],
    "write_timeout": ["0"],
    "connect_timeout": ["-2"],
    "retry_backoff_max": ["0"],
    "warn_interval": ["-0.5"],
    "strict": ["maybe", "2"],
    "spool_after": ["-1"],
    "spool_max_bytes": ["1e9", "0"],
    "spool_fsync": ["sometimes"],
    "wake_rows": ["0", "some"],
    "chain": ["sometimes"],
    "request_id_header": ["X Request", "é"],
    "trusted_proxies": ["10.0.0.0/8, nonsense", "300.1.1.1"],
    "log_requests": ["sometimes"],
}


def test_every_writer_option_has_a_variable() -> None:
    keyword_only = {
        name
        for name, p in inspect.signature(AuditWriter).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    }
    # on_dead_letter is a callable (code only); dsn and pool name the target
    assert keyword_only - set(OPTIONS) == {"on_dead_letter", "before_write", "dsn", "pool"}
    assert set(VALID) == set(OPTIONS)


def test_configure_reads_every_option(
    table: Table, default_writer: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUDITQ_DSN", table.dsn)
    for name, value in VALID.items():
        monkeypatch.setenv(f"AUDITQ_{name.upper()}", value)
    writer = auditq.configure()
    for name, value in EXPECTED.items():
        assert getattr(writer, name) == value, name


def test_configure_writes_with_env_only(
    table: Table, default_writer: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", table.dsn)  # the fallback when AUDITQ_DSN is unset
    monkeypatch.setenv("AUDITQ_SCHEMA", table.schema)
    monkeypatch.setenv("AUDITQ_TABLE", table.name)
    monkeypatch.setenv("AUDITQ_BATCH_SIZE", "")  # empty counts as unset
    auditq.configure()
    assert auditq.log("env.only")
    assert auditq.flush(10)
    assert table.count() == 1


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name, values in INVALID.items() for value in values]
)
def test_invalid_value_names_the_variable(
    name: str, value: str, default_writer: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUDITQ_DSN", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv(f"AUDITQ_{name.upper()}", value)
    variable = f"AUDITQ_{name.upper()}"
    if name in OPTIONS:
        with pytest.raises(ConfigError, match=variable) as caught:
            auditq.configure()
    else:
        from auditq.middleware import AuditWSGIMiddleware

        with pytest.raises(ConfigError, match=variable) as caught:
            AuditWSGIMiddleware(lambda e, s: [])
    message = str(caught.value)
    assert message.count("AUDITQ_") == 1
    assert "expected" in message or "not an IP" in message


def test_bad_environment_never_makes_log_raise(
    default_writer: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import auditq.default

    monkeypatch.setattr(auditq.default, "_env_failed", False)
    monkeypatch.setenv("AUDITQ_DSN", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("AUDITQ_MAX_QUEUE", "lots")
    assert auditq.log("lazy.configure") is False  # discarded with a warning, no exception
    with pytest.raises(ConfigError, match="AUDITQ_MAX_QUEUE"):
        auditq.configure()


def test_configure_reads_a_dotenv_file_and_the_environment_wins(
    table: Table, default_writer: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        f"AUDITQ_DSN={table.dsn}\nAUDITQ_SCHEMA={table.schema}\nAUDITQ_TABLE={table.name}\n"
        "AUDITQ_BATCH_SIZE=77\nAUDITQ_MAX_QUEUE=900\n"
    )
    monkeypatch.setenv("AUDITQ_MAX_QUEUE", "800")
    writer = auditq.configure(env_file=env_file)
    assert (writer.batch_size, writer.max_queue, writer.table) == (77, 800, table.name)
    assert auditq.log("from.dotenv")
    assert auditq.flush(10)
    assert table.count() == 1


def test_a_bad_value_in_a_dotenv_file_names_the_variable(
    default_writer: None, tmp_path: Path
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("AUDITQ_FLUSH_INTERVAL=soon\n")
    with pytest.raises(ConfigError, match=r"AUDITQ_FLUSH_INTERVAL='soon'.*expected"):
        auditq.configure("postgresql://nobody@127.0.0.1:1/none", env_file=env_file)
    with pytest.raises(ConfigError, match="is not a file"):
        auditq.configure("postgresql://nobody@127.0.0.1:1/none", env_file=tmp_path / "nope")
