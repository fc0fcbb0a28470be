"""`prefault_memory()`: an application's opt-in to taking interpreter memory in bulk.

Off unless called. It acts on the whole process (every thread, every library, for the rest of
the process's life), so auditq never does it unasked: a library that records audit events must
not change its host's memory behaviour. Call it once at start-up, the way uvloop is installed,
in each process that wants it (a forked worker inherits it).
"""

from __future__ import annotations

import os

from . import native


def prefault_memory() -> bool:
    """Have the interpreter make each new 1 MiB pymalloc arena resident in one
    `madvise(MADV_POPULATE_WRITE)` call, instead of a page fault per 4 KiB page on first touch.
    Returns True if in effect (the C extension in use, Linux 5.14 or later, pymalloc not
    replaced by `PYTHONMALLOC=malloc`); False, and nothing changed, otherwise.

    Why one would: while the database is unreachable the writer's queue only grows, into fresh
    memory, so every few `log()` calls touch a page the process never used, and on a virtual
    machine each such page fault costs several microseconds; that sets `log()`'s p99 while the
    server is stopped (`benchmarks/queue_growth.py` measures it; benchmarks/README.md has the
    figures both ways). Populated in one call, the cost moves to the one call in thousands that
    takes a new arena.

    What it costs: the hook is process-wide, installed once and never removed, and chains to
    the allocator it found, so memory is still mapped and unmapped as before; only when pages
    are faulted in changes. Whichever thread takes a new arena pays for all of it at once, and
    an arena that is never filled is resident in full. Calling it again does nothing more.
    """
    if native.speedups is None or os.environ.get("PYTHONMALLOC", "").startswith("malloc"):
        return False  # with PYTHONMALLOC=malloc, pymalloc's arenas are not used at all
    return bool(native.speedups.prefault_arenas())
