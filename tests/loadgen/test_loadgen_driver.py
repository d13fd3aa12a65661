"""The open-loop driver on a virtual clock: latency from scheduled arrival to answer."""

from __future__ import annotations

import heapq
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
import torch

from recserve.engine.interface import Overloaded
from recserve.loadgen.arrivals import ArrivalProcess
from recserve.loadgen.driver import QueryPool, run_open_loop
from recserve.loadgen.metrics import LatencyTarget
from recserve.loadgen.sizes import QuerySizes
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import get_config
from recserve.types import Batch, validate_batch


class VirtualEngine:
    """Answers each query ``per_item * items`` virtual seconds after it starts, on ``servers``
    servers in FIFO order; ``submit_cost`` virtual seconds pass inside every submit. Answers are
    delivered while the driver sleeps, stamped with their own completion time."""

    def __init__(
        self, servers: int, per_item: float, capacity: int = 10**9, submit_cost: float = 0.0
    ):
        self.now = 0.0
        self.free = [0.0] * servers
        self.per_item = per_item
        self.capacity = capacity
        self.submit_cost = submit_cost
        self.pending: list[tuple[float, int, Future[torch.Tensor]]] = []
        self.submitted: list[float] = []
        self.config: Any = None

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.advance(self.now + seconds)

    def advance(self, until: float) -> None:
        while self.pending and self.pending[0][0] <= until:
            end, _, fut = heapq.heappop(self.pending)
            now, self.now = self.now, end
            fut.set_result(torch.zeros(1))
            self.now = max(now, end)
        self.now = max(self.now, until)

    def submit(self, batch: Batch) -> Future[torch.Tensor]:
        if len(self.pending) >= self.capacity:
            raise Overloaded("full")
        self.submitted.append(self.now)
        start = max(self.now, heapq.heappop(self.free))
        end = start + self.per_item * batch.batch_size
        heapq.heappush(self.free, end)
        fut: Future[torch.Tensor] = Future()
        heapq.heappush(self.pending, (end, len(self.submitted), fut))
        self.now += self.submit_cost
        return fut

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self, drain: bool = True) -> None:
        pass


@pytest.fixture(scope="module")
def pool() -> QueryPool:
    config = get_config("dlrm-rmc1", preset="tiny")
    return QueryPool(QueryFactory(config, seed=1), QuerySizes.parse("production"), pool_size=64)


def test_pool_sizes_are_stratified_quantiles_and_batches_are_valid(pool: QueryPool) -> None:
    config = get_config("dlrm-rmc1", preset="tiny")
    assert [b.batch_size for b in pool.batches] == pool.sizes.tolist()
    assert np.median(pool.sizes) == pytest.approx(178, abs=6)
    assert pool.sizes.max() > 900  # the heavy tail is in even a 64-query pool
    for batch in pool.batches[::8]:
        validate_batch(batch, config)


def test_latency_is_service_time_when_nothing_queues(pool: QueryPool) -> None:
    engine = VirtualEngine(servers=10**4, per_item=0.0)
    engine.per_item = 1e-6
    result = run_open_loop(
        engine, pool, qps=200, num_queries=300, seed=3, clock=engine.clock, sleep=engine.sleep
    )
    sizes = np.array([b.batch_size for b in pool.batches])
    assert result.sent == 300 and result.lost == 0
    # infinite servers: latency = items * per_item exactly, and every size came from the pool
    assert set(np.round(result.latencies / 1e-6).astype(int)) <= set(sizes.tolist())


def test_latency_counts_from_the_scheduled_arrival_even_when_the_driver_is_late(
    pool: QueryPool,
) -> None:
    qps, n, seed = 1000.0, 200, 5
    engine = VirtualEngine(servers=10**4, per_item=0.0, submit_cost=2e-3)  # submits lag 2 ms each
    result = run_open_loop(
        engine, pool, qps=qps, num_queries=n, seed=seed, clock=engine.clock, sleep=engine.sleep
    )
    scheduled = 1e-3 + ArrivalProcess(qps).times(n, np.random.default_rng(seed))
    lateness = np.array(engine.submitted) - scheduled
    assert lateness.max() > 0.05  # the driver fell far behind ...
    np.testing.assert_allclose(result.latencies, lateness, atol=1e-12)  # ... and it all counts


def test_queueing_latency_matches_a_hand_computed_fifo_queue(pool: QueryPool) -> None:
    qps, n, seed, per_item = 400.0, 400, 9, 1e-5
    engine = VirtualEngine(servers=1, per_item=per_item)
    result = run_open_loop(
        engine, pool, qps=qps, num_queries=n, seed=seed, clock=engine.clock, sleep=engine.sleep
    )
    rng = np.random.default_rng(seed)
    arrivals = 1e-3 + ArrivalProcess(qps).times(n, rng)
    sizes = pool.sizes[rng.integers(0, len(pool), n)]
    end, expected = 0.0, []
    for t, items in zip(arrivals, sizes, strict=True):  # Lindley's recursion
        end = max(end, t) + items * per_item
        expected.append(end - t)
    np.testing.assert_allclose(result.latencies, expected, atol=1e-12)
    assert result.summary().p99 > result.summary().p50 > sizes.mean() * per_item


def test_refusals_are_counted_and_fail_the_target(pool: QueryPool) -> None:
    engine = VirtualEngine(servers=1, per_item=1e-3, capacity=4)  # ~5 QPS of service at 200 QPS
    result = run_open_loop(
        engine, pool, qps=200, num_queries=400, seed=1, clock=engine.clock, sleep=engine.sleep
    )
    assert result.rejected > 0
    assert result.rejected + result.latencies.size + result.failed == result.sent == 400
    assert not result.meets(LatencyTarget(10.0))


def test_a_hopeless_run_is_aborted_early(pool: QueryPool) -> None:
    engine = VirtualEngine(servers=1, per_item=1e-3)
    target = LatencyTarget(0.010)
    result = run_open_loop(
        engine,
        pool,
        qps=200,
        num_queries=2000,
        seed=1,
        target=target,
        clock=engine.clock,
        sleep=engine.sleep,
    )
    assert result.aborted and result.sent < 400
    assert not result.meets(target)
