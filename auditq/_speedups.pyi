"""Types of the C row encoder (auditq/_speedups.c); binary.py is its only user."""

from collections.abc import Callable, Sequence
from typing import Any

Row = tuple[Any, ...]

#: The fork count (bytes of one native uint64, read-only), incremented in each forked child.
FORKS: memoryview

def configure(
    groups: dict[tuple[Any, ...], bytes],
    ips: dict[str, bytes],
    fallback: Callable[[Row], tuple[bytes, int]],
    urandom: Callable[[int], bytes],
    /,
) -> None: ...
def encode_chunk(
    rows: Sequence[Row],
    items: list[tuple[bytes, Row | None]],
    bad: list[tuple[Row, str]],
    /,
) -> bytes: ...
