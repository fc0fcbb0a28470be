"""Writer options: one definition of each (a pydantic model), one check of each, wherever it
comes from.

An option is given as a keyword (`AuditWriter(batch_size=...)`, `auditq.configure(...)`) or
read from `AUDITQ_<OPTION>` (by `configure()` and the CLI, through pydantic-settings, also
from a `.env` file when one is named); the DSN comes from the argument, then `AUDITQ_DSN`,
then `DATABASE_URL`. Explicit arguments always win over the environment, and an empty
variable counts as unset.

Every value is checked here, so a bad one fails at construction with one `ConfigError`
naming the option (or the variable it came from) and what it expects, instead of deep inside
the writer. Keywords are checked strictly (`batch_size="5"` is a mistake in code); variables
are text and parsed.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, Generic, Literal, Protocol, TypeVar, overload

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError as ConfigError
from .tables import DEFAULT_SCHEMA, DEFAULT_TABLE

#: Rows per COPY transaction at most (`batch_size`): large, so the two round trips between
#: COPYs (each a wait for the GIL under load) are rare.
DEFAULT_BATCH_SIZE: Final = 50_000
#: Queued entries that wake the writer before flush_interval, unless `wake_rows` says
#: otherwise (see `WriterOptions.wake_every`).
WAKE_ROWS: Final = 5_000
#: Whether writers hash-chain their rows unless told (`chain=`, `AUDITQ_CHAIN`).
CHAIN_DEFAULT: Final = False

FsyncPolicy = Literal["always", "interval", "never"]
T = TypeVar("T")


def _identifier(value: Any) -> Any:
    # PostgreSQL silently truncates longer identifiers (NAMEDATALEN - 1), to another table.
    if isinstance(value, str) and len(value.encode()) > 63:
        raise ValueError("longer than 63 bytes")
    return value


def _path(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


_Count = Annotated[int, Field(gt=0)]
_Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_SecondsOrZero = Annotated[float, Field(ge=0, allow_inf_nan=False)]
_Name = Annotated[str, Field(min_length=1, pattern=r"^[^\x00]*\S[^\x00]*$")]
_Identifier = Annotated[_Name, BeforeValidator(_identifier)]

#: What each option expects, for the one line a bad value gets.
EXPECTED: Final = {
    "table": "a PostgreSQL identifier of at most 63 bytes",
    "schema": "a PostgreSQL identifier of at most 63 bytes",
    "name": "a non-empty name",
    "origin": "a non-empty name of at most 256 characters",
    "max_queue": "a whole number > 0",
    "batch_size": "a whole number > 0",
    "wake_rows": "a whole number > 0",
    "flush_interval": "a number of seconds > 0",
    "shutdown_timeout": "a number of seconds >= 0",
    "write_timeout": "a number of seconds > 0",
    "connect_timeout": "a number of seconds > 0",
    "retry_backoff_max": "a number of seconds > 0",
    "warn_interval": "a number of seconds >= 0",
    "strict": "true or false (1/0, yes/no, on/off)",
    "on_dead_letter": "a callable or None",
    "before_write": "a callable or None",
    "spool_dir": "a directory path",
    "spool_after": "a number of seconds >= 0",
    "spool_max_bytes": "a whole number > 0",
    "spool_fsync": "always, interval or never",
    "chain": "true or false (1/0, yes/no, on/off)",
}


class WriterOptions(BaseModel):
    """A writer's settings, checked; read-only once the writer is made (its parts are sized
    from them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    table: _Identifier = DEFAULT_TABLE
    schema_: _Identifier = Field(DEFAULT_SCHEMA, alias="schema")
    name: _Name | None = None
    origin: Annotated[_Name, Field(max_length=256)] | None = None
    max_queue: _Count = 100_000
    batch_size: _Count = DEFAULT_BATCH_SIZE
    wake_rows: _Count | None = None
    flush_interval: _Seconds = 1.0
    shutdown_timeout: _SecondsOrZero = 10.0
    write_timeout: _Seconds = 15.0
    connect_timeout: _Seconds = 5.0
    retry_backoff_max: _Seconds = 5.0
    warn_interval: _SecondsOrZero = 10.0
    strict: bool = False
    on_dead_letter: Callable[[Any], None] | None = Field(None, exclude=True)
    before_write: Callable[[dict[str, Any]], dict[str, Any] | None] | None = Field(
        None, exclude=True
    )
    spool_dir: Annotated[str, Field(min_length=1), BeforeValidator(_path)] | None = None
    spool_after: _SecondsOrZero = 5.0
    spool_max_bytes: _Count = 1024**3
    spool_fsync: FsyncPolicy = "interval"
    #: Hash-chain the rows (docs/tamper-evidence.md): each COPY transaction also commits a
    #: digest of its rows, so `auditq verify` can prove them untouched.
    chain: bool = CHAIN_DEFAULT

    @property
    def schema(self) -> str:  # type: ignore[override]  # BaseModel.schema() is deprecated
        return self.schema_

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

    def given(self) -> dict[str, Any]:
        """Every option by its keyword name (what `AuditWriter(**...)` takes)."""
        values = {name: getattr(self, _field(name)) for name in OPTION_NAMES}
        return values


def _field(name: str) -> str:
    return "schema_" if name == "schema" else name


class _HasOptions(Protocol):
    @property
    def options(self) -> WriterOptions: ...


class OptionView(Generic[T]):
    """A read-only attribute showing one of an owner's checked options: a writer's parts are
    sized from its options when it is made, so assigning one later would leave them out of
    step."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> OptionView[T]: ...
    @overload
    def __get__(self, obj: _HasOptions, objtype: type | None = None) -> T: ...
    def __get__(self, obj: _HasOptions | None, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.options, _field(self._name))

    def __set__(self, obj: _HasOptions, value: T) -> None:
        raise AttributeError(f"{self._name} is read-only: make a new writer to change it")


#: The names `AuditWriter(...)` and `configure(...)` accept as options.
OPTION_NAMES: Final = tuple(
    "schema" if name == "schema_" else name for name in WriterOptions.model_fields
)
#: Options that can come from `AUDITQ_<NAME>` (all but the callables).
OPTIONS: Final = tuple(
    name for name in OPTION_NAMES if name not in ("on_dead_letter", "before_write")
)


def _one_line(exc: ValidationError, describe: Callable[[str, Any], str]) -> ConfigError:
    """The first problem of a validation error, as one line naming the option."""
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else "?"
    field = field.removeprefix("AUDITQ_").lower()
    name = "schema" if field == "schema_" else field
    return ConfigError(f"{describe(name, error.get('input'))}: expected {EXPECTED.get(name, '?')}")


def check_options(given: Mapping[str, Any], *, source: str = "") -> WriterOptions:
    """`WriterOptions` from keyword values; `ConfigError` naming the first bad one (and
    `source` when given), `TypeError` listing the accepted names for an unknown one."""
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(unknown_option_message(unknown[0]))
    where = f" (from {source})" if source else ""
    try:
        return WriterOptions.model_validate(dict(given), strict=True, by_alias=True)
    except ValidationError as exc:
        raise _one_line(exc, lambda name, value: f"{name}={value!r}{where} is not valid") from None


def unknown_option_message(name: str) -> str:
    accepted = ("dsn", "pool", *OPTION_NAMES)
    close = difflib.get_close_matches(name, accepted, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown option {name!r}{hint} Accepted: {', '.join(accepted)}"


def default_origin() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return f"{program or 'python'}@{socket.gethostname()}"[:256]


# -- the environment ----------------------------------------------------------------------------

_FROM_ENV: Final = SettingsConfigDict(
    env_prefix="AUDITQ_",
    env_ignore_empty=True,
    extra="ignore",
    frozen=True,
    populate_by_name=True,
)


class _WriterEnv(BaseSettings):
    """The writer options `AUDITQ_<NAME>` variables (or a `.env` file) set, parsed as text."""

    model_config = _FROM_ENV

    table: _Identifier | None = None
    schema_: _Identifier | None = Field(None, validation_alias="AUDITQ_SCHEMA")
    name: _Name | None = None
    origin: Annotated[_Name, Field(max_length=256)] | None = None
    max_queue: _Count | None = None
    batch_size: _Count | None = None
    wake_rows: _Count | None = None
    flush_interval: _Seconds | None = None
    shutdown_timeout: _SecondsOrZero | None = None
    write_timeout: _Seconds | None = None
    connect_timeout: _Seconds | None = None
    retry_backoff_max: _Seconds | None = None
    warn_interval: _SecondsOrZero | None = None
    strict: bool | None = None
    spool_dir: Annotated[str, Field(min_length=1)] | None = None
    spool_after: _SecondsOrZero | None = None
    spool_max_bytes: _Count | None = None
    spool_fsync: FsyncPolicy | None = None
    chain: bool | None = None

    @field_validator("spool_fsync", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


def _networks(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    items = tuple(item.strip() for item in value.split(",") if item.strip())
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR") from None
    return items


class _MiddlewareEnv(BaseSettings):
    """The web middleware's options (`auditq.middleware`), from `AUDITQ_<NAME>` too."""

    model_config = _FROM_ENV

    request_id_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] | None = None
    trusted_proxies: Annotated[tuple[str, ...], BeforeValidator(_networks)] | None = None
    log_requests: bool | None = None


EXPECTED.update(
    request_id_header="an HTTP header name such as X-Request-ID",
    trusted_proxies="IP addresses or CIDRs, comma-separated (not an IP address or CIDR)",
    log_requests="true or false (1/0, yes/no, on/off)",
)


def environment(env_file: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The process environment, over the variables of `env_file` (a `.env` file) if given:
    a variable set in the process wins, as with pydantic-settings."""
    if env_file is None:
        return dict(os.environ)
    from dotenv import dotenv_values  # pydantic-settings' own dependency

    if not os.path.isfile(env_file):
        raise ConfigError(f"env_file={os.fspath(env_file)!r} is not a file")
    from_file = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
    return {**from_file, **os.environ}


def _from_env(model: type[BaseSettings], environ: Mapping[str, str] | None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    try:
        if environ is None:
            settings = model()
        else:  # an explicit mapping (a .env file over the environment, tests, the CLI)
            names = {f"AUDITQ_{name.upper()}": name for name in model.model_fields}
            names["AUDITQ_SCHEMA"] = "schema_"
            given = {
                field: value
                for variable, field in names.items()
                if (value := env.get(variable)) is not None and value.strip()
            }
            settings = model.model_validate(given)
    except ValidationError as exc:

        def describe(name: str, value: Any) -> str:
            variable = f"AUDITQ_{name.upper()}"
            raw = env.get(variable, value)
            return f"{variable}={raw!r} is not a valid {name}"

        raise _one_line(exc, describe) from None
    found = settings.model_dump(exclude_none=True)
    if "schema_" in found:
        found["schema"] = found.pop("schema_")
    return found


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Writer options set in the environment (or `environ`), parsed and checked; raises
    `ConfigError` naming a bad variable."""
    return _from_env(_WriterEnv, environ)


def middleware_options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Middleware options set in the environment, parsed; raises `ConfigError` naming a bad
    variable."""
    return _from_env(_MiddlewareEnv, environ)


def dsn_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The DSN the environment gives: `AUDITQ_DSN`, else `DATABASE_URL`."""
    env = os.environ if environ is None else environ
    return env.get("AUDITQ_DSN") or env.get("DATABASE_URL") or None
