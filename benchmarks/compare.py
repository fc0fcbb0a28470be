#!/usr/bin/env python
"""Run the comparison harness from a checkout: the same as `auditq bench --compare [options]`.

    python benchmarks/compare.py --json results.json --chart results.png
    python benchmarks/compare.py --dsn postgresql://user@host/db --rounds 5

See benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from auditq.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--compare", *sys.argv[1:]]))
