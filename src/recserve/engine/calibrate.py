"""Service times of a running engine, for the simulator that guides the tuner.

Each point is a closed-loop burst of identical queries: enough to keep every executor busy, so
contention (memory bandwidth shared by all CPU workers, copies beside GPU compute) is in the
numbers. Time per unit of work is read from the steady middle of the burst's completions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recserve.engine.config import SchedConfig
from recserve.engine.engine import RecEngine
from recserve.engine.simulate import PiecewiseLinear, ServiceModel
from recserve.loadgen.synthetic import QueryFactory


@dataclass
class Calibration:
    service: ServiceModel
    queries: int
    seconds: float


def burst_seconds(
    engine: RecEngine, factory: QueryFactory, items: int, count: int, parallel: int
) -> float:
    """Seconds one of ``parallel`` executors spends per query of ``items`` items, from a burst of
    ``count`` queries submitted at once (the first and last ``parallel`` completions, ramp-up
    and drain, are left out)."""
    batch = factory.make(items)
    done = np.zeros(count)
    futures = [engine.submit(batch) for _ in range(count)]
    for i, fut in enumerate(futures):
        fut.add_done_callback(lambda _f, i=i: done.__setitem__(i, time.perf_counter()))
    for fut in futures:
        fut.result()
    ends = np.sort(done)
    lo, hi = parallel, count - parallel - 1
    if hi <= lo:
        raise ValueError(f"a burst of {count} queries is too short for {parallel} executors")
    return float((ends[hi] - ends[lo]) / (hi - lo) * parallel)


def calibrate(
    engine: RecEngine,
    factory: QueryFactory,
    cpu_sizes: Sequence[int],
    gpu_sizes: Sequence[int] = (),
    waves: int = 6,
) -> Calibration:
    """A :class:`ServiceModel` for ``engine``: CPU sub-batch seconds at ``cpu_sizes`` items (one
    sub-batch per query), GPU batch seconds at ``gpu_sizes`` (one query per batch), and the
    engine loop's CPU seconds per dispatch of each kind over the same bursts."""
    began = time.perf_counter()
    queries = 0
    workers = engine.cpu_pool.num_workers if engine.cpu_pool is not None else 0
    cpu_points, gpu_points = [], []
    loop = {"cpu": [0.0, 0], "gpu": [0.0, 0]}  # the loop's CPU seconds and dispatches

    def burst(kind: str, n: int, count: int, parallel: int) -> float:
        before = engine.stats()
        seconds = burst_seconds(engine, factory, n, count, parallel)
        after = engine.stats()
        key = "cpu_sub_batches" if kind == "cpu" else "gpu_batches"
        loop[kind][0] += after["loop_cpu_s"] - before["loop_cpu_s"]
        loop[kind][1] += after[key] - before[key]
        return seconds

    for n in sorted(set(cpu_sizes)):
        engine.set_schedule(SchedConfig(sub_batch_size=None, gpu_threshold=None))
        count = waves * workers
        cpu_points.append((n, burst("cpu", n, count, workers)))
        queries += count
    for n in sorted(set(gpu_sizes)):
        engine.set_schedule(SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=1))
        count = waves * 4
        gpu_points.append((n, burst("gpu", n, count, 1)))
        queries += count
    cpu = (
        PiecewiseLinear(*zip(*cpu_points, strict=True))
        if cpu_points
        else PiecewiseLinear((1.0,), (0.0,))
    )
    gpu = PiecewiseLinear(*zip(*gpu_points, strict=True)) if gpu_points else None
    # The loop's own CPU time per dispatch (admission, dispatch, collecting the answer):
    # the part of each unit of work that no other executor can take, measured without the
    # waits for the interpreter lock, so a lower bound.
    host_cpu, host_gpu = (loop[k][0] / loop[k][1] if loop[k][1] else 0.0 for k in ("cpu", "gpu"))
    service = ServiceModel(cpu, gpu, host_cpu, host_gpu)
    return Calibration(service, queries, time.perf_counter() - began)
