"""The DSN's password never appears in logs, reprs, stats, dead letters or exceptions."""

from __future__ import annotations

import logging
import traceback
import uuid
from urllib.parse import quote

import psycopg
import pytest

import auditq
import auditq.schema
from auditq import AuditWriter, DeadLetter

from .helpers import wait_until


def _password() -> str:
    return f"Pw{uuid.uuid4().hex[:16]}"


def _dsns(password: str) -> dict[str, str]:
    """Connection strings that hold `password` and can never connect (port 1, or malformed)."""
    return {
        "url": f"postgresql://auditq:{password}@127.0.0.1:1/audit?connect_timeout=2",
        "keywords": f"host=127.0.0.1 port=1 user=auditq password={password} dbname=audit",
        "quoted-keywords": f"host=127.0.0.1 port=1 password='{password}' dbname=audit",
        "url-bad-port": f"postgresql://auditq:{password}@127.0.0.1:notaport/audit",
        "url-bad-param": f"postgresql://auditq:{password}@127.0.0.1:1/audit?{password}=1",
        "url-bad-ipv6": f"postgresql://auditq:{password}@[::1/audit",
        "keywords-garbage": f"host=127.0.0.1 port=1 password={password} garbage",
        "keywords-unterminated": f"host=127.0.0.1 port=1 password='{password}",
    }


def _forms(password: str) -> list[str]:
    return [password, quote(password, safe="")]


CASES = list(_dsns("x"))


def _assert_clean(text: str, password: str, where: str) -> None:
    for form in _forms(password):
        assert form not in text, f"password leaked in {where}: {text!r}"


@pytest.mark.parametrize("case", CASES)
def test_password_never_leaks_from_a_writer(case: str, caplog: pytest.LogCaptureFixture) -> None:
    password = _password()
    dsn = _dsns(password)[case]
    caplog.set_level(logging.DEBUG)  # every logger, psycopg's included
    letters: list[DeadLetter] = []
    writer = AuditWriter(
        dsn,
        flush_interval=0.05,
        retry_backoff_max=0.1,
        warn_interval=0,
        connect_timeout=2,
        on_dead_letter=letters.append,
    )
    try:
        _assert_clean(repr(writer), password, "repr(writer)")
        _assert_clean(str(writer), password, "str(writer)")
        for i in range(5):
            assert writer.log("secret.test", resource_id=str(i))
        assert wait_until(lambda: writer.stats().retries >= 2, timeout=20)
        assert writer.flush(timeout=0.2) is False
        stats = writer.stats()
        assert stats.last_error
        _assert_clean(str(stats.last_error), password, "stats().last_error")
        _assert_clean(repr(stats), password, "repr(stats())")
        _assert_clean(repr(writer), password, "repr(writer) while failing")
    finally:
        assert writer.close(timeout=1) is False
    assert writer.stats().pending == 0
    assert writer.stats().dead_lettered == 5
    assert len(letters) == 5
    for letter in letters:
        _assert_clean(letter.reason, password, "a dead letter's reason")
        _assert_clean(repr(letter), password, "repr(dead letter)")
    assert "database write failed" in caplog.text  # the failure was logged...
    _assert_clean(caplog.text, password, "the log")  # ...without the secret
    for record in caplog.records:
        if record.exc_info:
            rendered = "".join(traceback.format_exception(*record.exc_info))
            _assert_clean(rendered, password, "a logged traceback")


@pytest.mark.parametrize("case", CASES)
def test_password_never_leaks_from_schema_create(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    password = _password()
    dsn = _dsns(password)[case]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(psycopg.Error) as info:
        auditq.schema.create(dsn, schema="auditq_test", table="never")
    exc = info.value
    _assert_clean(str(exc), password, "str(exception)")
    _assert_clean(repr(exc), password, "repr(exception)")
    rendered = "".join(traceback.format_exception(exc))
    _assert_clean(rendered, password, "the formatted traceback")
    _assert_clean(caplog.text, password, "the log")


def test_password_never_leaks_from_module_api(
    default_writer: None, caplog: pytest.LogCaptureFixture
) -> None:
    password = _password()
    caplog.set_level(logging.DEBUG)
    writer = auditq.configure(_dsns(password)["url"], retry_backoff_max=0.1, warn_interval=0)
    assert auditq.log("secret.module")
    assert wait_until(lambda: writer.stats().retries >= 1, timeout=20)
    _assert_clean(repr(auditq.get_writer()), password, "repr(default writer)")
    _assert_clean(str(writer.stats().last_error), password, "last_error")
    assert auditq.shutdown(timeout=1) is False
    _assert_clean(caplog.text, password, "the log")


def test_password_with_url_escapes(caplog: pytest.LogCaptureFixture) -> None:
    raw = f"p@ss:w/rd?{uuid.uuid4().hex[:10]}"
    dsn = f"postgresql://auditq:{quote(raw, safe='')}@127.0.0.1:1/audit"
    caplog.set_level(logging.DEBUG)
    writer = AuditWriter(dsn, retry_backoff_max=0.1, warn_interval=0)
    try:
        assert writer.log("escaped")
        assert wait_until(lambda: writer.stats().retries >= 1, timeout=20)
        for text in (repr(writer), str(writer.stats().last_error), caplog.text):
            assert raw not in text
            assert quote(raw, safe="") not in text
    finally:
        writer.close(timeout=1)
    assert raw not in caplog.text and quote(raw, safe="") not in caplog.text
