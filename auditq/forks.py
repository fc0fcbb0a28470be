"""Fork safety: the whole policy in one place.

After `os.fork()` the child must start with an empty queue, its own connection and its own
writer thread (made lazily), and must never write, close or replay what belongs to the
parent. Three rules make that hold:

1. **Noticing a fork.** Python's at-fork hook runs `reset` of every registered owner in the
   child. uWSGI forks without running Python's hooks, so every public entry point also asks
   `ForkMark.forked()`: a fork count bumped by a `pthread_atfork` handler of the C extension
   (`native.FORKS`, a memory read), or the pid without the extension. Whichever notices
   first resets; the other then finds nothing to do.
2. **What the child keeps of the parent.** Nothing it would act on: the queue, the counters,
   the thread, the locks and events are made anew; inherited connections are parked, never
   closed (`connection.py`: closing one would send a Terminate down the parent's socket);
   spool segments stay the parent's (`spool.py`); the id generator is reseeded (`ids.py`).
3. **Who resets.** Each owner registers a weak reference to its reset method once, here, so a
   registration never keeps a writer alive.

Locks are never held across a fork by auditq's own threads in a way the child could inherit
blocked: the child makes new ones instead of reusing them.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Final

from . import native

#: `FORKS[0]` changes in every forked child, whether or not Python's hooks ran.
FORKS: Final = native.FORKS

_getpid: Final = os.getpid


class ForkMark:
    """Which process some state belongs to; `forked()` tells a child it must reset."""

    __slots__ = ("_forks", "_pid")

    def __init__(self) -> None:
        self._pid = _getpid()
        self._forks = FORKS[0]

    def forked(self) -> bool:
        """True when called in a process forked after this mark was made (and not yet
        reset). Cheap when nothing forked: one read of the fork count."""
        forks = FORKS[0]
        if forks == self._forks:
            return False
        self._forks = forks
        return self._pid != _getpid()

    def here(self) -> bool:
        """True in the process that made this mark."""
        return self._pid == _getpid()


_owners: list[weakref.WeakMethod[Callable[[], None]]] = []
_owners_lock = threading.Lock()


def reset_in_child(method: Callable[[], None]) -> None:
    """Call `method` (a bound method: held weakly) in each forked child, from Python's
    at-fork hook."""
    with _owners_lock:
        _owners[:] = [ref for ref in _owners if ref() is not None]
        _owners.append(weakref.WeakMethod(method))


def _reset_all_in_child() -> None:
    global _owners_lock
    _owners_lock = threading.Lock()  # a parent thread may have held it at the fork
    for ref in list(_owners):
        method = ref()
        if method is not None:
            method()


os.register_at_fork(after_in_child=_reset_all_in_child)
