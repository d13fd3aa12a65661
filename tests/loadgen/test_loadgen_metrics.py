"""Latency targets, tails that count lost queries, latency-bounded throughput."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.loadgen.metrics import (
    LatencySummary,
    LatencyTarget,
    RunResult,
    latency_bounded_qps,
    tail_latency,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10ms", 0.01), ("2.5 ms", 0.0025), ("0.03s", 0.03), ("500us", 5e-4), ("25", 0.025)],
)
def test_target_parsing(text: str, seconds: float) -> None:
    assert LatencyTarget.parse(text).seconds == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ms", "10 min", "-3ms"])
def test_bad_targets_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        LatencyTarget.parse(text)


def test_lost_queries_count_as_infinitely_slow() -> None:
    lat = np.full(96, 0.001)
    assert tail_latency(lat, 95) == 0.001
    assert tail_latency(lat, 95, missing=4) == 0.001  # 4 of 100 lost: p95 still met
    assert tail_latency(lat, 95, missing=6) == np.inf  # 6 of 102 lost: p95 is not


def test_run_result_meets_target_only_without_too_many_losses() -> None:
    target = LatencyTarget(0.010)
    ok = RunResult(100.0, 100, np.full(100, 0.005))
    assert ok.meets(target)
    assert not RunResult(100.0, 100, np.full(90, 0.005), rejected=10).meets(target)
    assert not RunResult(100.0, 100, np.full(100, 0.005), aborted=True).meets(target)
    assert ok.summary().p95 == pytest.approx(0.005)


def test_latency_bounded_qps_stops_at_the_first_miss() -> None:
    offered = [100, 200, 400, 800, 300]
    tails = [0.002, 0.004, 0.020, 0.009, 0.006]
    assert latency_bounded_qps(offered, tails, 0.010) == 300
    assert latency_bounded_qps([100], [0.5], 0.010) == 0.0


def test_summary_percentiles() -> None:
    s = LatencySummary.of(np.arange(1, 101) / 1000)
    assert (s.count, s.max) == (100, 0.1)
    assert s.p50 == pytest.approx(0.0505) and s.p99 == pytest.approx(0.09901)
    assert np.isnan(LatencySummary.of([]).p95)
