"""Connection strings: checked when given, and never leaking their secrets.

A DSN is parsed with libpq's own conninfo parser when it is given, so a malformed one fails
at construction with a `ConfigError` naming where it came from, instead of being retried
forever as if the database were down.

What is shown of it (repr, str, log lines) is built from the parsed, non-secret parts, not
from the string. A password with an unescaped `/` or `@` in a URL is not read by libpq as a
password at all: `postgresql://app:Zx9/Kq@db/prod` becomes host `app`, port `Zx9`, database
`Kq@db/prod`. So every reading of the URL's authority that might hold the password is a
secret too, and any displayed part that overlaps one is masked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from itertools import combinations
from typing import Final
from urllib.parse import quote, unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import ConfigError

_MASK: Final = "***"
_URL_PASSWORD = re.compile(r"(://[^:/?#@\s]*:)([^@/?#\s]*)(@)")
_KV_PASSWORD = re.compile(r"((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
#: libpq quotes what it could not parse; those quotes may hold the password.
_QUOTED = re.compile(r'"([^"]*)"')
#: Where a password with unescaped URL delimiters may be cut into pieces by libpq.
_DELIMITERS = re.compile(r"[@/:?#&=,]")
#: Secret fragments shorter than this are not masked (they would mask ordinary words).
_MIN_SECRET: Final = 3

_SCHEMES: Final = frozenset({"postgresql", "postgres"})
_SECRET_KEYS: Final = ("password", "sslpassword")
_CHOICES: Final[dict[str, frozenset[str]]] = {
    "sslmode": frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}),
    "gssencmode": frozenset({"disable", "prefer", "require"}),
    "channel_binding": frozenset({"disable", "prefer", "require"}),
    "target_session_attrs": frozenset(
        {"any", "read-write", "read-only", "primary", "standby", "prefer-standby"}
    ),
    "load_balance_hosts": frozenset({"disable", "random"}),
}
_INTEGERS: Final = (
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)
_ENCODE_HINT: Final = (
    "if the user name or password holds '@', '/', ':', '?' or '#', percent-encode it "
    "(urllib.parse.quote(password, safe=''))"
)

#: Marks a problem that an unescaped character in the user info explains (see _error).
_HINTED: Final = " (as libpq read it)"

#: Where a DSN may come from, in the order `resolve_dsn` reads them.
ENV_VARIABLES: Final = ("AUDITQ_DSN", "DATABASE_URL")


class Dsn:
    """A PostgreSQL connection string, checked, whose repr and str never show a secret."""

    __slots__ = ("_display", "_params", "_secrets", "_value", "source")

    def __init__(self, value: str, *, source: str = "the argument") -> None:
        """Raises `ConfigError` (naming `source`) when `value` is not a usable PostgreSQL
        connection string; the message never holds a secret."""
        self.source = source
        self._display = "postgresql://(not checked)"  # what a repr shows until it is
        self._value = _strip_driver(value)
        self._secrets = _find_secrets(self._value)
        try:
            self._params = conninfo_to_dict(self._value)
        except psycopg.Error as exc:
            raise self._error(self._parse_problem(value, str(exc))) from None
        problem = self._check()
        if problem:
            raise self._error(problem)
        self._display = self._render()

    @property
    def secret_value(self) -> str:
        """The real string, for the driver only."""
        return self._value

    def params(self) -> dict[str, str]:
        """What libpq read from the string (secrets included: for the driver only)."""
        return {k: str(v) for k, v in self._params.items()}

    def target(self) -> str:
        """Where it points, without secrets: host, port and database as libpq read them
        (masked where they overlap a secret), for a spool segment's header."""
        p = self._safe_params()
        return f"host={p.get('host', '')} port={p.get('port', '')} dbname={p.get('dbname', '')}"

    def with_defaults(self, **defaults: str | int | None) -> Dsn:
        """The same target with libpq options added where the string does not set them."""
        extra = {k: v for k, v in defaults.items() if k not in self._params and v is not None}
        if not extra:
            return self
        return self._derived(make_conninfo(self._value, **extra))

    def with_options(self, options: str) -> Dsn:
        """The same target with `options` (server settings, `-c name=value ...`) added after
        any the string sets, so they win over those and over the role's defaults."""
        current = str(self._params.get("options") or "").strip()
        combined = f"{current} {options}".strip()
        return self._derived(make_conninfo(self._value, options=combined))

    def _derived(self, value: str) -> Dsn:
        """A Dsn for `value` (this one re-rendered by libpq) that keeps this one's secrets:
        the re-rendering no longer shows how the URL's authority was cut."""
        merged = Dsn(value, source=self.source)
        merged._secrets = _longest_first({*merged._secrets, *self._secrets})
        merged._display = merged._render()
        return merged

    def scrub(self, text: str) -> str:
        """`text` with this string's secrets (and any inline password) masked."""
        for secret in self._secrets:  # longest first: a fragment never unmasks a whole
            text = text.replace(secret, _MASK)
        text = _URL_PASSWORD.sub(rf"\g<1>{_MASK}\g<3>", text)
        return _KV_PASSWORD.sub(rf"\g<1>{_MASK}", text)

    def __str__(self) -> str:
        return self._display

    def __repr__(self) -> str:
        return f"Dsn({self._display!r})"

    # -- checks --------------------------------------------------------------------------

    def _error(self, problem: str) -> ConfigError:
        hint = f"; {_ENCODE_HINT}" if problem.endswith(_HINTED) else ""
        return ConfigError(f"the DSN from {self.source} {self.scrub(problem)}{hint}")

    def _parse_problem(self, original: str, message: str) -> str:
        scheme = _scheme(original)
        if scheme is not None and scheme.split("+", 1)[0] not in _SCHEMES:
            shown = scheme if scheme.isascii() and scheme.isalnum() else "this"
            return (
                f"is a {shown}:// URL: auditq writes to PostgreSQL "
                "(postgresql://user@host:port/dbname)"
            )
        # libpq quotes the text it stopped at, which may be the password: never shown.
        first = message.strip().splitlines()[0] if message.strip() else "unparsable"
        return f"does not parse as a PostgreSQL connection string: {_QUOTED.sub(_unquoted, first)}"

    def _check(self) -> str:
        params = self._params
        for port in str(params.get("port") or "").split(","):
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                return f"has a port that is not a number from 1 to 65535{_HINTED}"
        for host in str(params.get("host") or "").split(","):
            if "@" in host or ("/" in host and not host.startswith("/")):
                return f"has a host name holding '@' or '/'{_HINTED}"
        for key, allowed in _CHOICES.items():
            value = params.get(key)
            if value is not None and str(value) not in allowed:
                return f"sets {key}={value!s} (expected one of {', '.join(sorted(allowed))})"
        for key in _INTEGERS:
            value = params.get(key)
            if value is not None and not str(value).lstrip("-").isdigit():
                return f"sets {key} to something other than a whole number"
        return ""

    # -- display -------------------------------------------------------------------------

    def _safe_params(self) -> dict[str, str]:
        """user, host, port and dbname as libpq read them, each masked when it overlaps a
        secret (a password libpq cut into pieces lands in any of them)."""
        out: dict[str, str] = {}
        for key in ("user", "host", "port", "dbname"):
            value = self._params.get(key)
            if value is None or value == "":
                continue
            text = str(value)
            if any(
                secret in text or (len(text) >= _MIN_SECRET and text in secret)
                for secret in self._secrets
            ):
                text = _MASK
            out[key] = text
        return out

    def _render(self) -> str:
        p = self._safe_params()
        user = quote(p["user"], safe="*") if "user" in p else ""
        password = f":{_MASK}" if any(self._params.get(k) for k in _SECRET_KEYS) else ""
        auth = f"{user}{password}@" if user or password else ""
        hosts = p.get("host", "").split(",") if p.get("host") else []
        ports = p.get("port", "").split(",") if p.get("port") else []
        query = ""
        if hosts and hosts[0].startswith("/"):  # a Unix socket directory is no URL host
            query, hosts = f"?host={quote(','.join(hosts), safe='/*,')}", []
        if len(ports) == 1 and len(hosts) > 1:
            ports = ports * len(hosts)
        netloc = ",".join(
            (f"[{h}]" if ":" in h else h) + (f":{ports[i]}" if i < len(ports) and ports[i] else "")
            for i, h in enumerate(hosts or [""])
        )
        if not hosts and ports and ports[0]:
            netloc = f":{ports[0]}"
        dbname = "/" + quote(p["dbname"], safe="*") if "dbname" in p else ""
        return f"postgresql://{auth}{netloc}{dbname}{query}"


def resolve_dsn(given: str | None, environ: Mapping[str, str] | None = None) -> Dsn:
    """The DSN to use: `given`, else `AUDITQ_DSN`, else `DATABASE_URL` (an empty variable
    counts as unset), checked. Raises `ConfigError` naming the source of a bad one, or
    saying none was given."""
    if given:
        return Dsn(given, source="the argument")
    env = os.environ if environ is None else environ
    for variable in ENV_VARIABLES:
        value = env.get(variable)
        if value and value.strip():
            return Dsn(value.strip(), source=variable)
    raise ConfigError("no database given: pass a DSN or pool, or set AUDITQ_DSN or DATABASE_URL")


def _unquoted(match: re.Match[str]) -> str:
    """libpq's quote of a single character stays; a longer one may be the password."""
    return match.group(0) if len(match.group(1)) <= 1 else "(…)"


def _scheme(value: str) -> str | None:
    head, sep, _ = value.strip().partition("://")
    if not sep or not head or " " in head or "=" in head:
        return None
    return head.lower()


def _strip_driver(value: str) -> str:
    """`postgresql+psycopg://` (SQLAlchemy's spelling) -> `postgresql://`."""
    text = value.strip()
    scheme = _scheme(text)
    if scheme is not None and "+" in scheme and scheme.split("+", 1)[0] in _SCHEMES:
        return scheme.split("+", 1)[0] + text[len(scheme) :]
    return text


def _find_secrets(value: str) -> tuple[str, ...]:
    """Every text that may be (part of) a secret of `value`, longest first."""
    found: set[str] = set()
    try:
        params = conninfo_to_dict(value)
    except psycopg.Error:
        params = {}
    for key in _SECRET_KEYS:
        if params.get(key):
            found.add(str(params[key]))
    if _scheme(value) is not None:
        found.update(_authority_secrets(value))
    for match in _KV_PASSWORD.finditer(value):
        found.add(match.group(2).strip("'"))
    forms = found | {unquote(s) for s in found} | {quote(s, safe="") for s in found}
    return _longest_first(s for s in forms if len(s) >= _MIN_SECRET)


def _longest_first(secrets: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(secrets), key=len, reverse=True))


def _authority_secrets(value: str) -> set[str]:
    """The URL's password as a person meant it, and every piece libpq may cut it into.

    The user info ends at the last `@` of the string: a later `@` can only be the password's
    own (or, rarely, the database name's: masked too, which is the safe side)."""
    rest = value.split("://", 1)[1]
    userinfo, at, _ = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return set()
    password = userinfo.split(":", 1)[1]
    pieces = _DELIMITERS.split(password)
    seps = _DELIMITERS.findall(password)
    found = {password}
    # Every run of consecutive pieces, joined as in the original (the password is short).
    for i, j in combinations(range(len(pieces) + 1), 2):
        run = pieces[i]
        for k in range(i + 1, j):
            run += seps[k - 1] + pieces[k]
        found.add(run)
    return found
