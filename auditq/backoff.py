"""Exponential backoff with full jitter, capped: one small class, as psycopg_pool does it."""

from __future__ import annotations

import random


class Backoff:
    """Delays of uniform(0, min(cap, base * 2**attempt)): retries from many processes spread
    out instead of reconnecting in lock-step after a server restart."""

    __slots__ = ("_attempt", "base", "cap")

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base = base
        self.cap = cap
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self._attempt, 30)))
        self._attempt += 1
        return random.uniform(0, ceiling)

    def reset(self) -> None:
        self._attempt = 0

    @property
    def attempts(self) -> int:
        return self._attempt
