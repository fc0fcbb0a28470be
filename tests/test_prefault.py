"""`prefault_memory`: new pymalloc arenas are populated in one call (see auditq/_prefault.c).

What can be checked without a stopwatch, each in a fresh interpreter (the hook is
process-wide and this test process may have it already): the call that takes a new arena
makes the whole arena resident at once (a hook that populated nothing, one page, or read-only
pages would add a few KiB); freed arenas are given back through the chained allocator; a
second install does not chain the hook to itself; a writer installs it at its first call only
when the option is on. The latency it buys is measured by the bench (`frozen` p99) and by
benchmarks/queue_growth.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from auditq import native

needs_c = pytest.mark.skipif(
    native.speedups is None, reason="C extension not in use (not built, or AUDITQ_NO_SPEEDUPS=1)"
)

_HELPERS = textwrap.dedent(
    """
    import json, sys
    from auditq import native

    def rss_kib():
        with open("/proc/self/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    return int(line.split()[1])
        raise AssertionError("no Rss line")

    def populated():
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
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _supported() -> bool:
    # The kernel may lack MADV_POPULATE_WRITE (Linux < 5.14): then nothing is installed.
    return bool(_child("print(json.dumps(native.prefault_arenas()))"))


@needs_c
def test_each_new_arena_becomes_resident_at_once() -> None:
    if not _supported():
        pytest.skip("this kernel cannot populate on request (MADV_POPULATE_WRITE)")
    jumps = _child(
        """
        assert native.prefault_arenas()
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
        assert native.prefault_arenas()
        assert native.prefault_arenas()  # would recurse forever if chained to itself
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


_WRITER = """
    from auditq import AuditWriter
    writer = AuditWriter("postgresql://auditq:secret@127.0.0.1:9/never",
                         prefault_memory=sys.argv[1] == "on", connect_timeout=1)
    before = populated()
    rows = [(i, f"value {i}") for i in range(150_000)]  # no writer thread yet
    constructed = populated() - before
    writer.log("login")  # starts the writer thread
    more = [(i, f"more {i}") for i in range(150_000)]
    started = populated() - before - constructed
    writer.close(timeout=0)
    print(json.dumps([constructed, started]))
"""


@needs_c
@pytest.mark.parametrize("option", ["on", "off"])
def test_the_writer_installs_it_at_its_first_call_only_when_asked(option: str) -> None:
    if not _supported():
        pytest.skip("this kernel cannot populate on request (MADV_POPULATE_WRITE)")
    constructed, started = _child(_WRITER, option)
    assert constructed == 0  # building a writer changes nothing process-wide
    if option == "on":
        assert started >= 5
    else:
        assert started == 0


def test_not_in_effect_without_the_extension_or_without_pymalloc() -> None:
    body = "print(json.dumps(native.prefault_arenas()))"
    assert _child(body, AUDITQ_NO_SPEEDUPS="1") is False
    assert _child(body, PYTHONMALLOC="malloc") is False
