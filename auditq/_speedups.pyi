"""Types of the C extension: the row encoder (_speedups.c, used by binary.py), the
caller path of `AuditWriter.log()` (_caller.c, made by native.py) and the arena prefault
hook (_prefault.c, installed by auditq.prefault_memory())."""

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
