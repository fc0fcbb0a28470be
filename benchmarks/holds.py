"""Who holds the GIL, and for how long (issue 16): a probe for the harness's frozen-server case
and for `benchmarks/gil_holds.py`.

A sampling thread sleeps 1 ms at a time and records how late it woke: the time it waited for
the GIL, that is the longest stretch some other thread held it. On a shared machine a late
wake-up may also be the scheduler's, so two more figures come with it:
- the writer thread's own CPU clock over each sleep: an estimate of the part of a wait that
  was the writer's, the wait capped by the CPU time it used meanwhile (it misses a hold
  while the writer was descheduled with the GIL, and counts CPU the writer spent without
  the GIL: the slowest `log()` is the callers' side of the same question);
- the same sampler in a process of its own, which shares no GIL: how late a 1 ms sleep ends
  on this machine anyway (other processes, the scheduler), the noise floor.
Garbage collections longer than 1 ms are recorded with their thread (`gc.callbacks`): a
collection is one C call that holds the GIL for all of its time, on whichever thread
allocated the object that set it off.
"""

from __future__ import annotations

import gc
import multiprocessing
import threading
import time
from array import array
from typing import Any

from .system import writer_thread

SAMPLE_SECONDS = 0.001
#: Collections shorter than this are not recorded.
LONG_COLLECTION_MS = 1.0


def sample(
    stop: Any,
    at: array[int],
    late: array[int],
    done: list[int],
    writer_cpu: array[int] | None = None,
    writer_name: str | None = None,
) -> None:
    """Sleep 1 ms at a time until `stop` is set (a threading or multiprocessing Event);
    record when each sleep began and how late it ended (ns), and, given a writer's name,
    the CPU time its thread used meanwhile (`writer_cpu`)."""
    clock = time.perf_counter_ns
    want = int(SAMPLE_SECONDS * 1e9)
    clock_id: int | None = None
    n = 0
    cpu0 = 0
    while not stop.is_set() and n < len(at):
        if writer_cpu is not None and clock_id is None and writer_name is not None:
            thread = writer_thread(writer_name)
            if thread is not None and thread.ident is not None:
                clock_id = time.pthread_getcpuclockid(thread.ident)
        if clock_id is not None:
            cpu0 = time.clock_gettime_ns(clock_id)
        t0 = clock()
        time.sleep(SAMPLE_SECONDS)
        t1 = clock()
        at[n] = t0
        late[n] = t1 - t0 - want
        if clock_id is not None and writer_cpu is not None:
            try:
                writer_cpu[n] = time.clock_gettime_ns(clock_id) - cpu0
            except OSError:  # the writer thread ended
                clock_id = None
        n += 1
    done[0] = n


class Collections:
    """Garbage collections longer than 1 ms, with the thread they ran on (a `gc.callbacks`
    entry)."""

    def __init__(self) -> None:
        self.long: list[tuple[float, int, str, int]] = []  # (ms, generation, thread, at)
        self._began: dict[int, int] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter_ns()
        ident = threading.get_ident()
        if phase == "start":
            self._began[ident] = now
            return
        took = (now - self._began.pop(ident, now)) / 1e6
        if took > LONG_COLLECTION_MS:
            name = threading.current_thread().name
            self.long.append((took, info["generation"], name, now))


def _control(stop: Any, conn: Any, seconds: float) -> None:
    """The sampler in a process of its own (no GIL shared): the machine's noise."""
    at = array("q", bytes(8 * int(seconds / SAMPLE_SECONDS)))
    late = array("q", bytes(8 * len(at)))
    done = [0]
    sample(stop, at, late, done)
    conn.send((at[: done[0]].tobytes(), late[: done[0]].tobytes()))


def window_max(at: array[int], values: array[int], count: int, lo: int, hi: int) -> float:
    """The largest of `values[:count]` whose time in `at` falls in [lo, hi), in ms."""
    best = 0
    for i in range(count):
        if lo <= at[i] < hi and values[i] > best:
            best = values[i]
    return best / 1e6


class HoldProbe:
    """The sampler, the writer's CPU clock, the other-process sampler and the collections,
    from `start()` to `stop()` (at most `seconds`); `figures()` then gives the longest of
    each per time window.

    Start it before the writer thread exists: the other-process sampler is forked, and a
    fork is safest while this process has a single thread.
    """

    def __init__(self, writer_name: str, seconds: float) -> None:
        self.writer_name = writer_name
        samples = int(seconds / SAMPLE_SECONDS)
        self.at = array("q", bytes(8 * samples))
        self.late = array("q", bytes(8 * samples))
        self.writer_cpu = array("q", bytes(8 * samples))
        self.sampled = [0]
        self.collections = Collections()
        self.control_at: array[int] = array("q")
        self.control_late: array[int] = array("q")
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=sample,
            args=(self._stop, self.at, self.late, self.sampled, self.writer_cpu, writer_name),
            name="gil-sampler",
        )
        context = multiprocessing.get_context("fork")
        self._control_stop = context.Event()
        self._receive, send = context.Pipe(duplex=False)
        self._control = context.Process(
            target=_control, args=(self._control_stop, send, seconds), daemon=True
        )

    def start(self) -> None:
        self._control.start()
        gc.callbacks.append(self.collections)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        gc.callbacks.remove(self.collections)
        self._control_stop.set()
        raw_at, raw_late = self._receive.recv()
        self.control_at.frombytes(raw_at)
        self.control_late.frombytes(raw_late)
        self._control.join()

    def figures(self, windows: dict[str, tuple[int, int]], origin: int) -> dict[str, Any]:
        """Per window (name -> [lo, hi) in perf_counter_ns): the sampler's longest wait
        (`wait_max_ms`), the part of it the writer can have held the GIL for
        (`writer_max_ms`), the other process's longest (`noise_max_ms`); then the longest
        collections and the top writer holds (ms, seconds after `origin`)."""
        count = self.sampled[0]
        held = array("q", (min(self.late[i], self.writer_cpu[i]) for i in range(count)))
        out: dict[str, Any] = {
            "sample_seconds": SAMPLE_SECONDS,
            "samples": count,
            "windows": {},
        }
        for name, (lo, hi) in windows.items():
            out["windows"][name] = {
                "wait_max_ms": window_max(self.at, self.late, count, lo, hi),
                "writer_max_ms": window_max(self.at, held, count, lo, hi),
                "noise_max_ms": window_max(
                    self.control_at, self.control_late, len(self.control_at), lo, hi
                ),
            }
        out["writer_max_ms"] = max(
            (w["writer_max_ms"] for w in out["windows"].values()), default=0.0
        )
        gcs = sorted(self.collections.long, reverse=True)
        out["gc_max_ms"] = gcs[0][0] if gcs else 0.0
        out["gc_long"] = [
            {
                "ms": round(ms, 2),
                "generation": gen,
                "thread": "writer" if name.startswith("auditq[") else name,
            }
            for ms, gen, name, _ in gcs[:3]
        ]
        holds = sorted(((held[i], self.at[i]) for i in range(count)), reverse=True)[:5]
        out["top_writer_holds"] = [
            {"ms": round(v / 1e6, 2), "at_s": round((t - origin) / 1e9, 3)} for v, t in holds
        ]
        return out
