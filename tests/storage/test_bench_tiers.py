"""The tiered-storage benchmark end to end on the CPU (interpreted kernels, tiny tables)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recserve.config import TableConfig
from recserve.storage.bench_report import case_table
from recserve.storage.bench_tiers import TiersOptions, host_pages, run_bench
from recserve.storage.tiered import TieredBackend, TieredOptions

pytestmark = pytest.mark.interpreter


def test_host_pages_counts_distinct_pages() -> None:
    # Two tables of 512 rows of 256 bytes: 256 rows per 64 KiB page, tables back to back.
    tables = tuple(TableConfig(f"t{i}", 512, 64, placement="host") for i in range(2))
    tb = TieredBackend(tables, "cpu", options=TieredOptions(cache=None), init=False)
    assert host_pages(tb, torch.tensor([0, 1, 255])) == 1
    assert host_pages(tb, torch.tensor([0, 256, 511, 512, 1023])) == 4
    assert host_pages(tb, torch.zeros(0, dtype=torch.int64)) == 0


def test_bench_times_both_policies_and_reports_bounds(tmp_path: Path) -> None:
    opts = TiersOptions(
        out=tmp_path,
        host_gib=0.0005,
        tables=2,
        sweep_row_bytes=(),
        dists=("zipf:1.05",),
        batches=(4,),
        poolings=(20,),
        sets=1,
        reps=1,
        hit_batches=1,
        hit_shape=(4, 3),
        threads=1,
        device="cpu",
        tune=False,
        commit="test",
    )
    result = run_bench(opts)
    s = result["summary"]
    assert s["errors"] == 0, result["errors"]
    passed, total = (int(x) for x in s["checks_passed"].split("/"))
    assert passed == total == 7  # host x2, cache (LFU, LRU) x2 each, CPU peer
    (case,) = result["cases"]
    assert {"cache_inplace", "cache_dedup", "cache_lru_inplace", "cache_lru_dedup"} <= set(
        case["variants"]
    )
    assert case["host_pages"] >= case["cache_miss_pages"] > 0
    assert 0 < case["cache_unique_miss_of_unique"] <= 1
    assert case["cache_refresh_us"] > 0 and case["cache_refresh_us_lru"] > 0
    assert s["cache_speedup_vs_host_zipf105"] == case["cache_speedup_vs_host"]
    assert s["cache_speedup_vs_host_zipf105_lru"] == case["cache_lru_speedup_vs_host"]
    assert s["cache_speedup_vs_host_zipf105_incl_refresh"] < s["cache_speedup_vs_host_zipf105"]
    assert s["cache_refresh_every"] == 4 and s["cache_speedup_zipf105_worst_case"] == "B=4 L=20"
    lines = case_table(result)
    assert len(lines) == 2 and lines[1].startswith("zipf:1.05")
    assert (tmp_path / "tiers.json").exists() and (tmp_path / "tiers-table.txt").exists()


def test_bench_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="policies"):
        TiersOptions(out=tmp_path, policies=("fifo",))
    with pytest.raises(ValueError, match="refresh_every"):
        TiersOptions(out=tmp_path, refresh_every=-1)
