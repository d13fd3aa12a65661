"""recserve end to end vs PyTorch eager for the eight models (see recserve.bench.e2e).

python benchmarks/bench_e2e.py [--models ...] [--batches 64 256 1024 4096] [--out benchmarks/results]
"""

from __future__ import annotations

import sys

from recserve.cli.bench_e2e import main

if __name__ == "__main__":
    sys.exit(main())
