"""Joining batches, the dynamic batcher (with a controllable engine), and the local engine."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import pytest
import torch
from server_helpers import query

from recserve.engine.interface import EngineClosed, InferenceEngine, Overloaded
from recserve.models import MODEL_NAMES, build_model, get_config
from recserve.server.batching import DynamicBatcher, concat_batches
from recserve.server.errors import QueueFull, Unavailable
from recserve.server.local_engine import LocalEngine
from recserve.types import Batch, validate_batch


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_concat_then_split_equals_separate_calls(name: str) -> None:
    model = build_model(name, "tiny")
    batches = [query(model.config, b, seed=b) for b in (3, 1, 6)]
    joined = concat_batches(batches)
    validate_batch(joined, model.config)
    assert joined.batch_size == 10
    with torch.inference_mode():
        together = model(joined)
        apart = torch.cat([model(b) for b in batches])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-6)


def test_concat_keeps_per_id_weights() -> None:
    config = get_config("wnd", "tiny")
    batches = [query(config, b, seed=b) for b in (2, 3)]
    for b in batches:
        b.sparse.weights = torch.rand(b.sparse.values.numel())
    joined = concat_batches(batches)
    assert joined.sparse.weights is not None
    for f, key in enumerate(joined.sparse.keys):
        start, stop = joined.sparse.key_offsets()[f : f + 2]
        parts = [b.sparse._weights_of(key) for b in batches]
        assert torch.equal(joined.sparse.weights[start:stop], torch.cat(parts))


class GatedEngine:
    """An engine whose calls finish only when the test releases them; records batch sizes."""

    def __init__(self, config: Any, tasks: int = 1) -> None:
        self.config = config
        self.calls: list[int] = []
        self.pending: list[tuple[Batch, Future[torch.Tensor]]] = []
        self.closed = False
        self.lock = threading.Lock()

    def submit(self, batch: Batch) -> Future[torch.Tensor]:
        future: Future[torch.Tensor] = Future()
        with self.lock:
            self.calls.append(batch.batch_size)
            self.pending.append((batch, future))
        return future

    def release(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for batch, future in pending:
            # Row i of the result is item i's first dense feature: splits are checkable.
            future.set_result(batch.dense[:, :1].clone())

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self, drain: bool = True) -> None:
        self.closed = True


WND = get_config("wnd", "tiny")


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_gated_engine_meets_protocol() -> None:
    assert isinstance(GatedEngine(WND), InferenceEngine)


def test_requests_queued_while_busy_are_joined() -> None:
    async def main() -> None:
        engine = GatedEngine(WND)
        batcher = DynamicBatcher(engine, max_inflight_batches=1, max_batch_items=10)
        batches = [query(WND, b, seed=i) for i, b in enumerate((2, 3, 4, 5))]
        tasks = [asyncio.ensure_future(batcher.infer(b)) for b in batches]
        await asyncio.sleep(0.01)
        assert engine.calls == [2]  # the first goes at once, the others wait for the slot
        engine.release()
        await asyncio.sleep(0.01)
        assert engine.calls == [2, 7]  # 3 + 4 joined; 5 more would pass max_batch_items
        engine.release()
        await asyncio.sleep(0.01)
        engine.release()
        results = await asyncio.gather(*tasks)
        assert engine.calls == [2, 7, 5]
        for batch, result in zip(batches, results, strict=True):
            assert torch.equal(result.scores, batch.dense[:, :1])
            assert result.queue_s >= 0 and result.compute_s >= 0

    run(main())


def test_queue_delay_waits_for_company() -> None:
    async def main() -> None:
        engine = GatedEngine(WND)
        batcher = DynamicBatcher(engine, max_inflight_batches=4, max_queue_delay_s=0.3)
        first = asyncio.ensure_future(batcher.infer(query(WND, 2)))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(batcher.infer(query(WND, 3)))
        await asyncio.sleep(0.01)
        assert engine.calls == []  # a slot is free, but both wait for the delay
        await asyncio.sleep(0.4)
        assert engine.calls == [5]
        engine.release()
        await asyncio.gather(first, second)

    run(main())


def test_full_queue_refuses_at_once_and_close_drains() -> None:
    async def main() -> None:
        engine = GatedEngine(WND)
        batcher = DynamicBatcher(engine, max_inflight_batches=1, max_queue_requests=3)
        tasks = [asyncio.ensure_future(batcher.infer(query(WND, 1, seed=i))) for i in range(3)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="queue is full"):
            await batcher.infer(query(WND, 1))
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        with pytest.raises(Unavailable):
            await batcher.infer(query(WND, 1))
        while not closing.done():
            engine.release()
            await asyncio.sleep(0.01)
        assert all(t.done() and t.exception() is None for t in tasks)
        assert engine.closed

    run(main())


class CoalescingEngine(GatedEngine):
    """Joins queued requests itself, as the DeepRecSys engine does."""

    coalesces = True


def test_engine_that_coalesces_gets_each_request_alone_and_at_once() -> None:
    async def main() -> None:
        engine = CoalescingEngine(WND)
        batcher = DynamicBatcher(
            engine, max_inflight_batches=1, max_batch_items=10, max_queue_delay_s=0.3,
            max_queue_requests=4,
        )  # fmt: skip
        assert batcher.passthrough
        batches = [query(WND, b, seed=i) for i, b in enumerate((2, 3, 4, 12))]
        tasks = [asyncio.ensure_future(batcher.infer(b)) for b in batches]
        await asyncio.sleep(0.01)
        # no slot limit, no delay, no joining: the engine has every request, each as it came
        assert engine.calls == [2, 3, 4, 12]
        assert [b for b, _ in engine.pending] == batches
        with pytest.raises(QueueFull):  # the bound on requests waiting or in flight holds
            await batcher.infer(query(WND, 1))
        engine.release()
        results = await asyncio.gather(*tasks)
        for batch, result in zip(batches, results, strict=True):
            assert torch.equal(result.scores, batch.dense[:, :1])
        assert batcher.inflight_batches == 0 and batcher.inflight_requests == 0

    run(main())


class RefusingEngine(GatedEngine):
    def __init__(self, config: Any, error: Exception) -> None:
        super().__init__(config)
        self.error = error

    def submit(self, batch: Batch) -> Future[torch.Tensor]:
        raise self.error


@pytest.mark.parametrize(
    ("error", "expected"), [(Overloaded("full"), QueueFull), (EngineClosed("bye"), Unavailable)]
)
def test_engine_refusals_become_server_errors(error: Exception, expected: type) -> None:
    async def main() -> None:
        batcher = DynamicBatcher(RefusingEngine(WND, error))
        with pytest.raises(expected):
            await batcher.infer(query(WND, 2))
        assert batcher.inflight_batches == 0 and batcher.queued_requests == 0

    run(main())


def test_local_engine_runs_bounds_and_drains() -> None:
    model = build_model("wnd", "tiny")
    gate = threading.Event()

    def slow(batch: Batch) -> torch.Tensor:
        gate.wait(10)
        return model(batch)

    engine = LocalEngine(slow, model.config, workers=1, max_queue=2)
    assert isinstance(engine, InferenceEngine)
    batch = query(model.config, 4)
    futures = [engine.submit(batch)]
    # One running (maybe), two queued: the queue is full by the fourth at the latest.
    with pytest.raises(Overloaded):
        for _ in range(3):
            futures.append(engine.submit(batch))
    gate.set()
    closer = threading.Thread(target=engine.close, args=(True,))
    closer.start()
    closer.join(10)
    with torch.inference_mode():
        expected = model(batch)
    for f in futures:
        torch.testing.assert_close(f.result(5), expected)
    with pytest.raises(EngineClosed):
        engine.submit(batch)
    assert engine.stats()["requests"] == len(futures)


def test_local_engine_close_without_drain_fails_queued() -> None:
    gate = threading.Event()
    model = build_model("wnd", "tiny")

    def slow(batch: Batch) -> torch.Tensor:
        gate.wait(10)
        return model(batch)

    engine = LocalEngine(slow, model.config, workers=1, max_queue=8)
    futures = [engine.submit(query(model.config, 2)) for _ in range(4)]
    closer = threading.Thread(target=engine.close, args=(False,))
    closer.start()
    gate.set()
    closer.join(10)
    outcomes = [type(f.exception(5)) for f in futures]
    assert EngineClosed in outcomes  # queued ones were failed, not lost
    assert all(o in (type(None), EngineClosed) for o in outcomes)
