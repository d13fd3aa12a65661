"""Benchmark implementations shared by ``recserve bench`` and the scripts under benchmarks/."""
