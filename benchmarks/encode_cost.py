"""Instructions per encoded row, repeatable on a noisy machine.

    valgrind --tool=callgrind python -m benchmarks.encode_cost      # one pass
    valgrind --tool=callgrind python -m benchmarks.encode_cost x    # two passes
The difference of the two totals, divided by 5,000, is the cost of `encode_row` per row.
"""

from __future__ import annotations

import sys

from auditq.binary import encode_row
from benchmarks.compare import typical_row

ROWS = [typical_row(n) for n in range(5000)]

for _ in range(2 if len(sys.argv) > 1 else 1):
    for row in ROWS:
        encode_row(row)
