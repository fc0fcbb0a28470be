"""Writer options from the environment: `AUDITQ_<OPTION>` for each option, and the DSN from
`AUDITQ_DSN`, else `DATABASE_URL`. Explicit arguments always win over the environment."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Final


class ConfigError(ValueError):
    """An environment variable that does not parse; the message names it."""


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true/false")


#: Option name -> parser, for every option that can come from `AUDITQ_<NAME>`.
OPTIONS: Final[dict[str, Callable[[str], Any]]] = {
    "table": str,
    "schema": str,
    "max_queue": int,
    "batch_size": int,
    "flush_interval": float,
    "shutdown_timeout": float,
    "write_timeout": float,
    "connect_timeout": float,
    "retry_backoff_max": float,
    "warn_interval": float,
    "strict": _bool,
}


def dsn_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return env.get("AUDITQ_DSN") or env.get("DATABASE_URL") or None


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Options set in the environment, parsed; raises `ConfigError` naming a bad variable."""
    env = os.environ if environ is None else environ
    found: dict[str, Any] = {}
    for name, parse in OPTIONS.items():
        variable = f"AUDITQ_{name.upper()}"
        raw = env.get(variable)
        if raw is None:
            continue
        try:
            found[name] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{variable}={raw!r} is not a valid {name}: {exc}") from None
    return found
