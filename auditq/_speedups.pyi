"""Types of the C extension: the row encoder (_speedups.c, used by binary.py), the
caller path of `AuditWriter.log()` (_caller.c, made by native.py) and the arena prefault
hook (_prefault.c, installed by auditq.prefault_memory()), the hash chain (_chain.c) and the
COPY through psycopg's libpq (_pqcopy.c, used by pqcopy.py)."""

from collections.abc import Callable, Sequence
from typing import Any

Row = tuple[Any, ...]

#: The fork count (bytes of one native uint64, read-only), incremented in each forked child.
FORKS: memoryview

def configure(
    groups: dict[tuple[Any, ...], bytes],
    ips: dict[str, bytes],
    fallback: Callable[[Row, bytes], tuple[bytes, int]],
    urandom: Callable[[int], bytes],
    /,
) -> None: ...
def encode_chunk(
    rows: Sequence[Row],
    items: list[tuple[bytes, Row | None]],
    bad: list[tuple[Row, str]],
    origin: bytes = ...,
    /,
) -> bytes: ...
def encode_block(
    rows: Sequence[Row],
    kept: list[Row],
    bad: list[tuple[Row, str]],
    origin: bytes = ...,
    /,
) -> bytes: ...
def occurred_span(data: bytes, /) -> tuple[int, int] | None: ...
def prefault_arenas() -> bool: ...
def prefaulted_arenas() -> int: ...
def prefault_installed() -> bool: ...

class CallerPath:
    def __init__(
        self,
        log: Callable[..., bool],
        queue: object,
        wake: Callable[[], None],
        gate: object,
        refuse: Callable[[], bool],
        reject: Callable[[str, str], bool],
        start: Callable[[], None],
        dump_metadata: Callable[[Any], str],
        context: object,
        otel: object,
        max_queue: int,
        wake_every: int,
        /,
    ) -> None: ...
    def __call__(self, action: str, /, **fields: Any) -> bool: ...

# _pqcopy.c: a COPY through psycopg's libpq with the GIL released (used by pqcopy.py).
def pq_load(prefix: str, /) -> str | None: ...
def pq_copy(
    pgconn_ptr: int,
    query: bytes | None,
    pieces: tuple[bytes, ...],
    end: bool | bytes,
    /,
) -> tuple[bool, bool, tuple[dict[int, bytes] | None, bytes, bool] | None]: ...
def pq_put(
    pgconn_ptr: int, piece: bytes, drain: bool, /
) -> tuple[bool, tuple[dict[int, bytes] | None, bytes, bool] | None]: ...
