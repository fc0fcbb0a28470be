"""Instructions per encoded row, repeatable on a noisy machine.

    valgrind --tool=callgrind python benchmarks/encode_cost.py      # one pass
    valgrind --tool=callgrind python benchmarks/encode_cost.py x    # two passes
The difference of the two totals, divided by 5,000, is the cost of `encode_row` per row.
"""

from __future__ import annotations

import sys
import time

from auditq.bench.run import _USER_AGENT, metadata_for
from auditq.binary import encode_row
from auditq.entry import dump_metadata

ROWS = [
    (
        None,
        time.time_ns(),
        "document.read",
        "tenant-42",
        "user-1234",
        "user",
        "document",
        "doc-9",
        "success",
        "203.0.113.7",
        _USER_AGENT,
        f"req-{n}",
        dump_metadata(metadata_for(n)),
    )
    for n in range(5000)
]

for _ in range(2 if len(sys.argv) > 1 else 1):
    for row in ROWS:
        encode_row(row)
