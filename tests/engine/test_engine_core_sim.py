"""EngineCore on a virtual clock: reassembly, latency accounting, queue bound, shutdown."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.engine.config import SchedConfig
from recserve.engine.core import EngineCore
from recserve.engine.interface import EngineClosed, Overloaded
from recserve.engine.request import Completion, Query, SubBatch
from recserve.engine.scheduler import Scheduler
from recserve.engine.simulate import PiecewiseLinear, ServiceModel, VirtualClock, simulate
from recserve.types import Batch, KeyedJagged


def item_batch(first: int, n: int) -> Batch:
    """Items whose single dense feature is their global number."""
    dense = torch.arange(first, first + n, dtype=torch.float32).unsqueeze(1)
    sparse = KeyedJagged(
        ("t",), torch.zeros(0, dtype=torch.int64), torch.zeros(n + 1, dtype=torch.int64), n
    )
    return Batch(dense, sparse)


class EchoWorkers:
    """CPU workers that answer each item with its dense feature, in a scrambled order."""

    def __init__(self, workers: int, seed: int) -> None:
        self.workers = workers
        self.running: list[SubBatch] = []
        self.rng = np.random.default_rng(seed)
        self.seen: list[tuple[int, int]] = []

    def idle_workers(self) -> int:
        return self.workers - len(self.running)

    def dispatch(self, work: list[SubBatch]) -> None:
        self.running.extend(work)

    def poll(self) -> list[Completion]:
        k = int(self.rng.integers(0, len(self.running) + 1))
        order = self.rng.permutation(len(self.running))
        done = [self.running[i] for i in order[:k]]
        self.running = [self.running[i] for i in order[k:]]
        out = []
        for sub in done:
            assert sub.query.batch is not None
            rows = sub.query.batch.dense[sub.start : sub.stop] * 2
            out.append(Completion(sub.query, sub.start, sub.stop, rows))
            self.seen.extend((sub.query.id, i) for i in range(sub.start, sub.stop))
        return out


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    b=st.one_of(st.none(), st.integers(1, 128)),
    workers=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_sub_batches_reassemble_every_item_once_in_order(sizes, b, workers, seed) -> None:
    clock = VirtualClock()
    pool = EchoWorkers(workers, seed)
    core = EngineCore(Scheduler(SchedConfig(sub_batch_size=b)), pool, None, clock, capacity=100)
    futures, first = [], 0
    for n in sizes:
        fut: Future[torch.Tensor] = Future()
        core.admit(n, item_batch(first, n), fut)
        futures.append((fut, first, n))
        first += n
    for _ in range(10_000):
        if core.in_system == 0:
            break
        clock.now += 1e-3
        core.step()
    for fut, start, n in futures:
        expected = torch.arange(start, start + n, dtype=torch.float32).unsqueeze(1) * 2
        assert torch.equal(fut.result(timeout=0), expected)
    assert sorted(pool.seen) == sorted({(q, i) for q, i in pool.seen})  # nothing twice
    assert len(pool.seen) == sum(sizes)


def test_latency_runs_from_arrival_to_the_last_sub_batch() -> None:
    # 2 workers, 1 ms + 0.1 ms per item. Query A (40 items, t=0) splits into 4 x 10 items:
    # two run 0-2 ms, two 2-4 ms. Query B (10 items, t=1 ms) waits for a worker until 4 ms.
    service = ServiceModel(PiecewiseLinear.linear(1e-3, 1e-4))
    res = simulate(SchedConfig(sub_batch_size=10), service, [0.0, 1e-3], [40, 10], workers=2)
    np.testing.assert_allclose(res.latencies, [4e-3, 5e-3])
    # Whole queries: A runs 0-5 ms on one worker, B 1-3 ms on the other.
    res = simulate(SchedConfig(sub_batch_size=None), service, [0.0, 1e-3], [40, 10], workers=2)
    np.testing.assert_allclose(res.latencies, [5e-3, 2e-3])


def test_gpu_latency_includes_the_coalescing_delay() -> None:
    service = ServiceModel(PiecewiseLinear.linear(1.0, 0.0), gpu=PiecewiseLinear.linear(1e-3, 1e-5))
    config = SchedConfig(gpu_threshold=0, gpu_max_batch=1000, gpu_max_delay=2e-3)
    res = simulate(config, service, [0.0, 1e-3, 10e-3], [100, 100, 100], workers=1)
    # first two coalesce at t=2 ms and take 1 + 2 ms; the third waits 2 ms alone, runs 2 ms
    np.testing.assert_allclose(res.latencies, [5e-3, 4e-3, 4e-3])


def test_the_engine_loop_is_one_server_for_both_executors() -> None:
    """Dispatches pass through the engine's loop one at a time, CPU and GPU alike: with 1 ms
    of loop per dispatch, four queries at once finish 1, 2, 3 and 4 ms after the loop starts
    on them, plus their own work, whichever executor runs them."""
    cpu, gpu = PiecewiseLinear.linear(2e-3, 0.0), PiecewiseLinear.linear(1e-3, 0.0)
    config = SchedConfig(sub_batch_size=None, gpu_threshold=50, gpu_max_batch=1)
    sizes = [10, 100, 10, 100]  # CPU, GPU, CPU, GPU
    free = simulate(config, ServiceModel(cpu, gpu), np.zeros(4), sizes, workers=2, gpu_inflight=2)
    np.testing.assert_allclose(free.latencies, [2e-3, 1e-3, 2e-3, 2e-3])  # GPU back to back
    loop = ServiceModel(cpu, gpu, host_cpu=1e-3, host_gpu=1e-3)
    res = simulate(config, loop, np.zeros(4), sizes, workers=2, gpu_inflight=2)
    # the CPU pool is dispatched first in a step: CPU 1 ms, CPU 2 ms, then GPU 3 ms, GPU 4 ms
    np.testing.assert_allclose(res.latencies, [3e-3, 4e-3, 4e-3, 5e-3])


def test_queue_bound_refuses_clearly_and_loses_nothing() -> None:
    service = ServiceModel(PiecewiseLinear.linear(1e-3, 0.0))
    res = simulate(
        SchedConfig(sub_batch_size=None),
        service,
        np.zeros(20),
        np.full(20, 5),
        workers=1,
        capacity=5,
    )
    assert res.rejected == 15 and res.latencies.size == 5
    np.testing.assert_allclose(np.sort(res.latencies), [1e-3, 2e-3, 3e-3, 4e-3, 5e-3])

    clock = VirtualClock()
    core = EngineCore(Scheduler(SchedConfig()), EchoWorkers(1, 0), None, clock, capacity=2)
    core.admit(1, item_batch(0, 1))
    core.admit(1, item_batch(1, 1))
    with pytest.raises(Overloaded, match="queue full"):
        core.admit(1, item_batch(2, 1))
    assert core.stats()["rejected"] == 1 and core.stats()["in_system"] == 2


def test_closing_refuses_new_work_and_failing_answers_every_waiting_query() -> None:
    clock = VirtualClock()
    pool = EchoWorkers(1, 0)
    pool.poll = lambda: []  # type: ignore[method-assign]  # a worker that never answers
    core = EngineCore(Scheduler(SchedConfig(sub_batch_size=None)), pool, None, clock, capacity=10)
    futures = [Future() for _ in range(3)]
    for i, fut in enumerate(futures):
        core.admit(4, item_batch(4 * i, 4), fut)
    core.step()  # the first query is running, two wait
    core.close()
    with pytest.raises(EngineClosed):
        core.admit(1, item_batch(0, 1))
    assert core.fail_waiting(EngineClosed("bye")) == 2
    assert not futures[0].done()
    assert core.fail_all(EngineClosed("stopped")) == 1
    for fut in futures:
        with pytest.raises(EngineClosed):
            fut.result(timeout=0)
    assert core.in_system == 0


def test_a_failed_part_fails_its_query_once() -> None:
    clock = VirtualClock()

    class FailFirst(EchoWorkers):
        def poll(self) -> list[Completion]:
            done = [
                Completion(s.query, s.start, s.stop, error=RuntimeError("boom"))
                for s in self.running
            ]
            self.running = []
            return done

    core = EngineCore(
        Scheduler(SchedConfig(sub_batch_size=2)), FailFirst(3, 0), None, clock, capacity=4
    )
    fut: Future[torch.Tensor] = Future()
    query = core.admit(10, item_batch(0, 10), fut)
    for _ in range(5):
        core.step()
    assert isinstance(query, Query) and query.done
    with pytest.raises(RuntimeError, match="boom"):
        fut.result(timeout=0)
    assert core.stats()["failed"] == 1 and core.stats()["cpu_sub_batches"] == 3
