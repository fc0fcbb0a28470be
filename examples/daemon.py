"""A long-running daemon that logs audit entries continuously and stops cleanly on SIGTERM
(or Ctrl-C), writing everything it accepted before it exits.

    AUDITQ_DSN=postgresql://app@db/app python examples/daemon.py [--interval 0.01]

On SIGTERM/SIGINT the loop stops, `auditq.shutdown()` drains the queue (bounded by
`AUDITQ_SHUTDOWN_TIMEOUT`, 10 s by default) and the final stats are printed as one JSON line.
The exit status is 0 when every accepted entry was written, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from types import FrameType

import auditq


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between entries")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # only set a flag here: the main loop does the shutdown

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    writer = auditq.configure()  # AUDITQ_DSN (else DATABASE_URL) and AUDITQ_* options
    print(json.dumps({"event": "started", "writer": writer.name}), flush=True)
    n = 0
    with auditq.context(actor_id="daemon", actor_type="service", tenant_id="system"):
        while not stop.is_set():
            n += 1
            auditq.log("daemon.tick", resource_type="tick", resource_id=str(n))
            stop.wait(args.interval)

    clean = auditq.shutdown()
    stats = writer.stats()
    print(
        json.dumps(
            {
                "event": "stopped",
                "clean": clean,
                "accepted": stats.accepted,
                "written": stats.written,
                "dead_lettered": stats.dead_lettered,
                "dropped_overflow": stats.dropped_overflow,
            }
        ),
        flush=True,
    )
    return 0 if clean and stats.written == stats.accepted else 1


if __name__ == "__main__":
    sys.exit(main())
