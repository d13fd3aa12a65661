"""DeepRecSched: find the schedule with the most queries per second under a tail-latency target.

Two searches over the same knobs (CPU sub-batch size b, then GPU threshold T, then the GPU
coalescing delay), both built on :class:`LoadSearch`, which finds one configuration's
sustainable load by adjusting the offered QPS:

- :func:`hill_climb` is DeepRecSys's: climb each knob's grid in order, finding every
  configuration's sustainable load from the same cold start, and stop a knob at its first drop.
- :func:`guided_search` is recserve's: rank every configuration of the grids by the sustainable
  load a simulation predicts (the real scheduler on a virtual clock with measured service
  times), then measure only the best few for real, each search starting at its prediction.

A *measure* runs one configuration at one offered load and returns a
:class:`~recserve.loadgen.metrics.RunResult`; it may drive the real engine or a simulation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from recserve.engine.config import SchedConfig
from recserve.loadgen.metrics import LatencyTarget, RunResult

Measure = Callable[[SchedConfig, float], RunResult]


@dataclass(frozen=True)
class Probe:
    """One measured point: a configuration at an offered load."""

    config: SchedConfig
    result: RunResult
    passed: bool

    @property
    def qps(self) -> float:
        return self.result.offered_qps


@dataclass
class ConfigResult:
    """A configuration's sustainable (latency-bounded) QPS and the probes that found it."""

    config: SchedConfig
    qps: float
    probes: list[Probe] = field(default_factory=list)
    predicted_qps: float | None = None

    @property
    def queries(self) -> int:
        return sum(p.result.sent for p in self.probes)

    def to_dict(self) -> dict[str, object]:
        return {
            "config": self.config.to_dict(),
            "label": self.config.label(),
            "qps": round(self.qps, 3),
            "predicted_qps": None if self.predicted_qps is None else round(self.predicted_qps, 3),
            "probes": [{"passed": p.passed, **p.result.to_dict()} for p in self.probes],
        }


@dataclass
class TuneResult:
    """What a search chose, what it climbed, and what it cost."""

    method: str
    target: LatencyTarget
    best: ConfigResult
    climbed: list[ConfigResult]
    seconds: float
    extra_queries: int = 0
    """Queries spent outside the probes (the guided search's calibration)."""
    stopped: str | None = None
    """Why the search ended before its grids did (a time budget), or None."""

    @property
    def queries(self) -> int:
        return self.extra_queries + sum(c.queries for c in self.climbed)

    @property
    def probes(self) -> int:
        return sum(len(c.probes) for c in self.climbed)

    def to_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "target": str(self.target),
            "best": self.best.to_dict(),
            "qps": round(self.best.qps, 3),
            "queries": self.queries,
            "probes": self.probes,
            "seconds": round(self.seconds, 3),
            "climbed": [c.to_dict() for c in self.climbed],
        } | ({"stopped": self.stopped} if self.stopped else {})


@dataclass(frozen=True)
class LoadSearch:
    """The highest offered QPS at which a configuration meets the target.

    From a starting load, multiply by ``growth`` while the target is met (or divide by
    ``shrink``, default ``growth``, while it is missed) to bracket the limit, then bisect the
    bracket in log space until its ends are within ``rel_tol``. Reports the highest load that
    met the target (0 if none did, down to ``start_qps / max_drop``: a configuration that far
    off is not worth slow probes).
    """

    rel_tol: float = 0.05
    growth: float = 2.0
    max_probes: int = 12
    min_qps: float = 0.5
    max_drop: float = 64.0
    shrink: float | None = None

    def run(
        self, measure: Measure, config: SchedConfig, target: LatencyTarget, start_qps: float
    ) -> ConfigResult:
        found = ConfigResult(config, 0.0)

        def ok(qps: float) -> bool:
            result = measure(config, qps)
            probe = Probe(config, result, result.meets(target))
            found.probes.append(probe)
            return probe.passed

        lo, hi, qps = 0.0, math.inf, start_qps
        floor = max(self.min_qps, start_qps / self.max_drop)
        while len(found.probes) < self.max_probes and (lo == 0.0 or hi == math.inf):
            if ok(qps):
                lo, qps = qps, qps * self.growth
            else:
                hi, qps = qps, qps / (self.shrink or self.growth)
                if lo == 0.0 and (qps < floor or self._load_does_not_matter(found, target)):
                    break
        while lo > 0.0 and hi < math.inf and hi / lo > 1 + self.rel_tol:
            if len(found.probes) >= self.max_probes:
                break
            mid = math.sqrt(lo * hi)
            if ok(mid):
                lo = mid
            else:
                hi = mid
        found.qps = lo
        return found

    @staticmethod
    def _load_does_not_matter(found: ConfigResult, target: LatencyTarget) -> bool:
        """Two failed probes in a row, the lower load kept up with (answers at 90% of the
        offered rate or more) and no faster by 10%: the configuration's own service time misses
        the target, and lower loads would only make slower probes. (An overloaded probe says
        nothing: past saturation every load queues alike.)"""
        if len(found.probes) < 2 or found.probes[-2].passed:
            return False
        low = found.probes[-1].result
        if low.duration > 0 and low.achieved_qps < 0.9 * low.offered_qps:
            return False  # it fell behind: overloaded, not too slow
        before, now = (p.result.answered_tail(target.percentile) for p in found.probes[-2:])
        return now > target.seconds and now >= 0.9 * before


@dataclass(frozen=True)
class Grids:
    """The values each knob may take, climbed in this order: b, then T, then the GPU
    coalescing cap, then the GPU delay."""

    sub_batch_size: Sequence[int | None] = (16, 32, 64, 128, 256, 512, None)
    gpu_threshold: Sequence[int | None] = ()
    """Climbed from the first value on; start high (little goes to the GPU) and go down."""
    gpu_max_batch: Sequence[int] = ()
    """The coalescing cap (items; 1: every GPU query alone). Joining queries amortises the
    runner's per-batch work, but a join of megabyte queries costs more host copying than it
    saves (dlrm-rmc2 on the H200), so it is measured, not assumed."""
    gpu_max_delay: Sequence[float] = ()

    def stages(self) -> list[tuple[str, Sequence[object]]]:
        stages: list[tuple[str, Sequence[object]]] = [
            ("sub_batch_size", self.sub_batch_size),
            ("gpu_threshold", self.gpu_threshold),
            ("gpu_max_batch", self.gpu_max_batch),
            ("gpu_max_delay", self.gpu_max_delay),
        ]
        return [(name, grid) for name, grid in stages if grid]


def hill_climb(
    measure: Measure,
    target: LatencyTarget,
    base: SchedConfig,
    grids: Grids,
    start_qps: float,
    search: LoadSearch | None = None,
    incumbent: ConfigResult | None = None,
    patience: int = 1,
    known: Mapping[SchedConfig, ConfigResult] | None = None,
    stop_on: tuple[type[BaseException], ...] = (),
) -> TuneResult:
    """DeepRecSched's hill climb: for each knob in turn, try its values in order, each from the
    same cold start load, until the sustainable QPS falls from one value to the next; keep the
    best and go on. The trend, not the best so far, decides: offloading only the largest
    queries can serve less than the CPU alone did (the CPU is still the limit, and the GPU
    runner takes some of its cores) while each lower T serves more, up to well past the CPU's
    best (measured on wnd: 0, then 101 QPS, against 143 for the CPU alone). So the climb over
    T from a CPU-only incumbent counts its trend from the first T, not from the CPU's figure
    (on ncf, T=768 and T=512 both measured below the CPU alone, and T=128 twice its QPS).

    ``incumbent`` is a configuration already measured (e.g. the CPU-only climb's result when
    climbing T next): the climb starts from it and compares against it. ``patience`` more
    values are tried after a drop before the knob is left (one noisy probe, or a value that
    misses the target outright, must not end the climb). ``known`` holds configurations
    already measured under the same target (e.g. the static baselines, which sit on the b
    grid): the climb takes their result instead of measuring them again, so each
    configuration is measured once and the tuned result is read off the same probes as the
    baseline it is compared with. A measurement that raises one of ``stop_on`` (a spent time
    budget) ends the climb with the best found so far, its reason in ``stopped``; with nothing
    found yet it propagates."""
    search = search or LoadSearch()
    known = known or {}
    began = time.perf_counter()
    climbed: list[ConfigResult] = []
    best = incumbent
    config = incumbent.config if incumbent is not None else base
    for name, grid in grids.stages():
        if name in ("gpu_max_batch", "gpu_max_delay") and not config.uses_gpu:
            continue  # nothing is offloaded, so there is nothing to coalesce
        seen: set[SchedConfig] = set()
        here = {v: r for v in grid if (r := known.get(config.with_(**{name: v}))) is not None}
        # The first offload threshold changes the regime (some queries leave the CPU), so its
        # trend starts at the first value measured, not at the CPU-only incumbent's figure.
        first_offload = name == "gpu_threshold" and not config.uses_gpu
        for leg in _legs(grid, here):
            drops = 0
            last = best.qps if best is not None and not first_offload else None
            for value in leg:
                candidate = config.with_(**{name: value})
                if candidate in seen or (best is not None and candidate == best.config):
                    if candidate in known:  # a leg's starting point: the trend starts there
                        last = known[candidate].qps
                    continue
                seen.add(candidate)
                try:
                    found = known.get(candidate) or search.run(
                        measure, candidate, target, start_qps
                    )
                except stop_on as err:
                    if best is None:
                        raise
                    elapsed = time.perf_counter() - began
                    return TuneResult(
                        "hill_climb", target, best, climbed, elapsed, stopped=str(err)
                    )
                climbed.append(found)
                if best is None or found.qps > best.qps:  # ties keep the earlier, simpler value
                    best = found
                if last is not None and found.qps < last:  # the knob's trend turned down
                    drops += 1
                    if drops > patience:
                        break
                else:
                    drops = 0
                last = found.qps
        assert best is not None
        config = best.config
    assert best is not None, "empty grids"
    return TuneResult("hill_climb", target, best, climbed, time.perf_counter() - began)


def _legs(grid: Sequence[Any], known: Mapping[Any, ConfigResult]) -> list[Sequence[Any]]:
    """The order a knob's values are climbed in. Without measured values on the grid: the grid
    in order. With some (``known``: value -> result, e.g. the static baselines): from the best
    of them up the grid, then from it down, so the climb starts where the baselines left off
    instead of re-walking values they already rule out (on a CPU, the small batch sizes are
    the slowest to probe)."""
    if not known:
        return [grid]
    values = list(grid)
    start = values.index(max(known, key=lambda v: known[v].qps))
    return [values[start:], values[start::-1]]


VERIFY_SEARCH = LoadSearch(rel_tol=0.05, growth=1.15, shrink=1.6, max_probes=10)
"""How a configuration whose load is roughly known is measured: from that load, up in narrow
steps, down in wide ones (:func:`guided_search`'s verifications and polish, and measuring a
search's best again)."""


def _to_verify(predicted: Mapping[SchedConfig, float], verify: int) -> list[SchedConfig]:
    """The ``verify`` configurations to measure: the best predicted of each offload threshold
    first (best threshold first), then the next best predictions."""
    ranked = sorted(predicted, key=lambda c: predicted[c], reverse=True)
    chosen: list[SchedConfig] = []
    seen: set[int | None] = set()
    for config in ranked:  # the best of each threshold
        if len(chosen) < verify and config.gpu_threshold not in seen:
            seen.add(config.gpu_threshold)
            chosen.append(config)
    chosen += [c for c in ranked if c not in chosen][: verify - len(chosen)]
    return chosen


def guided_search(
    measure: Measure,
    predict: Measure,
    target: LatencyTarget,
    base: SchedConfig,
    grids: Grids,
    start_qps: float,
    verify: int = 2,
    calibration_queries: int = 0,
    calibration_seconds: float = 0.0,
    search: LoadSearch | None = None,
    polish: int = 5,
    patience: int = 1,
) -> TuneResult:
    """recserve's search: predict every configuration's sustainable load by simulation, then
    measure the ``verify`` most promising ones for real, each starting at its prediction, and
    polish the best of them: up to ``polish`` more measurements walk its offload threshold,
    then its coalescing delay, one grid step at a time while that helps, going ``patience``
    steps past one that does not (the simulation ranks configurations well but can be a step
    off: on dlrm-rmc1 it chose T=64 where the climb measured more at T=0; and one noisy
    measurement must not hide the next step: on ncf the climb measured 8574 QPS at T=64 and
    11120 at T=128, beside 8574 at T=0).

    The prediction climbs like :func:`hill_climb` but visits every value of each knob (the
    simulation is cheap, so no early stop is needed to save time), holding the other knobs at
    the best found so far. The configurations measured differ in where the work goes (T)
    where the predictions allow it: the simulation leaves out the contention between CPU
    workers and the GPU runner's host work on shared cores, so it favours splitting the load
    between them (on the H200 it predicted 14258 QPS for wnd at T=128, which measured 2672,
    while T=0 measured 5438); measuring the best of another T bounds that error. Real
    measurements go up in narrow steps (``growth`` 1.15) and down
    in wide ones (``shrink`` 1.6): a prediction is usually close, but when the simulation
    misses some contention it can be well above the real limit.
    """
    began = time.perf_counter()
    sim_search = LoadSearch(rel_tol=0.02, growth=2.0, max_probes=16)
    predicted: dict[SchedConfig, float] = {}
    anchor = base
    for name, grid in grids.stages():
        for value in grid:
            candidate = anchor.with_(**{name: value})
            if candidate not in predicted:
                start = max(predicted.values(), default=0.0) or start_qps
                predicted[candidate] = sim_search.run(predict, candidate, target, start).qps
        anchor = max(predicted, key=lambda c: predicted[c])
    ranked = _to_verify(predicted, verify)
    # Up in small steps (the prediction is usually close), down in larger ones (when it is
    # not, the simulation missed some contention and the limit can be far below).
    search = search or VERIFY_SEARCH
    climbed = []
    for config in ranked:
        found = search.run(measure, config, target, max(predicted[config], search.min_qps))
        found.predicted_qps = predicted[config]
        climbed.append(found)
    best = max(climbed, key=lambda c: c.qps)
    best = _polish(measure, target, grids, best, climbed, polish, search, predicted, patience)
    seconds = time.perf_counter() - began + calibration_seconds
    return TuneResult("guided", target, best, climbed, seconds, calibration_queries)


def _polish(
    measure: Measure,
    target: LatencyTarget,
    grids: Grids,
    best: ConfigResult,
    climbed: list[ConfigResult],
    budget: int,
    search: LoadSearch,
    predicted: Mapping[SchedConfig, float],
    patience: int = 1,
) -> ConfigResult:
    """Walk ``best``'s threshold, then its delay, along their grids (one step, then on while
    each step gains, and ``patience`` steps past one that does not; the other direction only
    when the first did not gain), measuring at most ``budget`` configurations (appended to
    ``climbed``)."""
    tried = {c.config for c in climbed}
    for name, grid in grids.stages():
        if name not in ("gpu_threshold", "gpu_max_delay") or not best.config.uses_gpu:
            continue
        current = getattr(best.config, name)
        values = list(grid) if current in grid else sorted({*grid, current})  # type: ignore[type-var]
        at = values.index(current)
        for step in (1, -1):
            j, gained, misses = at + step, False, 0
            while 0 <= j < len(values) and budget > 0:
                candidate = best.config.with_(**{name: values[j]})
                j += step
                if candidate not in tried:
                    tried.add(candidate)
                    budget -= 1
                    found = search.run(measure, candidate, target, max(best.qps, search.min_qps))
                    found.predicted_qps = predicted.get(candidate)
                    climbed.append(found)
                    if found.qps > best.qps:
                        best, gained, misses = found, True, 0
                        continue
                misses += 1  # no gain, or measured already (no better than the best)
                if misses > patience:
                    break
            if gained:
                break
    return best
