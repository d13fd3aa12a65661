"""Pooled-lookup kernels vs PyTorch embedding_bag and FBGEMM TBE (issue 3).

Same as ``recserve bench kernels``; run on the GPU machine from the repository root:

    PYTHONPATH=src python benchmarks/bench_kernels.py --mode full --out $OUT

Focused runs take some cases of the plan and tune chosen buckets again, e.g. the Zipf cases of
one table set with their skewed buckets re-tuned:

    PYTHONPATH=src python benchmarks/bench_kernels.py --out $OUT --tune-candidates 0 \\
        --no-ablation --cases '4x1048kx128/fp32/*/L80/zipf:*' --retune '*-h?'

``--cases`` (shell patterns on case names, ``tables/dtype/B<batch>/L<pooling>/<ids>``) and
``--retune`` (shell patterns on bucket keys) may be repeated. A focused run also times each
case with the config it started from (``recserve_before``), checks the configs it tuned
against the reference, prints a table of its cases and writes ``kernels-retuned.json`` (only
the buckets tuned in the run, in the format of ``src/recserve/kernels/configs/*.json``).

Same options as ``recserve bench kernels --help``; see benchmarks/NOTES-kernels.md.
"""

from __future__ import annotations

import sys

from recserve.cli.bench_kernels import main

if __name__ == "__main__":
    sys.exit(main())
