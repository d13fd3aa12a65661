"""Compile many kernel variants in parallel processes before timing them.

A sweep needs dozens of specialisations (dtype x tile width x config); compiling them one by
one in the timing process costs about a second each of device-machine time. Worker processes
launch each variant once on tiny inputs of the same specialisation (same dtypes, same 16-byte
divisibility of integer arguments), which fills Triton's on-disk cache; the timing process then
only loads the binaries.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import time
from dataclasses import dataclass
from typing import Any

PROBE_BATCH = 16
"""Tiny batch with the same divisibility (by 16) as every benchmark batch."""


@dataclass(frozen=True)
class PooledJob:
    dtype: str
    dims: tuple[int, ...]
    config: tuple[tuple[str, Any], ...]
    weighted: bool = False
    reordered: bool = False
    remap: bool = True
    batch: int = PROBE_BATCH
    out_fp16: bool = False


@dataclass(frozen=True)
class CeilingJob:
    stride: int
    rows: int
    warps: int
    hashed: bool
    per_prog: int = 512
    gather: bool = False


def _run_job(job: PooledJob | CeilingJob) -> str:
    import torch

    from recserve.kernels.ceiling import random_rows
    from recserve.kernels.layout import plan_tables
    from recserve.kernels.pooled import PooledConfig, pooled_lookup

    dev = torch.device("cuda")
    if isinstance(job, CeilingJob):
        table = torch.rand(1024, job.stride, device=dev)
        ids = None if job.hashed else torch.randint(0, 1024, (512,), device=dev)
        random_rows(
            table, job.stride, ids, 512, per_prog=job.per_prog, rows=job.rows,
            num_warps=job.warps, gather=job.gather,
        )  # fmt: skip
        return "ok"
    num = len(job.dims)
    cols = [0]
    for d in job.dims:
        cols.append(cols[-1] + d)
    packed = plan_tables(
        list(job.dims),
        [64] * num,
        job.dtype,
        cols=cols[:-1],
        features=list(range(num)),
        poolings=["sum"] * num,
        n_hot=[8] * num if job.reordered else None,
        device=dev,
    )
    b = job.batch
    values = torch.randint(0, 64, (num * b * 2,), device=dev)
    offsets = torch.arange(0, num * b * 2 + 1, 2, device=dev)
    out = torch.empty(
        b, cols[-1], device=dev, dtype=torch.float16 if job.out_fp16 else torch.float32
    )
    psw = torch.rand(values.numel(), device=dev) if job.weighted else None
    config = PooledConfig(**dict(job.config))
    pooled_lookup(packed, values, offsets, b, out, config, psw, remap=job.remap and job.reordered)
    torch.cuda.synchronize()
    return "ok"


class Compiler:
    """A pool of compile processes kept for the whole run (each keeps its CUDA context), so
    that variants known only mid-run (the levers on top of a tuned tile) compile in parallel.
    """

    def __init__(self, workers: int = 8) -> None:
        self.workers = workers
        self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        self.done: set[PooledJob | CeilingJob] = set()

    def compile(
        self, jobs: list[PooledJob | CeilingJob], timeout_s: float = 240.0
    ) -> dict[str, Any]:
        """Compile the jobs not compiled yet; returns counts, failures and seconds. Jobs not
        done after ``timeout_s`` are left to compile when first used."""
        start = time.perf_counter()
        todo = [j for j in dict.fromkeys(jobs) if j not in self.done]
        failures: list[str] = []
        futures = {self.pool.submit(_run_job, job): job for job in todo}
        try:
            for fut in cf.as_completed(futures, timeout=timeout_s):
                try:
                    fut.result()
                    self.done.add(futures[fut])
                except Exception as exc:  # a failed compile is retried, serially, when timed
                    failures.append(f"{futures[fut]}: {type(exc).__name__}: {exc}"[:300])
        except cf.TimeoutError:
            for fut in futures:
                fut.cancel()
        abandoned = sum(1 for f in futures if not f.done())
        return {
            "jobs": len(todo),
            "failures": failures,
            "abandoned": abandoned,
            "seconds": time.perf_counter() - start,
        }

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
