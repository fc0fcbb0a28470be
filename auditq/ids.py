"""UUIDv7 ids, made client-side so a retried or replayed row carries the same id.

Ids need uniqueness, not secrecy: a private generator seeded from the OS (and reseeded in
a forked child) costs a tenth of `os.urandom` per id and is immune to the application
calling `random.seed()`. The 48-bit millisecond prefix keeps inserts at the right-hand edge
of the primary-key index.
"""

from __future__ import annotations

import os
import random
import time
import uuid

_rng = random.Random()


#: `random_bits(n)`: n random bits from the private generator.
random_bits = _rng.getrandbits


def reseed() -> None:
    """Give this process its own id stream (after a fork, with or without fork hooks)."""
    _rng.seed(os.urandom(32))


os.register_at_fork(after_in_child=reseed)


def uuid7_int(unix_ns: int) -> int:
    """A UUIDv7 as an int: 48 bits of Unix milliseconds, version 7, variant, 74 random bits."""
    rand = _rng.getrandbits(74)
    ms = (unix_ns // 1_000_000) & 0xFFFF_FFFF_FFFF
    return (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))


def uuid7(unix_ns: int | None = None) -> uuid.UUID:
    """A UUIDv7 for `unix_ns` (default: now)."""
    return uuid.UUID(int=uuid7_int(time.time_ns() if unix_ns is None else unix_ns))
