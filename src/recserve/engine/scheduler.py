"""DeepRecSys's scheduler: split queries for the CPU workers, or send them whole to the GPU.

Pure logic with no threads or clocks of its own, so the same code runs the real engine and the
virtual-clock simulator. A query with at least ``T`` items goes whole to the GPU queue
(batch-level parallelism); any other is cut into sub-batches of ``b`` items that the CPU
workers take in arrival order (request-level parallelism). Queued GPU queries are coalesced
into one batch up to ``gpu_max_batch`` items, waiting at most ``gpu_max_delay`` for company.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from recserve.engine.config import SchedConfig
from recserve.engine.request import Query, SubBatch


@dataclass
class SchedulerOutput:
    """What one scheduling step hands the executors."""

    cpu: list[SubBatch] = field(default_factory=list)
    """Sub-batches for idle CPU workers, one each, in order."""
    gpu: list[list[Query]] = field(default_factory=list)
    """GPU batches, each a list of whole queries run together."""

    def __bool__(self) -> bool:
        return bool(self.cpu or self.gpu)


class Scheduler:
    """Queues of waiting work and the rule that picks what runs next."""

    def __init__(self, config: SchedConfig, has_cpu: bool = True, has_gpu: bool = False) -> None:
        if not (has_cpu or has_gpu):
            raise ValueError("a scheduler needs CPU workers, a GPU runner, or both")
        self.has_cpu, self.has_gpu = has_cpu, has_gpu
        self.config = config
        self._cpu: deque[Query] = deque()
        self._next_item = 0
        """First item of the head CPU query not dispatched yet."""
        self._gpu: deque[Query] = deque()

    def set_config(self, config: SchedConfig) -> None:
        """Use a new schedule for queries that arrive from now on (queued ones keep their place)."""
        self.config = config

    @property
    def num_waiting(self) -> int:
        """Queries with work not yet dispatched."""
        return len(self._cpu) + len(self._gpu)

    def add(self, query: Query) -> None:
        if self._to_gpu(query.num_items):
            self._gpu.append(query)
        else:
            self._cpu.append(query)

    def _to_gpu(self, num_items: int) -> bool:
        if not self.has_gpu:
            return False
        threshold = self.config.gpu_threshold
        if not self.has_cpu:
            return True
        return threshold is not None and num_items >= threshold

    def schedule(self, now: float, idle_workers: int, gpu_slots: int) -> SchedulerOutput:
        """Sub-batches for up to ``idle_workers`` CPU workers and batches for up to
        ``gpu_slots`` free GPU slots."""
        out = SchedulerOutput()
        while idle_workers > 0 and self._cpu:
            if self._cpu[0].done:  # failed while parts of it were still queued
                self._cpu.popleft()
                self._next_item = 0
                continue
            out.cpu.append(self._next_sub_batch())
            idle_workers -= 1
        while gpu_slots > 0 and self._gpu:
            batch = self._next_gpu_batch(now)
            if batch is None:
                break
            out.gpu.append(batch)
            gpu_slots -= 1
        return out

    def _next_sub_batch(self) -> SubBatch:
        query = self._cpu[0]
        b = self.config.sub_batch_size or query.num_items
        start = self._next_item
        stop = min(start + b, query.num_items)
        if stop == query.num_items:
            self._cpu.popleft()
            self._next_item = 0
        else:
            self._next_item = stop
        return SubBatch(query, start, stop)

    def _next_gpu_batch(self, now: float) -> list[Query] | None:
        """The head GPU query and the queued ones that fit with it, once the batch is full or
        the head has waited ``gpu_max_delay``; ``None`` while it should wait."""
        cap = self.config.gpu_max_batch
        total, count = 0, 0
        for query in self._gpu:
            if count and total + query.num_items > cap:
                break
            total += query.num_items
            count += 1
        full = count < len(self._gpu) or total >= cap
        if not full and now < self._gpu[0].arrival + self.config.gpu_max_delay:
            return None
        return [self._gpu.popleft() for _ in range(count)]

    def next_deadline(self) -> float | None:
        """Clock time at which a waiting GPU batch must go, if one is waiting."""
        if not self._gpu:
            return None
        return self._gpu[0].arrival + self.config.gpu_max_delay

    def drain(self) -> list[Query]:
        """Remove and return every query with work not yet dispatched (for shutdown). A query
        whose first sub-batches already run stays with the workers' answers: it is returned too,
        and its remaining items will never be dispatched."""
        queries = list(self._cpu) + list(self._gpu)
        self._cpu.clear()
        self._gpu.clear()
        self._next_item = 0
        return queries
