"""The engine on a virtual clock: the real scheduler and core, with simulated executors.

Service times come from a :class:`ServiceModel` (seconds per CPU sub-batch and per GPU batch
as functions of items), measured on hardware (:func:`recserve.engine.calibrate`) or written
down for a test. Arrivals and sizes are the load generator's, so a simulated run and a real
one see the same query stream. The tuner's guided search uses this to rank configurations
without sending real queries.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from recserve.engine.config import SchedConfig
from recserve.engine.core import EngineCore
from recserve.engine.interface import Overloaded
from recserve.engine.request import Completion, Query, SubBatch
from recserve.engine.scheduler import Scheduler
from recserve.loadgen.arrivals import ArrivalProcess
from recserve.loadgen.metrics import RunResult


class VirtualClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class PiecewiseLinear:
    """Seconds as a piecewise-linear function of items, extrapolated linearly past the ends."""

    items: tuple[float, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.items) != len(self.seconds) or not self.items:
            raise ValueError("items and seconds must be non-empty and of equal length")
        if list(self.items) != sorted(self.items):
            raise ValueError("items must be increasing")

    @classmethod
    def linear(cls, fixed: float, per_item: float) -> PiecewiseLinear:
        return cls((0.0, 1.0), (fixed, fixed + per_item))

    def __call__(self, n: float) -> float:
        xs, ys = self.items, self.seconds
        if len(xs) == 1:
            return ys[0] * n / xs[0] if xs[0] else ys[0]
        if n <= xs[0] or n >= xs[-1]:
            i = 0 if n <= xs[0] else len(xs) - 2
            slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
            return max(0.0, ys[i] + slope * (n - xs[i]))
        return float(np.interp(n, xs, ys))

    def to_dict(self) -> dict[str, list[float]]:
        return {"items": list(self.items), "seconds": list(self.seconds)}


@dataclass(frozen=True)
class ServiceModel:
    """How long work takes: one CPU worker on a sub-batch, the GPU on a (coalesced) batch, and
    the engine's loop on each dispatch of either."""

    cpu: PiecewiseLinear
    gpu: PiecewiseLinear | None = None
    host_cpu: float = 0.0
    """Seconds of the engine's loop per CPU sub-batch it dispatches (and collects)."""
    host_gpu: float = 0.0
    """The same per GPU batch. The loop is one thread that serves both kinds, one at a time,
    so a schedule that splits the load between the CPU workers and the GPU does not get the
    sum of what each serves alone: without it the simulation predicted 14258 QPS for wnd at
    T=128 on the H200, where 2672 was measured."""


class _Host:
    """The engine's loop: dispatches pass through it one after another."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self._free_at = 0.0

    def after_dispatch(self, seconds: float) -> float:
        """When the loop is done with one more unit of work, of ``seconds``, submitted now."""
        if seconds <= 0.0:
            return self.clock.now
        self._free_at = max(self.clock.now, self._free_at) + seconds
        return self._free_at


class _SimExecutor:
    """Busy-until bookkeeping shared by the simulated CPU pool and GPU runner."""

    def __init__(
        self, clock: VirtualClock, slots: int, host: _Host | None, host_seconds: float
    ) -> None:
        self.clock = clock
        self.slots = slots
        self.host, self.host_seconds = host or _Host(clock), host_seconds
        """The engine's loop (shared by both executors) and its seconds per dispatch here."""
        self.events: list[tuple[float, int, list[Completion]]] = []
        self._seq = 0

    def _dispatched(self) -> float:
        """When the loop has dispatched one more unit of work of this executor's."""
        return self.host.after_dispatch(self.host_seconds)

    def _push(self, at: float, done: list[Completion]) -> None:
        self._seq += 1
        heapq.heappush(self.events, (at, self._seq, done))

    def next_event(self) -> float:
        return self.events[0][0] if self.events else math.inf

    def poll(self) -> list[Completion]:
        out: list[Completion] = []
        while self.events and self.events[0][0] <= self.clock.now:
            out.extend(heapq.heappop(self.events)[2])
        return out


class SimCpuPool(_SimExecutor):
    """``workers`` identical CPU workers, one sub-batch each at a time."""

    def __init__(
        self,
        clock: VirtualClock,
        workers: int,
        seconds: PiecewiseLinear,
        host: _Host | None = None,
        host_seconds: float = 0.0,
    ) -> None:
        super().__init__(clock, workers, host, host_seconds)
        self.seconds = seconds

    def idle_workers(self) -> int:
        return self.slots - len(self.events)

    def dispatch(self, work: list[SubBatch]) -> None:
        for sub in work:
            done = Completion(sub.query, sub.start, sub.stop)
            self._push(self._dispatched() + self.seconds(sub.num_items), [done])


class SimGpu(_SimExecutor):
    """One GPU that runs batches back to back; ``inflight`` may be queued on it at once."""

    def __init__(
        self,
        clock: VirtualClock,
        seconds: PiecewiseLinear,
        inflight: int = 2,
        host: _Host | None = None,
        host_seconds: float = 0.0,
    ) -> None:
        super().__init__(clock, inflight, host, host_seconds)
        self.seconds = seconds
        self._free_at = 0.0

    def free_slots(self) -> int:
        return self.slots - len(self.events)

    def dispatch(self, queries: list[Query]) -> None:
        start = max(self._dispatched(), self._free_at)
        self._free_at = start + self.seconds(sum(q.num_items for q in queries))
        self._push(self._free_at, [Completion(q, 0, q.num_items) for q in queries])


@dataclass
class SimResult:
    """Latencies (seconds) of the answered queries of one simulated run, in arrival order."""

    latencies: np.ndarray
    rejected: int
    duration: float


def simulate(
    config: SchedConfig,
    service: ServiceModel,
    arrivals: Sequence[float] | np.ndarray,
    sizes: Sequence[int] | np.ndarray,
    workers: int,
    capacity: int = 1024,
    gpu_inflight: int = 2,
) -> SimResult:
    """Run a query stream through the real scheduler and core on a virtual clock.

    ``arrivals`` are times in seconds (non-decreasing) and ``sizes`` items per query; the GPU is
    present when ``service.gpu`` is set. Refused queries are counted, not simulated.
    """
    clock = VirtualClock()
    host = _Host(clock)  # one loop for both executors
    cpu = SimCpuPool(clock, workers, service.cpu, host, service.host_cpu) if workers > 0 else None
    gpu = (
        SimGpu(clock, service.gpu, gpu_inflight, host, service.host_gpu)
        if service.gpu is not None
        else None
    )
    core = EngineCore(
        Scheduler(config, has_cpu=cpu is not None, has_gpu=gpu is not None),
        cpu,
        gpu,
        clock,
        capacity,
    )
    executors = [e for e in (cpu, gpu) if e is not None]
    queries: list[Query] = []
    rejected, i, n = 0, 0, len(arrivals)
    while True:
        t_arrival = float(arrivals[i]) if i < n else math.inf
        t_event = min(e.next_event() for e in executors)
        deadline = core.next_deadline()
        t_deadline = deadline if deadline is not None and deadline > clock.now else math.inf
        t = min(t_arrival, t_event, t_deadline)
        if t == math.inf:
            break
        clock.now = t
        while i < n and arrivals[i] <= t:
            try:
                queries.append(core.admit(int(sizes[i])))
            except Overloaded:
                rejected += 1
            i += 1
        core.step()
    latencies = np.array([q.latency for q in queries])
    return SimResult(latencies, rejected, clock.now)


def simulated_measure(
    service: ServiceModel,
    workers: int,
    sizes: np.ndarray,
    seed: int = 0,
    capacity: int = 1024,
    burstiness: float = 1.0,
) -> Callable[[SchedConfig, float], RunResult]:
    """A tuner *measure* backed by :func:`simulate`. Every probe replays the same query stream
    (same sizes, same gaps scaled to the offered load): common random numbers, so configurations
    are compared on identical traffic."""
    unit_gaps = ArrivalProcess(1.0, burstiness).gaps(len(sizes), np.random.default_rng(seed))
    unit_times = np.cumsum(unit_gaps)

    def measure(config: SchedConfig, qps: float) -> RunResult:
        res = simulate(config, service, unit_times / qps, sizes, workers, capacity)
        return RunResult(
            qps, len(sizes), res.latencies, rejected=res.rejected, duration=res.duration
        )

    return measure
