"""`auditq.prefault_memory()`: new pymalloc arenas populated in one call (auditq/_prefault.c),
only when the application asks; and the C extension kept out of a process without a GIL.

What can be checked without a stopwatch, each in a fresh interpreter (the hook is
process-wide and never removed, so this test process must not install it): a process that
uses auditq without asking keeps the interpreter's own arena allocator; once asked, the call
that takes a new arena makes the whole arena resident at once (a hook that populated nothing,
one page, or read-only pages would add a few KiB); freed arenas are given back through the
chained allocator; installing again is harmless, even under a hook another library chained on
top. The latency it buys is measured by the harness (`frozen` p99 both ways) and by
benchmarks/queue_growth.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Any

import pytest

from auditq import native

from .conftest import Table

needs_c = pytest.mark.skipif(
    native.speedups is None, reason="C extension not in use (not built, or AUDITQ_NO_SPEEDUPS=1)"
)

_HELPERS = textwrap.dedent(
    """
    import ctypes, json, sys

    class ArenaAllocator(ctypes.Structure):
        _fields_ = [("ctx", ctypes.c_void_p), ("alloc", ctypes.c_void_p),
                    ("free", ctypes.c_void_p)]

    def arena_allocator():
        found = ArenaAllocator()
        ctypes.pythonapi.PyObject_GetArenaAllocator(ctypes.byref(found))
        return [found.ctx, found.alloc, found.free]

    def rss_kib():
        with open("/proc/self/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    return int(line.split()[1])
        raise AssertionError("no Rss line")

    def populated():
        from auditq import native
        return native.speedups.prefaulted_arenas()
    """
)


def _child(body: str, *args: str, **env: str) -> Any:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUDITQ_")}
    environ.update(env)
    done = subprocess.run(
        [sys.executable, "-c", _HELPERS + textwrap.dedent(body), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    return json.loads(done.stdout)


def _supported() -> bool:
    # The kernel may lack MADV_POPULATE_WRITE (Linux < 5.14): then nothing is installed.
    return bool(_child("import auditq; print(json.dumps(auditq.prefault_memory()))"))


def test_a_process_that_uses_auditq_keeps_the_default_allocator(table: Table) -> None:
    """Import, a writer, calls written to the table: the arena allocator is the one the
    interpreter started with (read through the C API before auditq was imported)."""
    before, after, installed, written = _child(
        """
        before = arena_allocator()
        import auditq
        from auditq import native
        writer = auditq.AuditWriter(sys.argv[1], schema=sys.argv[2], table=sys.argv[3])
        for i in range(20_000):
            writer.log("login", actor_id=f"user-{i}", metadata={"seq": i})
        assert writer.flush(timeout=60)
        rows = [(i, f"value {i}") for i in range(150_000)]  # new arenas, taken as usual
        writer.close(timeout=10)
        installed = native.speedups is not None and native.speedups.prefault_installed()
        print(json.dumps([before, arena_allocator(), installed, writer.stats().written]))
        """,
        table.dsn,
        table.schema,
        table.name,
    )
    assert written == table.count() == 20_000
    assert after == before
    assert installed is False


@needs_c
def test_opting_in_changes_the_allocator_and_says_so() -> None:
    if not _supported():
        pytest.skip("this kernel cannot populate on request (MADV_POPULATE_WRITE)")
    before, installed_before, in_effect, after, installed = _child(
        """
        import auditq
        from auditq import native
        before, installed_before = arena_allocator(), native.speedups.prefault_installed()
        in_effect = auditq.prefault_memory()
        print(json.dumps([before, installed_before, in_effect, arena_allocator(),
                          native.speedups.prefault_installed()]))
        """
    )
    assert installed_before is False and in_effect is True and installed is True
    assert after != before


@needs_c
def test_each_new_arena_becomes_resident_at_once() -> None:
    if not _supported():
        pytest.skip("this kernel cannot populate on request (MADV_POPULATE_WRITE)")
    jumps = _child(
        """
        import auditq
        assert auditq.prefault_memory()
        keep, jumps = [], []
        rss, count = rss_kib(), populated()
        while len(jumps) < 8:
            keep.append([(i, f"v{i}") for i in range(50)])  # ~8 KiB of small objects
            if populated() != count:
                jumps.append(rss_kib() - rss)
                count = populated()
            rss = rss_kib()
        print(json.dumps(jumps))
        """
    )
    # An arena is 1 MiB on 64-bit CPython 3.10+ (256 KiB on builds without the radix tree).
    # Most calls that take an arena make it resident at once; one may show no jump when the
    # interpreter gave back another arena between the two readings. Without the populate
    # (or with one page, or read-only pages) every jump is a few KiB.
    assert sum(jump >= 200 for jump in jumps) >= 6, jumps


@needs_c
def test_freed_arenas_are_given_back_and_a_second_install_is_harmless() -> None:
    if not _supported():
        pytest.skip("this kernel cannot populate on request (MADV_POPULATE_WRITE)")
    grown, freed, again, twice = _child(
        """
        import auditq
        assert auditq.prefault_memory()
        assert auditq.prefault_memory()  # would recurse forever if chained to itself
        rows = [(i, f"value {i}") for i in range(150_000)]
        grown = rss_kib()
        assert rows[-1] == (149_999, "value 149999")
        del rows
        freed = rss_kib()
        again = [(i, f"again {i}") for i in range(150_000)]
        print(json.dumps([grown, freed, len(again), populated()]))
        """
    )
    assert grown - freed >= 10_000  # KiB: ~20 MiB of arenas unmapped by the chained free
    assert again == 150_000
    assert twice >= 10  # both heaps were taken through the hook


#: Another library's arena hook: it chains to whatever it found, as ours does.
_OTHER_HOOK = """
#include <Python.h>

static PyObjectArenaAllocator below;
static unsigned long long calls;

static void *other_alloc(void *ctx, size_t size) {
    (void)ctx;
    calls++;
    return below.alloc(below.ctx, size);
}

static void other_free(void *ctx, void *arena, size_t size) {
    (void)ctx;
    below.free(below.ctx, arena, size);
}

void other_chain(void) {
    PyObject_GetArenaAllocator(&below);
    PyObjectArenaAllocator mine = {NULL, other_alloc, other_free};
    PyObject_SetArenaAllocator(&mine);
}

unsigned long long other_calls(void) { return calls; }
"""


def _build_other_hook(where: Path) -> Path:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) to build another library's arena hook")
    source, library = where / "other_hook.c", where / "other_hook.so"
    source.write_text(_OTHER_HOOK)
    include = sysconfig.get_paths()["include"]
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", f"-I{include}", str(source), "-o", str(library)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return library


@needs_c
def test_installing_again_under_another_librarys_hook_does_not_recurse(tmp_path: Path) -> None:
    """auditq's hook, another library's on top of it, then auditq's install once more: the
    second install must not put auditq's hook above the other one (each would call the other
    forever: a crash on the first new arena)."""
    if not _supported():
        pytest.skip("this kernel cannot populate on request (MADV_POPULATE_WRITE)")
    library = _build_other_hook(tmp_path)
    again, still_on_top, rows, other_calls, ours = _child(
        """
        import auditq
        assert auditq.prefault_memory()
        other = ctypes.PyDLL(sys.argv[1])
        other.other_calls.restype = ctypes.c_ulonglong
        other.other_chain()
        on_top = arena_allocator()
        again = auditq.prefault_memory()
        still_on_top = arena_allocator() == on_top
        before = populated()
        rows = [(i, f"value {i}") for i in range(150_000)]  # ~20 new arenas through both
        print(json.dumps([again, still_on_top, len(rows), other.other_calls(),
                          populated() - before]))
        """,
        str(library),
    )
    assert again is True and still_on_top is True
    assert rows == 150_000
    assert other_calls >= 10 and ours >= 10  # both hooks saw the new arenas, once each


def test_not_in_effect_without_the_extension_or_without_pymalloc() -> None:
    body = "import auditq; print(json.dumps(auditq.prefault_memory()))"
    assert _child(body, AUDITQ_NO_SPEEDUPS="1") is False
    assert _child(body, PYTHONMALLOC="malloc") is False


def test_no_extension_where_the_gil_is_off(table: Table) -> None:
    """A free-threaded build with the GIL off (told here by `sys._is_gil_enabled`, which such a
    build has): the extension is not even imported, and the pure-Python path writes."""
    loaded, accelerated, in_effect, written = _child(
        """
        sys._is_gil_enabled = lambda: False
        import auditq
        from auditq import binary, native
        loaded = "auditq._speedups" in sys.modules or native.speedups is not None
        writer = auditq.AuditWriter(sys.argv[1], schema=sys.argv[2], table=sys.argv[3])
        for i in range(100):
            assert writer.log("login", actor_id=f"user-{i}")
        assert writer.flush(timeout=60)
        writer.close(timeout=10)
        print(json.dumps([loaded, binary.ACCELERATED, auditq.prefault_memory(),
                          writer.stats().written]))
        """,
        table.dsn,
        table.schema,
        table.name,
    )
    assert loaded is False and accelerated is False and in_effect is False
    assert written == table.count() == 100
