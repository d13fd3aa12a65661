"""DeepRecSched on a live engine: probes, the grids it climbs, and the static baselines.

What ``recserve tune`` and ``recserve bench serve`` share: a tuner *measure* that drives a
:class:`~recserve.engine.engine.RecEngine` with the open-loop load generator, a saturation
estimate to start the load search from, and the schedules the paper compares against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recserve.engine.config import SchedConfig
from recserve.engine.engine import RecEngine
from recserve.engine.tuner import ConfigResult, Grids, Measure
from recserve.loadgen.closed import closed_loop_inflight
from recserve.loadgen.driver import QueryPool, run_open_loop
from recserve.loadgen.metrics import LatencyTarget, RunResult

STATIC_CPU: dict[str, SchedConfig] = {
    "cpu-whole": SchedConfig(sub_batch_size=None),
    "cpu-b32": SchedConfig(sub_batch_size=32),
    "cpu-b64": SchedConfig(sub_batch_size=64),
}
"""CPU-only static schedules: each query whole on one worker; DeepRecSys's fixed splits."""
STATIC_GPU: dict[str, SchedConfig] = {
    "gpu-only": SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=1),
}
"""Every query sent alone to the GPU as it arrives: no splitting, no coalescing."""


GPU_CAPS: tuple[int, ...] = (SchedConfig().gpu_max_batch, 512, 1)
"""The coalescing caps climbed (items; 1: every GPU query alone)."""


def default_grids(max_items: int, gpu: bool) -> Grids:
    """b as in DeepRecSys (powers of two up to the largest query), then T from high (little
    offloaded) to 0 (everything offloaded), then the coalescing cap (down to 1: no joining),
    then the coalescing delay."""
    b = (*(x for x in (8, 16, 32, 64, 128, 256, 512) if x < max_items), None)
    if not gpu:
        return Grids(sub_batch_size=b)
    t = (*(x for x in (768, 512, 384, 256, 128, 64) if x < max_items), 0)
    return Grids(
        sub_batch_size=b,
        gpu_threshold=t,
        gpu_max_batch=GPU_CAPS,
        gpu_max_delay=(0.5e-3, 2e-3),
    )


@dataclass(frozen=True)
class ProbePlan:
    """How long each probe runs: ``seconds`` of arrivals, within ``[min_queries, max_queries]``,
    but never more than ``max_seconds`` of arrivals (at least ``floor_queries``): at a load of
    a few QPS, ``min_queries`` would make one probe last a minute."""

    seconds: float = 0.5
    min_queries: int = 200
    max_queries: int = 4000
    seed: int = 0
    burstiness: float = 1.0
    max_seconds: float = 3.0
    floor_queries: int = 40

    def queries(self, qps: float) -> int:
        n = float(np.clip(qps * self.seconds, self.min_queries, self.max_queries))
        return int(min(n, max(self.floor_queries, qps * self.max_seconds)))


def engine_measure(
    engine: RecEngine, pool: QueryPool, plan: ProbePlan, target: LatencyTarget
) -> Measure:
    """A tuner measure on the live engine. Every probe uses the same seed (the same query
    stream, scaled to the load), and stops early once the target is out of reach."""

    def measure(config: SchedConfig, qps: float) -> RunResult:
        engine.set_schedule(config)
        return run_open_loop(
            engine,
            pool,
            qps,
            plan.queries(qps),
            seed=plan.seed,
            burstiness=plan.burstiness,
            target=target,
        )

    return measure


def saturation_qps(
    engine: RecEngine,
    pool: QueryPool,
    config: SchedConfig,
    seconds: float = 1.0,
    outstanding: int | None = None,
) -> float:
    """Queries per second with ``outstanding`` queries always in the engine (closed loop,
    ``config``): the throughput ceiling of that schedule, and where load searches start."""
    engine.set_schedule(config)
    workers = max(1, engine.stats()["cpu_workers"])
    outstanding = outstanding or min(engine.engine_config.queue_capacity, 2 * workers + 2)
    for f in [engine.submit(pool.batches[i % len(pool)]) for i in range(outstanding)]:
        f.result()  # warm-up wave
    run = closed_loop_inflight(engine.submit, pool.batches, outstanding, seconds)
    if run["errors"]:
        raise RuntimeError(f"saturation_qps: {run['errors']} queries refused or failed")
    return float(run["qps"])


def qps_at(result: ConfigResult, target: LatencyTarget) -> float:
    """The highest load ``result``'s probes show meeting ``target`` (every lower probe met it
    too): another target read from probes taken for one, at their resolution."""
    best = 0.0
    for probe in sorted(result.probes, key=lambda p: p.qps):
        if not probe.result.meets(target):
            break
        best = probe.qps
    return best
