"""EngineCore: admit queries, collect answers, schedule, dispatch — one small step at a time.

The core owns no threads and never blocks: the real engine calls :meth:`EngineCore.step` from
its loop thread after waiting for a wake-up, and the simulator calls it after advancing a
virtual clock. Executors (CPU worker pool, GPU runner, or their simulated stand-ins) take work
without blocking and report :class:`~recserve.engine.request.Completion` objects on ``poll``.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch

from recserve.engine.interface import EngineClosed, Overloaded
from recserve.engine.request import Completion, Query, SubBatch
from recserve.engine.scheduler import Scheduler
from recserve.types import Batch

Clock = Callable[[], float]


class CpuExecutor(Protocol):
    """A pool of CPU workers that each run one sub-batch at a time."""

    def idle_workers(self) -> int: ...

    def dispatch(self, work: list[SubBatch]) -> None: ...

    def poll(self) -> list[Completion]: ...


class GpuExecutor(Protocol):
    """A batch-level runner that takes whole queries, a few batches in flight at once."""

    def free_slots(self) -> int: ...

    def dispatch(self, queries: list[Query]) -> None: ...

    def poll(self) -> list[Completion]: ...


@dataclass
class EngineCounters:
    """Monotonic counters (Prometheus-style) of one engine."""

    accepted: int = 0
    rejected: int = 0
    completed: int = 0
    failed: int = 0
    items: int = 0
    cpu_sub_batches: int = 0
    cpu_items: int = 0
    gpu_batches: int = 0
    gpu_queries: int = 0
    gpu_items: int = 0


class EngineCore:
    """The step loop's body: shared by the threaded engine and the virtual-clock simulator."""

    def __init__(
        self,
        scheduler: Scheduler,
        cpu: CpuExecutor | None,
        gpu: GpuExecutor | None,
        clock: Clock,
        capacity: int,
        recent: int = 4096,
    ) -> None:
        self.scheduler = scheduler
        self.cpu, self.gpu = cpu, gpu
        self.clock = clock
        self.capacity = capacity
        self.counters = EngineCounters()
        self.closed = False
        self._lock = threading.Lock()
        self._inbox: deque[Query] = deque()
        self._in_system = 0
        self._ids = itertools.count()
        self._open: dict[int, Query] = {}
        self._recent: deque[float] = deque(maxlen=recent)

    # -- any thread ---------------------------------------------------------------------------

    def admit(
        self,
        num_items: int,
        batch: Batch | None = None,
        future: Future[torch.Tensor] | None = None,
    ) -> Query:
        """Accept a query into the inbox, or refuse it at once (never silently)."""
        with self._lock:
            if self.closed:
                raise EngineClosed("the engine is shutting down and takes no new requests")
            if self._in_system >= self.capacity:
                self.counters.rejected += 1
                raise Overloaded(
                    f"request queue full ({self.capacity} requests in the engine); retry later"
                )
            self._in_system += 1
            self.counters.accepted += 1
        if future is not None:
            future.set_running_or_notify_cancel()  # accepted work cannot be cancelled
        query = Query(next(self._ids), num_items, self.clock(), batch, future)
        self._open[query.id] = query
        self._inbox.append(query)
        return query

    @property
    def in_system(self) -> int:
        """Accepted queries not answered yet."""
        return self._in_system

    def close(self) -> None:
        with self._lock:
            self.closed = True

    # -- the loop thread ----------------------------------------------------------------------

    def step(self) -> None:
        """Take new queries, collect answers, then schedule and dispatch what can run now."""
        now = self.clock()
        while self._inbox:
            self.scheduler.add(self._inbox.popleft())
        for executor in (self.cpu, self.gpu):
            if executor is not None:
                for completion in executor.poll():
                    self._complete(completion, now)
        idle = self.cpu.idle_workers() if self.cpu is not None else 0
        slots = self.gpu.free_slots() if self.gpu is not None else 0
        out = self.scheduler.schedule(now, idle, slots)
        if out.cpu:
            assert self.cpu is not None
            self.cpu.dispatch(out.cpu)
            self.counters.cpu_sub_batches += len(out.cpu)
            self.counters.cpu_items += sum(s.num_items for s in out.cpu)
        for batch in out.gpu:
            assert self.gpu is not None
            self.gpu.dispatch(batch)
            self.counters.gpu_batches += 1
            self.counters.gpu_queries += len(batch)
            self.counters.gpu_items += sum(q.num_items for q in batch)

    def next_deadline(self) -> float | None:
        """Clock time by which :meth:`step` must run again even if nothing else happens.

        None while every GPU slot is busy: a waiting GPU batch cannot go before a slot frees,
        and a finishing batch wakes the loop anyway (a past deadline here would spin the loop
        and starve the runner's threads of the GIL)."""
        if self.gpu is not None and self.gpu.free_slots() == 0:
            return None
        return self.scheduler.next_deadline()

    def fail_waiting(self, error: BaseException) -> int:
        """Fail every query that still has undispatched work (shutdown without draining)."""
        now = self.clock()
        while self._inbox:
            self.scheduler.add(self._inbox.popleft())
        queries = self.scheduler.drain()
        for query in queries:
            self._finish(query, now, error)
        return len(queries)

    def fail_all(self, error: BaseException) -> int:
        """Fail every open query, running or not (after the loop and executors stopped)."""
        self.fail_waiting(error)
        now = self.clock()
        queries = [q for q in list(self._open.values()) if not q.done]
        for query in queries:
            self._finish(query, now, error)
        return len(queries)

    def _complete(self, done: Completion, now: float) -> None:
        query = done.query
        if query.done:  # an earlier part failed; the query was answered with that error
            return
        if done.error is not None:
            self._finish(query, now, done.error)
            return
        if done.output is not None:
            if done.start == 0 and done.stop == query.num_items:
                query.output = done.output
            else:
                if query.output is None:
                    query.output = done.output.new_empty((query.num_items, *done.output.shape[1:]))
                query.output[done.start : done.stop] = done.output
        query.remaining -= done.stop - done.start
        if query.remaining == 0:
            self._finish(query, now, None)

    def _finish(self, query: Query, now: float, error: BaseException | None) -> None:
        query.finished, query.error = now, error
        self._open.pop(query.id, None)
        with self._lock:
            self._in_system -= 1
        if error is None:
            self.counters.completed += 1
            self.counters.items += query.num_items
            self._recent.append(query.latency)
        else:
            self.counters.failed += 1
        if query.future is not None:
            if error is None:
                assert query.output is not None or query.batch is None
                query.future.set_result(query.output)  # type: ignore[arg-type]
            else:
                query.future.set_exception(error)
        query.batch = None  # the inputs are no longer needed
        if query.on_finish is not None:
            query.on_finish(query)

    def stats(self) -> dict[str, Any]:
        """Counters, gauges and the latency percentiles of recent queries (ms)."""
        out: dict[str, Any] = asdict(self.counters)
        out["in_system"] = self._in_system
        out["queue_depth"] = self.scheduler.num_waiting + len(self._inbox)
        out["queue_capacity"] = self.capacity
        recent = np.array(tuple(self._recent), dtype=np.float64)  # tuple(): one atomic copy
        if recent.size:
            p50, p95, p99 = np.percentile(recent, [50, 95, 99]) * 1e3
            out.update(
                latency_p50_ms=float(p50), latency_p95_ms=float(p95), latency_p99_ms=float(p99)
            )
        return out
