"""DeepRecSched on simulated latency models: the climbs find the known optimum."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from recserve.engine.config import SchedConfig
from recserve.engine.deeprecsched import default_grids
from recserve.engine.simulate import PiecewiseLinear, ServiceModel, simulated_measure
from recserve.engine.tuner import Grids, LoadSearch, guided_search, hill_climb
from recserve.loadgen.metrics import LatencyTarget, RunResult
from recserve.loadgen.sizes import QuerySizes

TARGET = LatencyTarget(0.010)


def threshold_measure(limit: float):
    calls = []

    def measure(config: SchedConfig, qps: float) -> RunResult:
        calls.append(qps)
        lat = np.full(100, 0.001 if qps <= limit else 0.02 * qps / limit)  # slower with load
        return RunResult(qps, 100, lat)

    return measure, calls


@pytest.mark.parametrize(("limit", "start"), [(123.4, 10.0), (123.4, 5000.0), (7.0, 7.0)])
def test_load_search_brackets_then_bisects_to_the_limit(limit: float, start: float) -> None:
    measure, calls = threshold_measure(limit)
    found = LoadSearch(rel_tol=0.05).run(measure, SchedConfig(), TARGET, start)
    assert limit / 1.05 <= found.qps <= limit
    assert len(calls) == len(found.probes) <= 12
    assert found.queries == 100 * len(calls)


def test_load_search_reports_zero_when_nothing_meets_the_target() -> None:
    measure, calls = threshold_measure(0.1)
    assert LoadSearch(min_qps=1.0).run(measure, SchedConfig(), TARGET, 50.0).qps == 0.0
    assert min(calls) >= 50.0 / 64 / 2  # gave up at start / max_drop


def test_load_search_gives_up_when_lower_load_does_not_help() -> None:
    def measure(config: SchedConfig, qps: float) -> RunResult:
        return RunResult(qps, 100, np.full(100, 0.050))  # 50 ms whatever the load

    found = LoadSearch().run(measure, SchedConfig(), TARGET, 400.0)
    assert found.qps == 0.0 and len(found.probes) == 2


def test_small_steps_down_do_not_count_as_load_not_mattering() -> None:
    """Past saturation every load queues alike (the runs abort); the search must keep going
    down (in ``shrink`` steps) instead of giving up, and find a limit far below an optimistic
    start."""

    def measure(config: SchedConfig, qps: float) -> RunResult:
        over = qps > 300.0  # overloaded: the queue grows until the run gives up
        lat = np.full(100, 0.040 if over else 0.001)
        return RunResult(qps, 100, lat, duration=1.0, aborted=over)

    found = LoadSearch(growth=1.15, shrink=1.6, max_probes=10).run(
        measure, SchedConfig(), TARGET, 1000.0
    )
    assert 300.0 / 1.05 <= found.qps <= 300.0
    offered = [p.result.offered_qps for p in found.probes]
    assert offered[1] == pytest.approx(1000.0 / 1.6)


def analytic_measure(best_b: int):
    """p95 = a queueing-like curve whose capacity peaks at b = ``best_b`` (log-parabola)."""

    def measure(config: SchedConfig, qps: float) -> RunResult:
        b = config.sub_batch_size or 1024
        capacity = 1000.0 * math.exp(-0.5 * math.log2(b / best_b) ** 2)
        tail = 0.002 / max(1e-9, 1 - qps / capacity) if qps < capacity else math.inf
        return RunResult(qps, 50, np.full(50, tail))

    return measure


@pytest.mark.parametrize("best_b", [16, 64, 256])
def test_hill_climb_finds_the_analytic_optimum(best_b: int) -> None:
    grids = Grids(sub_batch_size=(8, 16, 32, 64, 128, 256, 512, None))
    result = hill_climb(analytic_measure(best_b), TARGET, SchedConfig(), grids, start_qps=100.0)
    assert result.best.config.sub_batch_size == best_b
    climbed = [c.config.sub_batch_size for c in result.climbed]
    after = grids.sub_batch_size[grids.sub_batch_size.index(best_b) + 1 :]
    assert climbed[-1] == after[min(1, len(after) - 1)]  # stopped after two drops (patience 1)
    strict = hill_climb(analytic_measure(best_b), TARGET, SchedConfig(), grids, 100.0, patience=0)
    assert [c.config.sub_batch_size for c in strict.climbed][-1] == after[0]  # at the drop


def test_hill_climb_goes_past_one_bad_value() -> None:
    """A value that misses the target outright (or one noisy probe) does not end the climb."""
    capacity = {8: 80.0, 16: 0.0, 32: 400.0, 64: 900.0, 128: 500.0, None: 100.0}

    def measure(config: SchedConfig, qps: float) -> RunResult:
        ok = qps <= capacity[config.sub_batch_size]
        return RunResult(qps, 100, np.full(100, 0.001 if ok else 0.05), duration=1.0)

    grids = Grids(sub_batch_size=(8, 16, 32, 64, 128, None))
    result = hill_climb(measure, TARGET, SchedConfig(), grids, start_qps=100.0)
    assert result.best.config.sub_batch_size == 64


def test_hill_climb_follows_the_trend_below_the_incumbent() -> None:
    """Offloading a little can serve less than the CPU alone (0, then 101 QPS against 143 on
    wnd, measured): the climb over T goes on while each value beats the one before."""
    capacity = {768: 0.0, 512: 101.0, 384: 120.0, 256: 600.0, 128: 2000.0, 64: 2900.0, 0: 3000.0}

    def measure(config: SchedConfig, qps: float) -> RunResult:
        limit = 143.0 if config.gpu_threshold is None else capacity[config.gpu_threshold]
        ok = qps <= limit
        return RunResult(qps, 100, np.full(100, 0.001 if ok else 0.05), duration=1.0)

    grids = Grids(sub_batch_size=(64,), gpu_threshold=tuple(capacity))
    result = hill_climb(measure, TARGET, SchedConfig(), grids, start_qps=100.0)
    assert result.best.config.gpu_threshold == 0
    assert result.best.qps == pytest.approx(3000.0, rel=0.06)


def test_hill_climb_over_t_counts_its_trend_from_the_first_threshold() -> None:
    """On ncf (H100, 2026-12-07) the CPU alone served 9949 QPS, T=768 8366 and T=512 7346,
    and the climb stopped there: the first T counted as a drop against the CPU's figure.
    Lower thresholds served up to 19334 (T=128, measured by the guided search). The trend
    over T starts at the first T; 384 is not measured there and is set between its
    neighbours."""
    capacity = {768: 8366.0, 512: 7346.0, 384: 7900.0, 256: 9838.0, 128: 19334.0, 64: 19334.0,
                0: 18230.0}  # fmt: skip

    def measure(config: SchedConfig, qps: float) -> RunResult:
        limit = 9949.0 if config.gpu_threshold is None else capacity[config.gpu_threshold]
        ok = qps <= limit
        return RunResult(qps, 100, np.full(100, 0.001 if ok else 0.05), duration=1.0)

    grids = Grids(sub_batch_size=(), gpu_threshold=tuple(capacity))
    cpu = LoadSearch(rel_tol=0.01).run(measure, SchedConfig(sub_batch_size=None), TARGET, 5000.0)
    result = hill_climb(measure, TARGET, SchedConfig(), grids, 5000.0, incumbent=cpu)
    assert result.best.config.gpu_threshold == 128  # ties keep the earlier, simpler value
    assert result.best.qps == pytest.approx(19334.0, rel=0.06)
    strict = hill_climb(measure, TARGET, SchedConfig(), grids, 5000.0, incumbent=cpu, patience=0)
    assert [c.config.gpu_threshold for c in strict.climbed] == [768, 512]  # one drop ends it


class Spent(RuntimeError):
    pass


def test_hill_climb_stops_on_a_spent_budget_with_its_best_so_far() -> None:
    """A measurement that raises one of ``stop_on`` ends the climb with what it found (and
    says why); before anything is found it propagates."""
    capacity = {8: 100.0, 16: 300.0, 32: 200.0, 64: 500.0}
    calls = {"n": 0, "limit": 0}

    def measure(config: SchedConfig, qps: float) -> RunResult:
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            raise Spent("budget spent")
        ok = qps <= capacity[config.sub_batch_size]  # type: ignore[index]
        return RunResult(qps, 100, np.full(100, 0.001 if ok else 0.05), duration=1.0)

    grids = Grids(sub_batch_size=tuple(capacity))
    calls["limit"] = 10**6
    full = hill_climb(measure, TARGET, SchedConfig(), grids, start_qps=50.0)
    assert full.best.config.sub_batch_size == 64 and full.stopped is None
    needed = calls["n"]
    calls.update(n=0, limit=needed // 2)
    part = hill_climb(measure, TARGET, SchedConfig(), grids, 50.0, stop_on=(Spent,))
    assert part.stopped == "budget spent" and "stopped" in part.to_dict()
    assert part.best.config.sub_batch_size in (8, 16) and part.best.qps < full.best.qps
    calls.update(n=0, limit=0)
    with pytest.raises(Spent):
        hill_climb(measure, TARGET, SchedConfig(), grids, 50.0, stop_on=(Spent,))
    calls.update(n=0, limit=needed // 2)
    with pytest.raises(Spent):  # not asked to stop on it: it propagates
        hill_climb(measure, TARGET, SchedConfig(), grids, 50.0)


SIZES = QuerySizes.parse("production").sample(600, np.random.default_rng(0))
# CPU: 0.5 ms per sub-batch + 40 us per item; GPU: 1 ms per batch + 2 us per item. Small b pays
# the fixed cost too often, large b leaves workers idle and queries long: an interior optimum.
SERVICE = ServiceModel(PiecewiseLinear.linear(0.5e-3, 40e-6), PiecewiseLinear.linear(1e-3, 2e-6))
B_GRID = (16, 32, 64, 128, 256, None)
T_GRID = (1025, 768, 512, 384, 256, 128, 0)


def brute_force(measure, configs):
    search = LoadSearch()
    return {c: search.run(measure, c, TARGET, 200.0).qps for c in configs}


def test_hill_climb_on_the_simulated_engine_finds_the_best_b_then_t() -> None:
    measure = simulated_measure(SERVICE, workers=15, sizes=SIZES)
    grids = Grids(sub_batch_size=B_GRID, gpu_threshold=T_GRID)
    result = hill_climb(measure, TARGET, SchedConfig(), grids, start_qps=200.0)

    by_b = brute_force(measure, [SchedConfig(sub_batch_size=b) for b in B_GRID])
    best_b = max(by_b, key=lambda c: by_b[c]).sub_batch_size
    assert best_b not in (
        B_GRID[0],
        B_GRID[-1],
    )  # the optimum is interior: the test means something
    by_t = brute_force(
        measure, [SchedConfig(sub_batch_size=best_b, gpu_threshold=t) for t in T_GRID]
    )
    best = max(by_t, key=lambda c: by_t[c])
    assert best.gpu_threshold not in (T_GRID[0], T_GRID[-1])
    assert result.best.config == best
    assert result.best.qps == pytest.approx(by_t[best])
    assert result.queries < sum(len(g) for g in (B_GRID, T_GRID)) * 12 * len(SIZES)


def test_guided_search_matches_the_climb_with_fewer_real_queries() -> None:
    real = simulated_measure(SERVICE, workers=15, sizes=SIZES, seed=1)
    # The guide's service model is off by 10%, as a calibration would be.
    rough = ServiceModel(
        PiecewiseLinear.linear(0.55e-3, 44e-6), PiecewiseLinear.linear(0.9e-3, 1.8e-6)
    )
    guide = simulated_measure(rough, workers=15, sizes=SIZES, seed=2)
    grids = Grids(sub_batch_size=B_GRID, gpu_threshold=T_GRID)
    climb = hill_climb(real, TARGET, SchedConfig(), grids, start_qps=200.0)
    guided = guided_search(real, guide, TARGET, SchedConfig(), grids, start_qps=200.0)
    assert guided.best.qps >= 0.97 * climb.best.qps
    assert guided.queries * 3 < climb.queries
    assert all(c.predicted_qps is not None for c in guided.climbed[:2])  # the verified ones


def test_guided_search_measures_more_than_one_offload_threshold() -> None:
    """The simulation leaves out contention between CPU workers and the GPU runner, so it can
    favour one threshold by far (wnd on the H200: 14258 QPS predicted at T=128, 2672
    measured, while T=0 measured 5438). The configurations it measures are the best of two
    thresholds, not two delays of the same one."""
    predicted = {128: 14000.0, 64: 9000.0, 0: 6000.0, 256: 3000.0}
    real = {128: 2672.0, 64: 5207.0, 0: 5438.0, 256: 400.0}

    def table(capacity: dict[int, float], bonus: float) -> Callable[..., RunResult]:
        def measure(config: SchedConfig, qps: float) -> RunResult:
            t = config.gpu_threshold
            limit = 100.0 if t is None else capacity[t]
            limit += bonus * 1e3 * (config.gpu_max_delay or 0.0)  # a delay helps a little
            ok = qps <= limit
            return RunResult(qps, 100, np.full(100, 0.001 if ok else 0.05), duration=1.0)

        return measure

    grids = Grids(sub_batch_size=(64,), gpu_threshold=(256, 128, 64, 0), gpu_max_delay=(5e-4, 2e-3))
    guided = guided_search(
        table(real, 0.0), table(predicted, 10.0), TARGET, SchedConfig(), grids, start_qps=100.0
    )
    assert [c.config.gpu_threshold for c in guided.climbed[:2]] == [128, 64]
    # then the polish walks T from the best measured (64) one step on: T=0 serves more
    assert guided.climbed[2].config.gpu_threshold == 0
    assert guided.best.config.gpu_threshold == 0 and guided.best.qps > 5100
    assert guided.best.config.gpu_max_delay == 0.0  # a delay gains nothing for real here


def test_guided_search_polish_stops_where_no_step_gains() -> None:
    """The polish walks each way from the best, one step past the first that does not gain
    (``patience``), and keeps the best; with nothing better around it, the verified best
    stands."""
    real = {256: 1000.0, 128: 3000.0, 64: 2000.0, 0: 1500.0}
    seen: list[int | None] = []

    def measure(config: SchedConfig, qps: float) -> RunResult:
        seen.append(config.gpu_threshold)
        limit = 100.0 if config.gpu_threshold is None else real[config.gpu_threshold]
        ok = qps <= limit
        return RunResult(qps, 100, np.full(100, 0.001 if ok else 0.05), duration=1.0)

    grids = Grids(sub_batch_size=(64,), gpu_threshold=(256, 128, 64, 0))
    guided = guided_search(measure, measure, TARGET, SchedConfig(), grids, 100.0, verify=1)
    assert guided.best.config.gpu_threshold == 128
    assert [c.config.gpu_threshold for c in guided.climbed] == [128, 64, 0, 256]
    impatient = guided_search(
        measure, measure, TARGET, SchedConfig(), grids, 100.0, verify=1, patience=0
    )
    assert [c.config.gpu_threshold for c in impatient.climbed] == [128, 64, 256]
    none = guided_search(measure, measure, TARGET, SchedConfig(), grids, 100.0, verify=1, polish=0)
    assert [c.config.gpu_threshold for c in none.climbed] == [128]


def test_guided_search_polish_looks_past_a_step_that_does_not_gain() -> None:
    """ncf on the H200 (bench_serve.json, 75fdb5e): the climb measured 8574 QPS at T=0 and at
    T=64, and 11120 at T=128. A polish that stops at the first step without a gain stays at
    T=0; one step of patience reaches T=128, and then the delay's grid is walked too."""
    real = {512: 6612.0, 256: 6905.0, 128: 11120.0, 64: 8574.0, 0: 8574.0}
    predicted = {512: 5000.0, 256: 6000.0, 128: 7000.0, 64: 9000.0, 0: 9500.0}

    def table(capacity: dict[int, float], delay_gain: float) -> Callable[..., RunResult]:
        def measure(config: SchedConfig, qps: float) -> RunResult:
            t = config.gpu_threshold
            limit = 100.0 if t is None else capacity[t]
            limit *= 1 + delay_gain * (config.gpu_max_delay or 0.0) * 1e3
            ok = qps <= limit
            return RunResult(qps, 100, np.full(100, 0.001 if ok else 0.05), duration=1.0)

        return measure

    grids = Grids(
        sub_batch_size=(256,), gpu_threshold=(512, 256, 128, 64, 0), gpu_max_delay=(5e-4, 2e-3)
    )
    real_measure, guide = table(real, 0.1), table(predicted, 0.0)
    args = (real_measure, guide, TARGET, SchedConfig(), grids, 100.0)
    guided = guided_search(*args, verify=1)
    assert guided.climbed[0].config.gpu_threshold == 0  # the simulation's favourite
    assert guided.best.config.gpu_threshold == 128
    assert guided.best.config.gpu_max_delay == 5e-4  # the delay's walk came after
    assert guided.best.qps > 1.04 * 11120 / 1.05
    assert guided_search(*args, verify=1, patience=0).best.config.gpu_threshold == 0


def test_the_delay_is_not_climbed_when_nothing_goes_to_the_gpu() -> None:
    grids = Grids(sub_batch_size=(16, 64), gpu_threshold=(512,), gpu_max_delay=(1e-3, 2e-3))

    def measure(config: SchedConfig, qps: float) -> RunResult:
        ok = config.gpu_threshold is None and qps <= 100  # offloading only hurts here
        return RunResult(qps, 50, np.full(50, 0.001 if ok else 0.02 * qps / 100))

    result = hill_climb(measure, TARGET, SchedConfig(), grids, start_qps=50.0)
    assert not result.best.config.uses_gpu
    assert all(c.config.gpu_max_delay == 0.0 for c in result.climbed)


def test_hill_climb_reuses_known_configurations() -> None:
    """A configuration measured before (a static baseline on the grid) is not measured again:
    the climb takes that result, so tuned and static are read off the same probes."""
    calls: list[int | None] = []
    capacity = {16: 300.0, 32: 500.0, 64: 700.0, 128: 400.0, None: 100.0}

    def measure(config: SchedConfig, qps: float) -> RunResult:
        calls.append(config.sub_batch_size)
        ok = qps <= capacity[config.sub_batch_size]
        return RunResult(qps, 100, np.full(100, 0.001 if ok else 0.05), duration=1.0)

    search = LoadSearch()
    static = search.run(measure, SchedConfig(sub_batch_size=64), TARGET, 100.0)
    calls.clear()
    grids = Grids(sub_batch_size=(16, 32, 64, 128, None))
    result = hill_climb(
        measure, TARGET, SchedConfig(), grids, 100.0, search, known={static.config: static}
    )
    assert 64 not in calls and result.best is static
    assert result.best.qps >= static.qps


def test_the_coalescing_cap_is_climbed_after_the_threshold() -> None:
    """Joining GPU queries can cost more than it saves (megabyte queries): the climb tries
    the cap down to 1 (every query alone) and keeps the best; CPU-only configurations are
    not climbed over it."""
    capacity = {2048: 400.0, 512: 600.0, 1: 900.0}
    seen: list[SchedConfig] = []

    def measure(config: SchedConfig, qps: float) -> RunResult:
        seen.append(config)
        limit = capacity[config.gpu_max_batch] if config.uses_gpu else 100.0
        ok = qps <= limit
        return RunResult(qps, 100, np.full(100, 0.001 if ok else 0.05), duration=1.0)

    grids = Grids(sub_batch_size=(16,), gpu_threshold=(0,), gpu_max_batch=(2048, 512, 1))
    result = hill_climb(measure, TARGET, SchedConfig(), grids, start_qps=100.0)
    assert result.best.config.gpu_threshold == 0
    assert result.best.config.gpu_max_batch == 1
    assert 0.9 * 900 <= result.best.qps <= 900
    assert all(c.gpu_max_batch == SchedConfig().gpu_max_batch for c in seen if not c.uses_gpu)
    assert [c.config.gpu_max_batch for c in result.climbed if c.config.uses_gpu] == [2048, 512, 1]


def test_default_grids_climb_the_cap_only_with_a_gpu() -> None:
    assert default_grids(1024, gpu=False).gpu_max_batch == ()
    caps = default_grids(1024, gpu=True).gpu_max_batch
    assert caps[0] == SchedConfig().gpu_max_batch and 1 in caps


def test_hill_climb_starts_from_the_best_baseline_and_goes_up_first() -> None:
    """With the static baselines measured (``known``), the climb starts at the best of them,
    climbs up the grid, then down: values the baselines rule out are reached last, and the
    optimum above them first (a spent budget then stops the climb where the gains are)."""
    grid = (8, 16, 32, 64, 128, 256, 512, None)
    inner = analytic_measure(256)
    measured: list[int | None] = []

    def measure(config: SchedConfig, qps: float) -> RunResult:
        if not measured or measured[-1] != config.sub_batch_size:
            measured.append(config.sub_batch_size)
        return inner(config, qps)

    search = LoadSearch()
    known = {c: search.run(inner, c, TARGET, 100.0) for c in
             (SchedConfig(sub_batch_size=b) for b in (32, 64, None))}  # fmt: skip
    result = hill_climb(
        measure, TARGET, SchedConfig(), Grids(sub_batch_size=grid), 100.0, search, known=known
    )
    assert result.best.config.sub_batch_size == 256
    # up from b=64 to two drops (512, then the known whole-query baseline), then down past
    # 32 (known) while nothing improves; no baseline is measured again
    assert measured[:3] == [128, 256, 512] and set(measured[3:]) <= {16, 8}
    assert [c.config.sub_batch_size for c in result.climbed][:2] == [64, 128]
    plain = hill_climb(inner, TARGET, SchedConfig(), Grids(sub_batch_size=grid), 100.0, search)
    assert plain.best.config.sub_batch_size == 256  # without baselines: the grid in order
    assert [c.config.sub_batch_size for c in plain.climbed][:2] == [8, 16]
