"""The pooled-lookup kernel benchmark (issue 3): ceilings, peers, sweep, ablation, summary.

Entry points: ``recserve bench kernels`` (:mod:`recserve.cli.bench_kernels`) and
``benchmarks/bench_kernels.py``; the driver is :func:`recserve.kernels.bench.run.run`.
"""
