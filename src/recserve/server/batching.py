"""Dynamic batching: concurrent small requests of one model joined into one engine call.

The batcher keeps at most ``max_inflight_batches`` engine calls in flight (slots). A request
goes to the engine as soon as a slot is free, joined with every request that queued up while
the slots were busy (up to ``max_batch_items`` items); with ``max_queue_delay_ms > 0`` it may
also wait that long for company while a slot is free. The results are split back per request.
Everything runs on one asyncio event loop, so the state needs no locks; the engine's futures
complete on its threads and hop back with ``call_soon_threadsafe``.

An engine that joins queued requests itself (``engine.coalesces``, e.g. the DeepRecSys engine,
whose scheduler coalesces GPU queries and splits CPU ones) gets every request as it comes, alone:
joining here would copy each request once more on this process's interpreter lock and hold
requests back behind a few slots the engine does not need. The bound on requests waiting or in
flight (``max_queue_requests``) still holds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from recserve.engine.batching import concat_batches as join_batches
from recserve.engine.interface import EngineClosed, InferenceEngine
from recserve.server.errors import QueueFull, ServerError, Unavailable, refusal
from recserve.types import Batch


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """One batch holding the items of ``batches`` in order (feature-major offsets rebased)."""
    if len(batches) == 1:
        return batches[0]
    keys = batches[0].sparse.keys
    if any(b.sparse.keys != keys for b in batches):
        raise ValueError("cannot join batches with different sparse features")
    return join_batches(batches, keys)


@dataclass
class Result:
    """One request's answer: its rows of the scores, and where its time went."""

    scores: torch.Tensor
    queue_s: float
    """Waiting in the batcher for a slot (and company)."""
    compute_s: float
    """In the engine: from submission to result (the engine's own queue included)."""


@dataclass
class _Pending:
    batch: Batch
    future: asyncio.Future[Result]
    arrived: float
    dispatched: float = 0.0


BatchObserver = Callable[[int, int], None]
"""Called with ``(items, requests)`` of every engine call."""


class DynamicBatcher:
    """Bounded queue + dynamic batching in front of one engine; see the module docstring."""

    def __init__(
        self,
        engine: InferenceEngine,
        *,
        max_batch_items: int = 1024,
        max_queue_delay_s: float = 0.0,
        max_inflight_batches: int = 2,
        max_queue_requests: int = 256,
        executor: concurrent.futures.Executor | None = None,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch_items = max_batch_items
        self.max_queue_delay_s = max_queue_delay_s
        self.max_inflight_batches = max_inflight_batches
        self.max_queue_requests = max_queue_requests
        self.passthrough = bool(getattr(engine, "coalesces", False))
        """Each request goes to the engine alone, at once (see the module docstring)."""
        if self.passthrough:
            self.max_batch_items = 1  # a group is one request, whatever its size
            self.max_queue_delay_s = 0.0
            self.max_inflight_batches = max_queue_requests
        self._executor = executor
        self._on_batch = on_batch
        self._pending: deque[_Pending] = deque()
        self._pending_items = 0
        self._inflight_batches = 0
        self._inflight_requests = 0
        self._timer: asyncio.TimerHandle | None = None
        self._done: deque[tuple[list[_Pending], concurrent.futures.Future[torch.Tensor]]]
        self._done = deque()
        """Engine calls finished on the engine's threads, not yet handled on the loop."""
        self._drain_scheduled = False
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queued_requests(self) -> int:
        """Requests waiting for a slot."""
        return len(self._pending)

    @property
    def inflight_requests(self) -> int:
        return self._inflight_requests

    @property
    def inflight_batches(self) -> int:
        return self._inflight_batches

    async def infer(self, batch: Batch) -> Result:
        """Answer one validated batch; raise :class:`QueueFull` or :class:`Unavailable` if
        refused (at once: a refused request never waits)."""
        return await self.submit(batch)

    def submit(self, batch: Batch) -> asyncio.Future[Result]:
        """:meth:`infer` without a coroutine: the future of one validated batch's answer
        (call on the loop's thread); refusals raise here, at once."""
        if self._closing:
            raise Unavailable(f"model {self.engine.config.name!r} is shutting down or unloading")
        depth = len(self._pending) + self._inflight_requests
        if depth >= self.max_queue_requests:
            raise QueueFull(
                f"model {self.engine.config.name!r}: queue is full ({depth} requests waiting or "
                "running); retry later"
            )
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(batch, future, time.perf_counter()))
        self._pending_items += batch.batch_size
        self._idle.clear()
        self._pump()
        return future

    async def close(self) -> None:
        """Refuse new requests, answer every accepted one, then close the engine (draining)."""
        self._closing = True
        self.max_queue_delay_s = 0.0
        self._pump()
        await self._idle.wait()
        await asyncio.to_thread(self.engine.close, True)

    def _pump(self) -> None:
        while self._pending and self._inflight_batches < self.max_inflight_batches:
            if self.max_queue_delay_s > 0 and self._pending_items < self.max_batch_items:
                wait = self._pending[0].arrived + self.max_queue_delay_s - time.perf_counter()
                if wait > 0:
                    if self._timer is None:
                        self._timer = asyncio.get_running_loop().call_later(wait, self._on_timer)
                    return
            self._dispatch(self._take_group())
        self._check_idle()

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _take_group(self) -> list[_Pending]:
        group: list[_Pending] = []
        items = 0
        while self._pending:
            size = self._pending[0].batch.batch_size
            if group and items + size > self.max_batch_items:
                break
            entry = self._pending.popleft()
            self._pending_items -= size
            if entry.future.cancelled():
                continue
            group.append(entry)
            items += size
        return group

    def _dispatch(self, group: list[_Pending]) -> None:
        if not group:
            return
        self._inflight_batches += 1
        self._inflight_requests += len(group)
        now = time.perf_counter()
        for entry in group:
            entry.dispatched = now
        if self._on_batch is not None:
            self._on_batch(sum(e.batch.batch_size for e in group), len(group))
        batches = [e.batch for e in group]
        if len(group) == 1 or self._executor is None:
            try:
                engine_future = self._submit(batches)
            except Exception as e:
                self._finish(group, None, e)
            else:
                self._watch(group, engine_future)
            return
        loop = asyncio.get_running_loop()
        joining = loop.run_in_executor(self._executor, self._submit, batches)

        def joined(done: asyncio.Future[concurrent.futures.Future[torch.Tensor]]) -> None:
            if done.exception() is not None:
                self._finish(group, None, done.exception())
            else:
                self._watch(group, done.result())

        joining.add_done_callback(joined)

    def _submit(self, batches: list[Batch]) -> concurrent.futures.Future[torch.Tensor]:
        return self.engine.submit(concat_batches(batches))

    def _watch(
        self, group: list[_Pending], engine_future: concurrent.futures.Future[torch.Tensor]
    ) -> None:
        loop = asyncio.get_running_loop()

        def done(f: concurrent.futures.Future[torch.Tensor]) -> None:
            # One hop to the loop for every completion that lands before it runs (a GPU
            # batch answers many requests at once), not one self-pipe write per request.
            self._done.append((group, f))
            if not self._drain_scheduled:
                self._drain_scheduled = True
                loop.call_soon_threadsafe(self._drain_done)

        engine_future.add_done_callback(done)

    def _drain_done(self) -> None:
        self._drain_scheduled = False  # before popping: a later completion schedules anew
        while self._done:
            self._complete(*self._done.popleft())

    def _complete(
        self, group: list[_Pending], engine_future: concurrent.futures.Future[torch.Tensor]
    ) -> None:
        if engine_future.cancelled():
            self._finish(group, None, EngineClosed("the engine cancelled the request"))
        elif engine_future.exception() is not None:
            self._finish(group, None, engine_future.exception())
        else:
            self._finish(group, engine_future.result(), None)

    def _finish(
        self, group: list[_Pending], scores: torch.Tensor | None, error: BaseException | None
    ) -> None:
        self._inflight_batches -= 1
        self._inflight_requests -= len(group)
        now = time.perf_counter()
        total = sum(e.batch.batch_size for e in group)
        if error is None and scores is not None and scores.shape[0] != total:
            error = RuntimeError(f"engine returned {scores.shape[0]} rows for {total} items")
        start = 0
        for entry in group:
            b = entry.batch.batch_size
            if not entry.future.done():
                if error is not None:
                    entry.future.set_exception(_request_error(error))
                else:
                    assert scores is not None
                    entry.future.set_result(
                        Result(
                            scores[start : start + b],
                            entry.dispatched - entry.arrived,
                            now - entry.dispatched,
                        )
                    )
            start += b
        self._pump()

    def _check_idle(self) -> None:
        if not self._pending and not self._inflight_batches:
            self._idle.set()


def _request_error(error: BaseException) -> BaseException:
    """A fresh exception for one request, engine refusals mapped to server errors."""
    error = refusal(error)
    if isinstance(error, ServerError):
        return type(error)(str(error))
    return RuntimeError(f"inference failed: {type(error).__name__}: {error}")
