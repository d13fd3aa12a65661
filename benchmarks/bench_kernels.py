"""Pooled-lookup kernels vs PyTorch embedding_bag and FBGEMM TBE (issue 3).

Same as ``recserve bench kernels``; run on the GPU machine from the repository root:

    PYTHONPATH=src python benchmarks/bench_kernels.py --mode full --out $OUT

See ``python benchmarks/bench_kernels.py --help`` and benchmarks/NOTES-kernels.md.
"""

from __future__ import annotations

import sys

from recserve.cli.bench_kernels import main

if __name__ == "__main__":
    sys.exit(main())
