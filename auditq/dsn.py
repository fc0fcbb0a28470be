"""Connection strings that never leak their secrets into logs, reprs or errors.

libpq quotes a malformed conninfo verbatim in its error message, and a URL carries its
password inline, so every text that leaves auditq passes through `Dsn.scrub()`.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo

_MASK = "***"
_URL_PASSWORD = re.compile(r"(://[^:/?#@\s]*:)([^@/?#\s]*)(@)")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


class Dsn:
    """A PostgreSQL connection string whose repr and str show it with the password masked."""

    __slots__ = ("_secrets", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        self._secrets = _find_secrets(value)

    @property
    def secret_value(self) -> str:
        """The real string, for the driver only."""
        return self._value

    def with_defaults(self, **defaults: str | int | None) -> Dsn:
        """The same target with libpq options added where the string does not set them."""
        try:
            present = conninfo_to_dict(self._value)
        except Exception:
            return self  # connecting will report the malformed string (scrubbed)
        extra = {k: v for k, v in defaults.items() if k not in present and v is not None}
        if not extra:
            return self
        merged = Dsn(make_conninfo(self._value, **extra))
        merged._secrets = merged._secrets | self._secrets
        return merged

    def scrub(self, text: str) -> str:
        """`text` with this string's secrets (and any inline password) masked."""
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        text = _URL_PASSWORD.sub(rf"\g<1>{_MASK}\g<3>", text)
        return _KV_PASSWORD.sub(rf"\g<1>{_MASK}", text)

    def __str__(self) -> str:
        return self.scrub(self._value)

    def __repr__(self) -> str:
        return f"Dsn({str(self)!r})"


def _find_secrets(value: str) -> frozenset[str]:
    secrets: set[str] = set()
    try:
        password = conninfo_to_dict(value).get("password")
    except Exception:
        password = None
    if not password and "://" in value:
        try:
            password = urlsplit(value).password
        except ValueError:
            password = None
    if password:
        secrets.add(str(password))
        secrets.add(unquote(str(password)))
    match = _URL_PASSWORD.search(value)
    if match and match.group(2):
        secrets.add(match.group(2))
    return frozenset(s for s in secrets if len(s) >= 3)
