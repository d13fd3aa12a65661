"""Id distributions: range, reproducibility, skew."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.loadgen.ids import IdDistribution, IdSampler, top_k_coverage


@pytest.mark.parametrize("spec", ["uniform", "zipf:0.8", "zipf:1.2", "one-item"])
@pytest.mark.parametrize("rows", [10, 1000, 3_000_000])
def test_ids_in_range_and_reproducible(spec: str, rows: int) -> None:
    a = IdSampler(rows, spec, seed=3).sample(5000)
    b = IdSampler(rows, spec, seed=3).sample(5000)
    assert a.dtype == np.int64 and np.array_equal(a, b)
    assert a.min() >= 0 and a.max() < rows


def test_zipf_skew_grows_with_alpha() -> None:
    cov = [
        top_k_coverage(IdSampler(100_000, f"zipf:{a}", seed=0).sample(200_000), 1000)
        for a in (0.8, 1.05, 1.2)
    ]
    assert cov[0] < cov[1] < cov[2]
    uniform = top_k_coverage(IdSampler(100_000, "uniform", seed=0).sample(200_000), 1000)
    assert uniform < 0.05 < cov[0]


def test_zipf_matches_the_law_on_small_tables() -> None:
    rows, alpha = 50, 1.1
    sampler = IdSampler(rows, f"zipf:{alpha}", seed=1)
    ids = sampler.sample(400_000)
    hot = sampler.hot_rows(1)[0]
    expected = 1.0 / np.sum(np.arange(1, rows + 1, dtype=float) ** -alpha)
    assert abs(np.mean(ids == hot) - expected) < 0.01


def test_trace_replay(tmp_path) -> None:
    path = tmp_path / "trace.txt"
    path.write_text("\n".join(map(str, [5, 6, 7, 8])))
    ids = IdSampler(100, f"trace:{path}", seed=0).sample(8)
    assert set(ids.tolist()) <= {5, 6, 7, 8}


@pytest.mark.parametrize("spec", ["zipf", "zipf:-1", "gauss", "trace:"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        IdDistribution.parse(spec)
