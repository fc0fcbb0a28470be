"""The DSN's password never appears in logs, reprs, stats, dead letters or exceptions; a
malformed DSN fails at construction; a server's DETAIL (row contents) stays out of logs."""

from __future__ import annotations

import logging
import re
import traceback
import uuid
from urllib.parse import quote, urlencode

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import auditq
import auditq.schema
from auditq import AuditWriter, DeadLetter
from auditq.config import ConfigError
from auditq.dsn import Dsn, resolve_dsn
from auditq.redact import loggable

from .conftest import Table
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
#: Strings libpq can connect with (and fail: port 1): the writer takes them and retries.
CONNECTABLE = ["url", "keywords", "quoted-keywords"]
#: Strings that cannot work: refused at construction (issue 15, item 2).
MALFORMED = [case for case in CASES if case not in CONNECTABLE]


def _assert_clean(text: str, password: str, where: str) -> None:
    for form in _forms(password):
        assert form not in text, f"password leaked in {where}: {text!r}"


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_dsn_is_refused_without_its_password(case: str) -> None:
    password = _password()
    with pytest.raises(ConfigError) as info:
        AuditWriter(_dsns(password)[case])
    _assert_clean(str(info.value), password, "the ConfigError")
    _assert_clean("".join(traceback.format_exception(info.value)), password, "its traceback")
    assert "the DSN from the argument" in str(info.value)


@pytest.mark.parametrize("case", CONNECTABLE)
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
    with pytest.raises((psycopg.Error, ConfigError)) as info:
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


# -- passwords with unescaped URL delimiters (issue 14, item 8) -------------------------------


def _fragments(password: str) -> list[str]:
    """The password and the pieces libpq may cut it into (3 characters or more)."""
    pieces = [p for p in re.split(r"[@/:]", password) if len(p) >= 3]
    return [password, quote(password, safe=""), *pieces]


@pytest.mark.parametrize(
    "template",
    [
        "postgresql://app:{s}Zx9/Kq+3Lm@127.0.0.1:1/prod",  # libpq: host app, port {s}Zx9
        "postgresql://app:p@ss@{s}word@127.0.0.1:1/prod",  # libpq: password p, host ss@...
        "postgresql://app:{s}/q@w@127.0.0.1:1/prod",
    ],
)
def test_unescaped_delimiters_in_a_url_password_never_leak(template: str) -> None:
    secret = uuid.uuid4().hex[:8]
    dsn = template.format(s=secret)
    password = dsn.split("://app:", 1)[1].rsplit("@", 1)[0]
    with pytest.raises(ConfigError) as info:
        AuditWriter(dsn)
    message = str(info.value)
    assert "percent-encode" in message
    for fragment in _fragments(password):
        assert fragment not in message, f"{fragment!r} leaked: {message!r}"


def test_a_password_libpq_reads_as_host_port_and_dbname_never_shows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # libpq reads `app:5999/<secret>@127.0.0.1/prod` as host "app", port 5999 and database
    # "<secret>@127.0.0.1/prod": a valid string that points elsewhere. Nothing may show it.
    secret = f"S{uuid.uuid4().hex[:10]}"
    dsn = f"postgresql://app:5999/{secret}@127.0.0.1/prod?connect_timeout=2"
    caplog.set_level(logging.DEBUG)
    shown = Dsn(dsn)
    assert secret not in str(shown) and secret not in repr(shown)
    assert secret not in shown.target()
    letters: list[DeadLetter] = []
    writer = AuditWriter(
        dsn,
        retry_backoff_max=0.1,
        warn_interval=0,
        connect_timeout=2,
        on_dead_letter=letters.append,
    )
    try:
        assert secret not in repr(writer)
        assert writer.log("leak.check")
        assert wait_until(lambda: writer.stats().retries >= 1, timeout=30)
        assert secret not in str(writer.stats().last_error)
    finally:
        writer.close(timeout=1)
    assert letters
    assert all(secret not in letter.reason for letter in letters)
    assert secret not in caplog.text


# -- malformed DSNs fail at construction, naming their source (issue 15, item 2) --------------


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("mysql://app:pw@127.0.0.1/prod", "mysql:// URL"),
        ("postgresql://app@127.0.0.1:99999/prod", "port"),
        ("postgresql://app@127.0.0.1:notaport/prod", "port"),
        ("host=127.0.0.1 port=x5432 dbname=prod", "port"),
        ("postgresql://app@127.0.0.1/prod?sslmode=bogus", "sslmode=bogus"),
        ("postgresql://app@127.0.0.1/prod?nosuchoption=1", "does not parse"),
        ("postgresql://app@127.0.0.1/prod?connect_timeout=soon", "connect_timeout"),
    ],
)
def test_malformed_dsn_raises_config_error_naming_its_source(dsn: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        AuditWriter(dsn)
    assert "the DSN from the argument" in str(info.value)
    for variable in ("AUDITQ_DSN", "DATABASE_URL"):
        with pytest.raises(ConfigError, match=f"the DSN from {variable} "):
            resolve_dsn(None, {variable: dsn})


def test_resolve_dsn_reads_argument_then_auditq_dsn_then_database_url() -> None:
    env = {"AUDITQ_DSN": "postgresql://a@h1/d1", "DATABASE_URL": "postgresql://b@h2/d2"}
    assert str(resolve_dsn("postgresql://c@h3/d3", env)) == "postgresql://c@h3/d3"
    assert resolve_dsn("postgresql://c@h3/d3", env).source == "the argument"
    assert resolve_dsn(None, env).source == "AUDITQ_DSN"
    assert resolve_dsn(None, {**env, "AUDITQ_DSN": " "}).source == "DATABASE_URL"
    with pytest.raises(ConfigError, match="no database given"):
        resolve_dsn(None, {})
    with pytest.raises(ConfigError, match="no database given"):
        resolve_dsn("", {"AUDITQ_DSN": "", "DATABASE_URL": ""})


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_sqlalchemy_driver_spelling_is_accepted(pg_dsn: str, table: Table, driver: str) -> None:
    params = {k: str(v) for k, v in conninfo_to_dict(pg_dsn).items()}
    spelled = f"postgresql+{driver}://?{urlencode(params, quote_via=quote)}"
    assert str(Dsn(spelled)).startswith("postgresql://")
    with AuditWriter(spelled, schema=table.schema, table=table.name) as writer:
        assert writer.log("driver.spelling")
        assert writer.flush(timeout=30)
    assert table.count() == 1


# -- the server's DETAIL stays out of logs and last_error (issue 14, item 9) ------------------

_EMAIL = "alice.private@example.com"


def _refusing_trigger(table: Table) -> None:
    """A trigger that refuses one resource with a DETAIL quoting the row (as a CHECK does)
    and a primary message holding a newline (a forged log line), under an unclassified
    SQLSTATE the sink retries before it blames the row."""
    table.execute(
        """
        CREATE FUNCTION {table}_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.resource_id = 'refuse' THEN
            RAISE EXCEPTION USING ERRCODE = 'P0001',
              MESSAGE = E'audit refused\\nCRITICAL forged log line',
              DETAIL = 'Failing row contains (' || NEW.actor_id || ')';
          END IF;
          RETURN NEW;
        END $$
        """.replace("{table}_refuse", "auditq_test.refuse_" + table.name)
    )
    table.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION "
        + f"auditq_test.refuse_{table.name}()"
    )


def test_server_detail_goes_to_dead_letters_only(
    table: Table, caplog: pytest.LogCaptureFixture
) -> None:
    _refusing_trigger(table)
    caplog.set_level(logging.DEBUG)
    letters: list[DeadLetter] = []
    with AuditWriter(
        table.dsn,
        schema=table.schema,
        table=table.name,
        retry_backoff_max=0.05,
        warn_interval=3600,
        on_dead_letter=letters.append,
    ) as writer:
        assert writer.log("detail.kept", resource_id="fine", actor_id="bob")
        assert writer.log("detail.refused", resource_id="refuse", actor_id=_EMAIL)
        assert writer.flush(timeout=30)
        last_error = writer.stats().last_error
    assert table.count() == 1
    assert last_error is not None and "[P0001] audit refused" in last_error
    assert _EMAIL not in last_error and "\n" not in last_error
    assert "\\nCRITICAL forged log line" in last_error  # escaped, not a line of its own
    sink_lines = [r.getMessage() for r in caplog.records if "database write failed" in r.msg]
    assert sink_lines
    for line in sink_lines:
        assert _EMAIL not in line and "\n" not in line
    assert len(letters) == 1
    assert _EMAIL in letters[0].reason  # the detail is kept where it is private
    assert loggable(letters[0].reason).startswith("rejected by the server: [P0001]")
    assert _EMAIL not in loggable(letters[0].reason)


def test_no_log_line_holds_the_server_detail(
    table: Table, caplog: pytest.LogCaptureFixture
) -> None:
    _refusing_trigger(table)
    caplog.set_level(logging.DEBUG)
    with AuditWriter(
        table.dsn, schema=table.schema, table=table.name, retry_backoff_max=0.05, warn_interval=0
    ) as writer:
        assert writer.log("detail.refused", resource_id="refuse", actor_id=_EMAIL)
        assert writer.flush(timeout=30)
    assert "dead-lettered 1 entries" in caplog.text
    # The entry itself (its actor_id here) is kept on the dead-letters logger, the one place
    # its content survives without a spool or a callback; the server's DETAIL goes nowhere
    # in the logs, not even there.
    letters = [r for r in caplog.records if r.name == "auditq.dead_letters"]
    assert len(letters) == 1 and "DETAIL" not in letters[0].getMessage()
    others = "\n".join(r.getMessage() for r in caplog.records if r not in letters)
    assert _EMAIL not in others
