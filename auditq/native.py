"""The C extension (`auditq._speedups`), if it was built and is not switched off, and the
fork counter it provides, with a pure-Python stand-in.

One place decides whether C is in use, so `AUDITQ_NO_SPEEDUPS=1` turns off all of it at once
(to compare, or to rule it out) and the pure-Python paths stay testable on a machine that
did build it.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType


def gil_disabled() -> bool:
    """True on a free-threaded build running with the GIL off (3.13t and later)."""
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return is_enabled is not None and not is_enabled()


def _load() -> ModuleType | None:
    if os.environ.get("AUDITQ_NO_SPEEDUPS", "") not in ("", "0"):
        return None
    if gil_disabled():
        # The extension relies on the GIL (the caller path appends to the queue, the encoder's
        # caches and the fork counter are unguarded), and importing a module that does not
        # declare itself free-threading safe would turn the GIL back on for the whole
        # process: the pure-Python path serves instead. Checked before the import for that.
        return None
    try:
        # By name: a C module, which the import-layer checker cannot see as a module file.
        return importlib.import_module("auditq._speedups")
    except ImportError:  # not built: no C compiler at install
        return None


#: `auditq._speedups`, or None when auditq runs in pure Python.
speedups = _load()


class _PidProbe:
    """`FORKS` without the extension: item 0 is the pid, which changes in a child however it
    was forked (a system call per read)."""

    def __getitem__(self, index: int) -> int:
        return os.getpid()


#: `FORKS[0]` changes in a forked child whether or not Python's fork hooks ran (uWSGI forks
#: without them). With the extension it is a counter its `pthread_atfork` child handler
#: bumps (a memory read); without it, the pid (a system call).
FORKS: Sequence[int] | _PidProbe = _PidProbe() if speedups is None else speedups.FORKS.cast("Q")
