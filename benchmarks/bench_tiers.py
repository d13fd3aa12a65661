"""Host tables read in place, dedup, cache+host and the CPU-mediated peer (issue 4).

Same as ``recserve bench tiers``; run on the GPU machine from the repository root:

    PYTHONPATH=src python benchmarks/bench_tiers.py --out $OUT

A focused run of the 256-byte grid only (no row-size sweep, no tuning), both cache policies:

    PYTHONPATH=src python benchmarks/bench_tiers.py --out $OUT/tiers --no-tune \
        --sweep-row-bytes "" --policies lfu,lru --refresh-every 4

See ``python benchmarks/bench_tiers.py --help``. On a CPU (interpreted kernels, tiny sizes):
``python benchmarks/bench_tiers.py --device cpu --host-gib 0.001 --tables 2 --batches 4
--poolings 1,3 --sweep-row-bytes 512 --out /tmp/tiers``.
"""

from __future__ import annotations

import sys

from recserve.cli.bench_tiers import main

if __name__ == "__main__":
    sys.exit(main())
