"""Placement planner decisions on constructed cases, and ``recserve plan``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from recserve.cli.main import main
from recserve.config import TableConfig
from recserve.storage.cost import PathCost
from recserve.storage.planner import (
    Coverage,
    _harmonic,
    parse_bytes,
    plan_placements,
    speeds_from_bench,
)


def _t(
    name: str, rows: int, dim: int = 32, lookups: int = 20, placement: str = "auto"
) -> TableConfig:
    return TableConfig(name, rows, dim, lookups=lookups, placement=placement)  # type: ignore[arg-type]


def test_everything_fits_in_hbm() -> None:
    tables = [_t("a", 1000), _t("b", 2000)]
    plan = plan_placements(tables, 10 << 20)
    assert plan.placements() == {"a": "hbm", "b": "hbm"}
    assert all(t.hit_rate == 1.0 for t in plan.tables)
    assert plan.hbm_bytes == 3000 * 128


def test_no_budget_means_host() -> None:
    plan = plan_placements([_t("a", 1000)], 0, access={"a": "zipf:1.2"})
    assert plan.placements() == {"a": "host"} and plan.hbm_bytes == 0
    assert plan.tables[0].host_bytes == 1000 * 128


def test_skewed_big_table_gets_the_cache_uniform_small_one_hbm() -> None:
    big, small = _t("big", 10_000_000, 64), _t("small", 100_000, 64)
    budget = 200 << 20  # holds `small` whole, and a cache of a part of `big`
    plan = plan_placements([big, small], budget, access={"big": "zipf:1.05"})
    by = {t.name: t for t in plan.tables}
    assert by["small"].placement == "hbm"
    assert by["big"].placement == "host+cache" and 0 < by["big"].cache_rows < 10_000_000
    # The cache holds a few % of big's rows yet serves far more of its lookups.
    assert by["big"].hit_rate > 5 * by["big"].cache_rows / 10_000_000
    assert plan.hbm_bytes <= budget


def test_uniform_tables_prefer_whole_tables_in_hbm_over_caches() -> None:
    tables = [_t(f"t{i}", 1_000_000, 64) for i in range(4)]
    budget = int(2.5 * 1_000_000 * 256)
    plan = plan_placements(tables, budget)
    places = sorted(plan.placements().values())
    assert places.count("hbm") == 2 and "host+cache" not in places[:2]


def test_fixed_placements_are_kept_and_budgeted() -> None:
    tables = [_t("a", 1000, placement="host"), _t("b", 1000, placement="hbm"), _t("c", 1000)]
    plan = plan_placements(tables, 1000 * 128 + 100)
    by = {t.name: t for t in plan.tables}
    assert by["a"].placement == "host" and by["a"].fixed
    assert by["b"].placement == "hbm" and by["b"].fixed
    assert by["c"].placement == "host"  # the budget left (100 B) holds nothing useful
    text = plan.format_table()
    assert "hbm*" in text and "estimated" in text


def test_more_lookups_win_the_hbm() -> None:
    plan = plan_placements(
        [_t("cold", 10_000, lookups=1), _t("hot", 10_000, lookups=80)], 10_000 * 128 + 10
    )
    assert plan.placements() == {"cold": "host", "hot": "hbm"}


def test_coverage_models() -> None:
    assert _harmonic(5000, 1.05) == pytest.approx(
        float(np.sum(np.arange(1, 5001) ** -1.05)), rel=1e-7
    )
    assert _harmonic(10**6, 1.0) == pytest.approx(
        float(np.sum(1.0 / np.arange(1, 10**6 + 1))), rel=1e-7
    )
    z = Coverage.from_spec(1_000_000, "zipf:1.05")
    assert 0 < z(1000) < z(100_000) < z(1_000_000) == pytest.approx(1.0)
    u = Coverage.from_spec(1000, "uniform")
    assert u(100) == pytest.approx(0.1)
    c = Coverage(4, counts=np.array([1, 5, 0, 4]))
    assert c(1) == pytest.approx(0.5) and c(2) == pytest.approx(0.9)
    assert u.unique_share(10, 0) == pytest.approx(1.0, abs=0.01)
    assert u.unique_share(10_000, 0) < 0.1  # many lookups of 1000 rows repeat


def test_parse_bytes() -> None:
    assert parse_bytes("40GiB") == 40 << 30
    assert parse_bytes("512MB") == 512_000_000
    assert parse_bytes("1.5e9") == 1_500_000_000
    assert parse_bytes("2k") == 2000


def test_cli_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    counts = tmp_path / "counts.npz"
    np.savez(counts, t0=np.arange(4_000_000)[::-1].astype(np.int64))
    args = ["plan", "--model", "dlrm-rmc1", "--gpu-mem", "1GiB", "--ids", "zipf:1.05"]
    assert main([*args, "--counts", str(counts), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == "dlrm-rmc1" and len(plan["tables"]) == 8
    assert plan["hbm_bytes"] <= 1 << 30
    assert plan["tables"][0]["access"] == "counts"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "placement" in out and "host+cache" in out
    assert main(["plan", "--model", "ncf", "--gpu-mem", "1e9", "--table-ids", "nope=uniform"]) == 2


def test_speeds_from_bench(tmp_path: Path) -> None:
    path = tmp_path / "tiers.json"
    rule = {**asdict(PathCost(dedup_us=1.5)), "page_bytes": 4096}
    path.write_text(
        json.dumps({"cost_rule": {"fitted": rule}, "planner_speeds": {"hbm_gbps": 2e3}})
    )
    speeds = speeds_from_bench(path)
    assert speeds.hbm_gbps == 2e3 and speeds.host.dedup_us == 1.5 and speeds.host.page_bytes == 4096
    path.write_text("{}")
    with pytest.raises(ValueError, match="cost_rule"):
        speeds_from_bench(path)
