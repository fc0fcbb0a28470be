"""`prefault_memory`: new pymalloc arenas are populated in one call (see auditq/_prefault.c).

What can be checked without a stopwatch: the hook is installed by a writer's first call only
when the option is on, it populates the arenas a growing heap takes, installing it twice does
not chain it to itself, and the memory it hands out works (is written, read and given back).
The latency it buys is measured by the bench (`frozen` p99) and benchmarks/queue_growth.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from auditq import native

needs_c = pytest.mark.skipif(
    native.speedups is None, reason="C extension not in use (not built, or AUDITQ_NO_SPEEDUPS=1)"
)


def _grow_heap() -> list[tuple[int, str]]:
    # ~20 MiB of small objects: more than any free arena pymalloc keeps around.
    return [(i, f"value {i}") for i in range(150_000)]


@needs_c
def test_new_arenas_are_populated_and_usable() -> None:
    assert native.speedups is not None
    assert native.prefault_arenas() is True
    assert native.prefault_arenas() is True  # a second install must not chain to itself
    before = native.speedups.prefaulted_arenas()
    rows = _grow_heap()
    after = native.speedups.prefaulted_arenas()
    assert after - before >= 5, (before, after)
    assert rows[-1] == (149_999, "value 149999")
    assert sum(i for i, _ in rows) == 149_999 * 150_000 // 2
    del rows
    again = _grow_heap()  # arenas given back and taken again through the hook
    assert len(again) == 150_000


_CHILD = textwrap.dedent(
    """
    import sys
    from auditq import AuditWriter, native
    writer = AuditWriter("postgresql://auditq:secret@127.0.0.1:9/never",
                         prefault_memory=sys.argv[1] == "on", connect_timeout=1)
    before = native.speedups.prefaulted_arenas()
    rows = [(i, f"value {i}") for i in range(150_000)]  # no writer thread yet
    constructed = native.speedups.prefaulted_arenas() - before
    writer.log("login")  # starts the writer thread
    more = [(i, f"more {i}") for i in range(150_000)]
    started = native.speedups.prefaulted_arenas() - before - constructed
    writer.close(timeout=0)
    print(constructed, started)
    """
)


@needs_c
@pytest.mark.parametrize("option", ["on", "off"])
def test_the_writer_installs_it_at_its_first_call_only_when_asked(option: str) -> None:
    # A fresh interpreter: the hook is process-wide and this test process may have it already.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITQ_")}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, option],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    constructed, started = map(int, done.stdout.split())
    assert constructed == 0  # building a writer changes nothing process-wide
    if option == "on":
        assert started >= 5
    else:
        assert started == 0


def test_without_the_extension_it_reports_not_in_effect() -> None:
    env = dict(os.environ, AUDITQ_NO_SPEEDUPS="1")
    done = subprocess.run(
        [sys.executable, "-c", "from auditq import native; print(native.prefault_arenas())"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    assert done.stdout.strip() == "False"
