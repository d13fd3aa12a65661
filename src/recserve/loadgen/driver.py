"""The in-process open-loop driver: submit queries at their arrival times, whatever the engine
does, and time each from its *scheduled* arrival to its answer (so a slow engine, or a slow
driver, can never hide latency: no coordinated omission)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch

from recserve.engine.interface import EngineClosed, InferenceEngine, Overloaded
from recserve.loadgen.arrivals import ArrivalProcess
from recserve.loadgen.metrics import LatencyTarget, RunResult
from recserve.loadgen.sizes import QuerySizes
from recserve.loadgen.synthetic import QueryFactory
from recserve.types import Batch


class QueryPool:
    """Pre-built queries whose sizes follow a distribution, so the driver never builds a query
    while timing. Sizes are the distribution's quantiles at ``(k + 0.5) / pool_size`` (a
    stratified sample: its tail is right even for a small pool); each query is a slice of one
    of a few large random queries, so building the pool costs little."""

    def __init__(
        self,
        factory: QueryFactory,
        sizes: QuerySizes,
        pool_size: int = 128,
        seed: int = 0,
        templates: int = 4,
    ) -> None:
        rng = np.random.default_rng(seed)
        draws = np.sort(sizes.sample(max(20_000, 100 * pool_size), rng))
        ranks = ((np.arange(pool_size) + 0.5) / pool_size * draws.size).astype(np.int64)
        self.sizes = draws[ranks]
        top = int(self.sizes.max())
        bases = [factory.make(top) for _ in range(min(templates, pool_size))]
        self.batches: list[Batch] = []
        for k, n in enumerate(self.sizes.tolist()):
            base = bases[k % len(bases)]
            start = int(rng.integers(0, top - n + 1))
            batch = base if n == top else base.slice_items(start, start + n)
            batch.sparse.key_offsets()
            self.batches.append(batch)

    def __len__(self) -> int:
        return len(self.batches)


def run_open_loop(
    engine: InferenceEngine,
    pool: QueryPool,
    qps: float,
    num_queries: int,
    seed: int = 0,
    burstiness: float = 1.0,
    target: LatencyTarget | None = None,
    drain_timeout: float = 30.0,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> RunResult:
    """Offer ``num_queries`` queries at ``qps`` (seeded arrivals and picks from ``pool``).

    With a ``target``, stop sending as soon as more queries have missed it (late, pending past
    it, or refused) than the target's percentile allows: the run has failed already (the
    result is marked ``aborted``). Queries still unanswered ``drain_timeout`` seconds after the
    last arrival count as failed.
    """
    rng = np.random.default_rng(seed)
    offsets = ArrivalProcess(qps, burstiness).times(num_queries, rng)
    picks = rng.integers(0, len(pool), num_queries)
    arrival = np.full(num_queries, np.nan)
    done_at = np.full(num_queries, np.nan)
    errors = np.zeros(num_queries, dtype=bool)
    accepted: list[int] = []
    rejected, aborted = 0, False
    allowed = target.allowed_misses * num_queries if target is not None else np.inf

    def on_done(i: int, future: Future[torch.Tensor]) -> None:
        errors[i] = future.exception() is not None
        done_at[i] = clock()

    start = clock() + 1e-3
    sent = 0
    for i in range(num_queries):
        at = start + offsets[i]
        wait = at - clock()
        if wait > 0:
            sleep(wait)
        arrival[i] = at
        sent += 1
        try:
            future = engine.submit(pool.batches[picks[i]])
        except (Overloaded, EngineClosed):
            rejected += 1
            done_at[i] = -np.inf  # refused: counted in ``rejected``, never pending
        else:
            accepted.append(i)
            future.add_done_callback(lambda f, i=i: on_done(i, f))
        if target is not None and (i < 32 or i % 8 == 7):
            missed = rejected + _late(arrival[: i + 1], done_at[: i + 1], clock(), target.seconds)
            aborted = missed > allowed
            if aborted:
                break
    deadline = clock() + drain_timeout
    idx = np.asarray(accepted, dtype=np.int64)
    while np.isnan(done_at[idx]).any() and clock() < deadline:
        sleep(1e-3)
    answered = idx[~np.isnan(done_at[idx]) & ~errors[idx]]
    latencies = done_at[answered] - arrival[answered]
    failed = idx.size - answered.size
    last = np.nanmax(done_at) if answered.size else start
    return RunResult(
        offered_qps=qps,
        sent=sent,
        latencies=latencies,
        rejected=rejected,
        failed=int(failed),
        duration=float(last - start),
        aborted=aborted,
    )


def _late(arrival: np.ndarray, done_at: np.ndarray, now: float, limit: float) -> int:
    """Queries over ``limit`` already: answered late, or still pending past it."""
    finished = ~np.isnan(done_at)
    late_done = np.count_nonzero(done_at[finished] - arrival[finished] > limit)
    late_pending = np.count_nonzero(now - arrival[~finished] > limit)
    return int(late_done + late_pending)
