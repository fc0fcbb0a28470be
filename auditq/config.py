"""Writer options: one definition of each, one check of each, wherever it comes from.

An option is given as a keyword (`AuditWriter(batch_size=...)`, `auditq.configure(...)`) or
read from `AUDITQ_<OPTION>` (by `configure()` without arguments and the CLI); the DSN comes
from the argument, then `AUDITQ_DSN`, then `DATABASE_URL`. Explicit arguments always win over
the environment, and an empty variable counts as unset.

Every value is checked here, so a bad one fails at construction with one `ConfigError`
naming the option (or the variable it came from), instead of deep inside the writer.
"""

from __future__ import annotations

import difflib
import math
import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final, Literal, NamedTuple

from .schema import DEFAULT_SCHEMA, DEFAULT_TABLE

#: Rows per COPY transaction at most (`batch_size`): large, so the two round trips between
#: COPYs (each a wait for the GIL under load) are rare.
DEFAULT_BATCH_SIZE: Final = 50_000
#: Queued entries that wake the writer before flush_interval, unless `wake_rows` says
#: otherwise (see `WriterOptions.wake_every`).
WAKE_ROWS: Final = 5_000

FsyncPolicy = Literal["always", "interval", "never"]


class ConfigError(ValueError):
    """A setting that does not make sense; the message names it and where it came from."""


# -- checks of values (keywords and parsed variables alike) ------------------------------------


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("expected a whole number > 0")
    return value


def _optional_positive_int(value: Any) -> int | None:
    return None if value is None else _positive_int(value)


def _seconds(*, allow_zero: bool) -> Callable[[Any], float]:
    wanted = f"expected a number of seconds {'>= 0' if allow_zero else '> 0'}"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(wanted)
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise ValueError(wanted)
        return float(value)

    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected True or False")
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise ValueError("expected a non-empty name")
    return value


def _optional_name(value: Any) -> str | None:
    return None if value is None else _name(value)


def _identifier(value: Any) -> str:
    name = _name(value)
    # PostgreSQL silently truncates longer identifiers (NAMEDATALEN - 1), to another table.
    if len(name.encode()) > 63:
        raise ValueError("expected a PostgreSQL identifier of at most 63 bytes")
    return name


def _path(value: Any) -> str | None:
    if value is None:
        return None
    try:
        path = os.fspath(value)
    except TypeError:
        raise ValueError("expected a directory path") from None
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ValueError("expected a directory path")
    return path


def _fsync_policy(value: Any) -> str:
    if value not in ("always", "interval", "never"):
        raise ValueError("expected always, interval or never")
    return str(value)


def _callable(value: Any) -> Any:
    if value is not None and not callable(value):
        raise ValueError("expected a callable or None")
    return value


# -- text from the environment ---------------------------------------------------------------


def _text_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _text_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("expected a whole number > 0") from None


def _text_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError("expected a number of seconds") from None


def _text(text: str) -> str:
    return text.strip()


def _text_lower(text: str) -> str:
    return text.strip().lower()


class Option(NamedTuple):
    """How an option is read from its variable's text, and how any value of it is checked."""

    parse: Callable[[str], Any]
    check: Callable[[Any], Any]


#: Every option that can come from `AUDITQ_<NAME>`, with its parser and check (all of the
#: writer's options but `on_dead_letter`, a callable).
OPTIONS: Final[dict[str, Option]] = {
    "table": Option(_text, _identifier),
    "schema": Option(_text, _identifier),
    "name": Option(_text, _optional_name),
    "origin": Option(_text, _optional_name),
    "max_queue": Option(_text_int, _positive_int),
    "batch_size": Option(_text_int, _positive_int),
    "wake_rows": Option(_text_int, _optional_positive_int),
    "flush_interval": Option(_text_float, _seconds(allow_zero=False)),
    "shutdown_timeout": Option(_text_float, _seconds(allow_zero=True)),
    "write_timeout": Option(_text_float, _seconds(allow_zero=False)),
    "connect_timeout": Option(_text_float, _seconds(allow_zero=False)),
    "retry_backoff_max": Option(_text_float, _seconds(allow_zero=False)),
    "warn_interval": Option(_text_float, _seconds(allow_zero=True)),
    "strict": Option(_text_bool, _bool),
    "spool_dir": Option(_text, _path),
    "spool_after": Option(_text_float, _seconds(allow_zero=True)),
    "spool_max_bytes": Option(_text_int, _positive_int),
    "spool_fsync": Option(_text_lower, _fsync_policy),
}
#: Options only code can give.
_CODE_ONLY: Final[dict[str, Callable[[Any], Any]]] = {"on_dead_letter": _callable}


@dataclass(frozen=True, slots=True)
class WriterOptions:
    """A writer's settings, checked; read-only once the writer is made (its parts are sized
    from them)."""

    table: str = DEFAULT_TABLE
    schema: str = DEFAULT_SCHEMA
    name: str | None = None
    origin: str | None = None
    max_queue: int = 100_000
    batch_size: int = DEFAULT_BATCH_SIZE
    wake_rows: int | None = None
    flush_interval: float = 1.0
    shutdown_timeout: float = 10.0
    write_timeout: float = 15.0
    connect_timeout: float = 5.0
    retry_backoff_max: float = 5.0
    warn_interval: float = 10.0
    strict: bool = False
    on_dead_letter: Callable[[Any], None] | None = None
    spool_dir: str | None = None
    spool_after: float = 5.0
    spool_max_bytes: int = 1024**3
    spool_fsync: FsyncPolicy = "interval"

    @property
    def wake_every(self) -> int:
        """Callers wake the writer every this many queued entries (else it waits out
        flush_interval): `wake_rows`, by default WAKE_ROWS or a full batch or half the queue
        when either is smaller. The COPY it then starts keeps taking rows while a backlog
        lasts, so it need not wait for a whole batch to queue up while the server idles."""
        if self.wake_rows is not None:
            return self.wake_rows
        return min(self.batch_size, max(1, self.max_queue // 2), WAKE_ROWS)

    @property
    def display_name(self) -> str:
        return self.name or f"{self.schema}.{self.table}"

    @property
    def origin_or_default(self) -> str:
        """NIST AU-3's "where the event occurred": given, or `<program>@<hostname>`."""
        return self.origin or default_origin()


#: The names `AuditWriter(...)` and `configure(...)` accept as options.
OPTION_NAMES: Final = tuple(f.name for f in fields(WriterOptions))


def check_options(given: Mapping[str, Any], *, source: str = "") -> WriterOptions:
    """`WriterOptions` from keyword values; `ConfigError` naming the first bad one (and
    `source`, e.g. the variable, when given), `TypeError` listing the accepted names for an
    unknown one."""
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(unknown_option_message(unknown[0]))
    checked: dict[str, Any] = {}
    for name, value in given.items():
        check = OPTIONS[name].check if name in OPTIONS else _CODE_ONLY[name]
        try:
            checked[name] = check(value)
        except ValueError as exc:
            where = f" (from {source})" if source else ""
            raise ConfigError(f"{name}={value!r}{where} is not valid: {exc}") from None
    return replace(WriterOptions(), **checked)


def unknown_option_message(name: str) -> str:
    accepted = ("dsn", "pool", *OPTION_NAMES)
    close = difflib.get_close_matches(name, accepted, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown option {name!r}{hint} Accepted: {', '.join(accepted)}"


def default_origin() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"{program or 'python'}@{socket.gethostname()}"


# -- the environment ----------------------------------------------------------------------------


def _networks(text: str) -> tuple[str, ...]:
    import ipaddress

    items = tuple(item.strip() for item in text.split(",") if item.strip())
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR") from None
    return items


def _header(text: str) -> str:
    value = text.strip()
    if not value or not all(c.isalnum() or c in "-_" for c in value) or not value.isascii():
        raise ValueError("expected an HTTP header name such as X-Request-ID")
    return value


#: The web middleware's options (`auditq.middleware`), also from `AUDITQ_<NAME>`.
MIDDLEWARE_OPTIONS: Final[dict[str, Callable[[str], Any]]] = {
    "request_id_header": _header,
    "trusted_proxies": _networks,
    "log_requests": lambda text: _text_bool(text),
}


def dsn_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The DSN the environment gives: `AUDITQ_DSN`, else `DATABASE_URL`."""
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


def _parse_and_check(option: Option) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return option.check(option.parse(text))

    return parse


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Writer options set in the environment, parsed and checked; raises `ConfigError`
    naming a bad variable."""
    return _parse_all({name: _parse_and_check(o) for name, o in OPTIONS.items()}, environ)


def middleware_options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Middleware options set in the environment, parsed; raises `ConfigError` naming a bad
    variable."""
    return _parse_all(MIDDLEWARE_OPTIONS, environ)
