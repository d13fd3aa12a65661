"""Arrival gaps and query sizes: the statistics WORKLOADS.md specifies."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.loadgen.arrivals import ArrivalProcess
from recserve.loadgen.sizes import QuerySizes

N = 200_000


def test_exponential_gaps_have_poisson_mean_and_variance() -> None:
    gaps = ArrivalProcess(qps=500.0).gaps(N, np.random.default_rng(1))
    mean = 1 / 500
    assert gaps.mean() == pytest.approx(mean, rel=0.01)
    assert gaps.var() == pytest.approx(mean**2, rel=0.03)  # exponential: variance = mean^2
    assert np.mean(gaps < mean) == pytest.approx(1 - np.exp(-1), abs=0.005)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_gaps_keep_the_rate_and_set_the_burstiness(cv: float) -> None:
    gaps = ArrivalProcess(qps=100.0, burstiness=cv).gaps(N, np.random.default_rng(2))
    assert gaps.mean() == pytest.approx(0.01, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.04)


def test_arrivals_are_seeded_and_increasing() -> None:
    a = ArrivalProcess(50.0).times(1000, np.random.default_rng(7))
    b = ArrivalProcess(50.0).times(1000, np.random.default_rng(7))
    c = ArrivalProcess(50.0).times(1000, np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.diff(a) >= 0) and a[0] > 0


@pytest.mark.parametrize("kwargs", [{"qps": 0.0}, {"qps": -1.0}, {"qps": 1.0, "burstiness": 0.0}])
def test_arrival_process_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ArrivalProcess(**kwargs)


def quantiles(spec: str) -> np.ndarray:
    sizes = QuerySizes.parse(spec).sample(N, np.random.default_rng(3))
    assert sizes.dtype == np.int64 and sizes.min() >= 1 and sizes.max() <= 1024
    return np.percentile(sizes, [50, 95, 99])


def test_lognormal_sizes_match_deeprecsys() -> None:
    p50, _, p99 = quantiles("lognormal")
    assert p50 == pytest.approx(np.exp(5.1), abs=2)
    assert p99 == pytest.approx(np.exp(5.1 + 2.326 * 0.2), abs=3)  # ≈ 262, not heavy


def test_production_sizes_have_the_heavy_tail() -> None:
    sizes = QuerySizes.parse("production").sample(N, np.random.default_rng(4))
    p50, p95, p99 = np.percentile(sizes, [50, 95, 99])
    assert p50 == pytest.approx(178, abs=3)
    assert p95 == pytest.approx(600, abs=6)
    assert p99 == pytest.approx(919, abs=10)
    assert np.mean(sizes < 100) == pytest.approx(0.08, abs=0.005)
    assert np.mean(sizes >= 600) == pytest.approx(0.05, abs=0.004)


def test_mlperf_sizes_are_hundreds_mostly_200() -> None:
    sizes = QuerySizes.parse("mlperf").sample(N, np.random.default_rng(5))
    values, counts = np.unique(sizes, return_counts=True)
    assert set(values.tolist()) == set(range(100, 800, 100))
    assert values[np.argmax(counts)] == 200
    assert sizes.mean() == pytest.approx(270, abs=5)


def test_quantile_file_is_sampled_uniformly(tmp_path) -> None:
    path = tmp_path / "sizes.txt"
    path.write_text("10\n20\n20\n40\n")
    dist = QuerySizes.parse(f"file:{path}")
    sizes = dist.sample(40_000, np.random.default_rng(6))
    values, counts = np.unique(sizes, return_counts=True)
    assert values.tolist() == [10, 20, 40]
    assert counts / sizes.size == pytest.approx([0.25, 0.5, 0.25], abs=0.01)


def test_sizes_are_capped_and_fixed_sizes_are_exact() -> None:
    big = QuerySizes.parse("lognormal:9,0.1", max_items=300).sample(100, np.random.default_rng(0))
    assert big.max() == 300
    assert set(QuerySizes.parse("fixed:64").sample(10, np.random.default_rng(0))) == {64}


@pytest.mark.parametrize("spec", ["", "pareto", "fixed:0", "lognormal:5", "file:"])
def test_bad_size_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        QuerySizes.parse(spec)


def test_missing_or_empty_quantile_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        QuerySizes.parse(f"file:{tmp_path / 'nope.txt'}")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError):
        QuerySizes.parse(f"file:{tmp_path / 'empty.txt'}")
