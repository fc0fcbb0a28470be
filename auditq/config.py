"""Writer options from the environment: `AUDITQ_<OPTION>` for each option, and the DSN from
`AUDITQ_DSN`, else `DATABASE_URL`. Explicit arguments always win over the environment.

Every value is checked here, so a bad one fails at `configure()` time with one `ConfigError`
naming the variable, instead of deep inside the writer. An empty variable counts as unset.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Final


class ConfigError(ValueError):
    """An environment variable that does not parse; the message names it."""


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _positive_int(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError("expected a whole number > 0") from None
    if value <= 0:
        raise ValueError("expected a whole number > 0")
    return value


def _seconds(*, allow_zero: bool) -> Callable[[str], float]:
    wanted = f"a number of seconds {'>= 0' if allow_zero else '> 0'}"

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"expected {wanted}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"expected {wanted}")
        return value

    return parse


def _name(text: str) -> str:
    value = text.strip()
    if not value or "\x00" in value:
        raise ValueError("expected a non-empty name")
    return value


def _identifier(text: str) -> str:
    value = _name(text)
    # PostgreSQL silently truncates longer identifiers (NAMEDATALEN - 1), to another table.
    if len(value.encode()) > 63:
        raise ValueError("expected a PostgreSQL identifier of at most 63 bytes")
    return value


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _networks(text: str) -> tuple[str, ...]:
    import ipaddress

    items = _csv(text)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR") from None
    return items


def _fsync_policy(text: str) -> str:
    value = text.strip().lower()
    if value not in {"always", "interval", "never"}:
        raise ValueError("expected always, interval or never")
    return value


def _header(text: str) -> str:
    value = text.strip()
    if not value or not all(c.isalnum() or c in "-_" for c in value) or not value.isascii():
        raise ValueError("expected an HTTP header name such as X-Request-ID")
    return value


#: Option name -> parser, for every `AuditWriter` option that can come from `AUDITQ_<NAME>`
#: (all of them but `on_dead_letter`, a callable).
OPTIONS: Final[dict[str, Callable[[str], Any]]] = {
    "table": _identifier,
    "schema": _identifier,
    "name": _name,
    "max_queue": _positive_int,
    "batch_size": _positive_int,
    "flush_interval": _seconds(allow_zero=False),
    "shutdown_timeout": _seconds(allow_zero=True),
    "write_timeout": _seconds(allow_zero=False),
    "connect_timeout": _seconds(allow_zero=False),
    "retry_backoff_max": _seconds(allow_zero=False),
    "warn_interval": _seconds(allow_zero=True),
    "strict": _bool,
    "spool_dir": _name,
    "spool_after": _seconds(allow_zero=True),
    "spool_max_bytes": _positive_int,
    "spool_fsync": _fsync_policy,
    "prefault_memory": _bool,
}

#: The web middleware's options (`auditq.middleware`), also from `AUDITQ_<NAME>`.
MIDDLEWARE_OPTIONS: Final[dict[str, Callable[[str], Any]]] = {
    "request_id_header": _header,
    "trusted_proxies": _networks,
    "log_requests": _bool,
}


def dsn_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return env.get("AUDITQ_DSN") or env.get("DATABASE_URL") or None


def _parse_all(
    parsers: Mapping[str, Callable[[str], Any]], environ: Mapping[str, str] | None
) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    found: dict[str, Any] = {}
    for name, parse in parsers.items():
        variable = f"AUDITQ_{name.upper()}"
        raw = env.get(variable)
        if raw is None or not raw.strip():
            continue
        try:
            found[name] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{variable}={raw!r} is not a valid {name}: {exc}") from None
    return found


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Writer options set in the environment, parsed; raises `ConfigError` naming a bad
    variable."""
    return _parse_all(OPTIONS, environ)


def middleware_options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Middleware options set in the environment, parsed; raises `ConfigError` naming a bad
    variable."""
    return _parse_all(MIDDLEWARE_OPTIONS, environ)
