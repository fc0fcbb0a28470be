"""Options: one check for each, read-only once the writer is made, and the target by keyword.

No server needed for most of these: a writer opens no connection until its first call.
"""

from __future__ import annotations

import pytest
from psycopg_pool import ConnectionPool

import auditq
from auditq import AuditWriter
from auditq.config import OPTION_NAMES, WAKE_ROWS, ConfigError, WriterOptions

from .conftest import Table

NOWHERE = "postgresql://auditq:secret@127.0.0.1:9/never"


def test_a_positional_dsn_and_dsn_keyword_are_the_same_target() -> None:
    by_position, by_keyword = AuditWriter(NOWHERE), AuditWriter(dsn=NOWHERE)
    try:
        assert repr(by_position).replace("open", "") == repr(by_keyword).replace("open", "")
        assert "secret" not in repr(by_keyword)
    finally:
        by_position.close(timeout=0)
        by_keyword.close(timeout=0)


def test_two_targets_are_refused() -> None:
    with pytest.raises(TypeError, match="one of"):
        AuditWriter(NOWHERE, dsn=NOWHERE)


def test_pool_keyword_must_be_a_pool() -> None:
    with pytest.raises(TypeError, match="ConnectionPool"):
        AuditWriter(pool=NOWHERE)  # type: ignore[arg-type]


def test_pool_by_keyword_writes(table: Table) -> None:
    with ConnectionPool(table.dsn, min_size=1, max_size=2, open=True) as pool:
        writer = AuditWriter(pool=pool, schema=table.schema, table=table.name)
        assert writer.log("pooled")
        assert writer.close(timeout=10)
    assert table.count() == 1


def test_configure_takes_dsn_by_keyword(table: Table, default_writer: None) -> None:
    writer = auditq.configure(dsn=table.dsn, schema=table.schema, table=table.name)
    assert writer is auditq.get_writer()
    assert auditq.log("configured.by.keyword")
    assert auditq.flush(10)
    assert table.count() == 1


@pytest.mark.parametrize("make", [AuditWriter, auditq.configure])
def test_a_wrong_keyword_lists_the_accepted_ones(make: object, default_writer: None) -> None:
    with pytest.raises(TypeError) as caught:
        make(NOWHERE, batchsize=10)  # type: ignore[operator]
    message = str(caught.value)
    assert "'batchsize'" in message and "did you mean 'batch_size'" in message
    for name in ("dsn", "pool", *OPTION_NAMES):
        assert name in message


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_queue", 0),
        ("batch_size", -1),
        ("batch_size", 2.5),
        ("wake_rows", 0),
        ("flush_interval", 0),
        ("flush_interval", float("nan")),
        ("shutdown_timeout", -1),
        ("spool_fsync", "sometimes"),
        ("table", "t" * 64),  # PostgreSQL would silently truncate it to another name
        ("schema", ""),
        ("strict", "yes"),
        ("on_dead_letter", "not callable"),
    ],
)
def test_a_bad_value_gets_one_error_naming_the_option(option: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        AuditWriter(NOWHERE, **{option: value})  # type: ignore[arg-type]
    assert str(caught.value).startswith(f"{option}=")
    assert "expected" in str(caught.value)


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_queue", 7), ("batch_size", 9), ("table", "x"), ("spool_dir", "spool"), ("wake_rows", 3)],
)
def test_sizing_options_are_read_only(option: str, value: object) -> None:
    writer = AuditWriter(NOWHERE)
    try:
        before = getattr(writer, option)
        with pytest.raises(AttributeError, match="read-only"):
            setattr(writer, option, value)
        assert getattr(writer, option) == before
        assert getattr(writer.options, option) == before
    finally:
        writer.close(timeout=0)


def test_the_signature_defaults_are_the_options_defaults() -> None:
    import inspect

    parameters = inspect.signature(AuditWriter).parameters
    defaults = WriterOptions()
    for name in OPTION_NAMES:
        assert parameters[name].default == getattr(defaults, name), name


def test_wake_rows_defaults_from_the_queue_and_batch() -> None:
    assert WriterOptions().wake_every == WAKE_ROWS
    assert WriterOptions(batch_size=10).wake_every == 10
    assert WriterOptions(max_queue=6).wake_every == 3
    assert WriterOptions(wake_rows=123_456).wake_every == 123_456


def test_wake_rows_lets_a_queue_fill_before_the_writer_wakes(make_writer: object) -> None:
    writer = make_writer(wake_rows=1_000, flush_interval=60)  # type: ignore[operator]
    for n in range(999):
        assert writer.log("queued", request_id=str(n))
    assert writer.stats().pending == 999  # below wake_rows and inside flush_interval
    assert writer.log("the thousandth")  # wakes the writer
    assert writer.flush(timeout=10)
    assert writer.stats().written == 1_000


def test_origin_defaults_to_program_at_host() -> None:
    import socket

    writer = AuditWriter(NOWHERE)
    other = AuditWriter(NOWHERE, origin="billing@web-1")
    try:
        assert writer.origin.endswith(f"@{socket.gethostname()}")
        assert other.origin == "billing@web-1"
    finally:
        writer.close(timeout=0)
        other.close(timeout=0)


def test_an_unknown_field_is_a_counted_rejection_on_every_path(
    default_writer: None, table: Table
) -> None:
    writer = AuditWriter(table.dsn, schema=table.schema, table=table.name)
    try:
        assert writer.log("x", user_id="u") is False  # type: ignore[call-arg]
        assert AuditWriter.log(writer, "x", user_id="u") is False  # type: ignore[call-arg]
        assert writer.write({"action": "x", "user": 1}) is False
        assert writer.stats().rejected == 3
        assert writer._ledger.last_reject_reason() == "unknown field(s): user"
    finally:
        writer.close(timeout=5)
    auditq.configure(table.dsn, schema=table.schema, table=table.name)
    assert auditq.log("x", user_id="u") is False  # type: ignore[call-arg]
    assert auditq.write_audit_log({"action": "x", "user": 1}) is False
    assert auditq.get_writer().stats().rejected == 2  # type: ignore[union-attr]
    strict = AuditWriter(table.dsn, schema=table.schema, table=table.name, strict=True)
    try:
        with pytest.raises(auditq.InvalidEntry, match="unknown field"):
            strict.log("x", user_id="u")  # type: ignore[call-arg]
    finally:
        strict.close(timeout=5)


def test_log_has_a_signature_and_help_naming_the_fields() -> None:
    import inspect
    import pydoc

    writer = AuditWriter(NOWHERE)
    try:
        for target in (writer.log, AuditWriter.log, auditq.log):
            names = [n for n in inspect.signature(target).parameters if n != "self"]
            assert names[:3] == ["action", "tenant_id", "actor_id"], target
            assert names[-1] == "unknown"  # **unknown: Never, so mypy refuses a wrong keyword
            text = pydoc.render_doc(target)
            for field in ("tenant_id", "resource_id", "metadata", "occurred_at"):
                assert field in text, (target, field)
    finally:
        writer.close(timeout=0)


def test_aflush_and_ashutdown_do_not_block_the_event_loop(default_writer: None) -> None:
    import asyncio

    # Nothing listens there: the entry stays pending, and flush waits out its timeout.
    auditq.configure(NOWHERE, connect_timeout=1, retry_backoff_max=0.1)
    assert auditq.log("pending")

    async def main() -> tuple[bool, bool, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        flushing = asyncio.create_task(auditq.aflush(timeout=0.5))
        await asyncio.sleep(0.1)
        still_waiting = not flushing.done()  # the loop ran other tasks meanwhile
        flushed = await flushing
        closed = await auditq.ashutdown(timeout=0.2)
        ticking.cancel()
        return still_waiting and not flushed, closed, ticks

    waited, closed, ticks = asyncio.run(main())
    assert waited and not closed and ticks > 0
