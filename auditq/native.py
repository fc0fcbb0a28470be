"""The C extension (`auditq._speedups`), if it was built and is not switched off, and the
fork counter it provides, with a pure-Python stand-in.

One place decides whether C is in use, so `AUDITQ_NO_SPEEDUPS=1` turns off all of it at once
(to compare, or to rule it out) and the pure-Python paths stay testable on a machine that
did build it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from types import ModuleType


def _load() -> ModuleType | None:
    if os.environ.get("AUDITQ_NO_SPEEDUPS", "") not in ("", "0"):
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
    was forked (a system call per read, ~190 ns)."""

    def __getitem__(self, index: int) -> int:
        return os.getpid()


#: `FORKS[0]` changes in a forked child whether or not Python's fork hooks ran (uWSGI forks
#: without them). With the extension it is a counter its `pthread_atfork` child handler
#: bumps, read in ~22 ns; without it, the pid.
FORKS: Sequence[int] | _PidProbe = _PidProbe() if speedups is None else speedups.FORKS.cast("Q")


def prefault_arenas() -> bool:
    """Have the interpreter take each new 1 MiB pymalloc arena from the OS in one
    `madvise(MADV_POPULATE_WRITE)` call, instead of a page fault per 4 KiB page on first touch.
    True if in effect (C extension built, Linux 5.14+).

    Why: a queue that grows while the server is stopped takes fresh memory every ~15 calls,
    and a page fault costs ~5 µs on a virtual machine: that alone put `log()`'s p99 above
    5 µs (`benchmarks/queue_growth.py`). Populated in one call, a page costs ~1.4 µs and the
    call that takes a new arena pays ~0.35 ms, about once per 3,500 entries. The hook is
    process-wide, installed once and never removed, and chains to the allocator it replaced;
    opt out with `AuditWriter(prefault_memory=False)` (`AUDITQ_PREFAULT_MEMORY=0`).
    """
    if speedups is None or os.environ.get("PYTHONMALLOC", "").startswith("malloc"):
        return False  # with PYTHONMALLOC=malloc, pymalloc's arenas are not used at all
    return bool(speedups.prefault_arenas())
