"""Shape buckets, heuristics, the tuner's search and its JSON."""

from __future__ import annotations

from pathlib import Path

from recserve.kernels.pooled import PooledConfig
from recserve.kernels.tuning import (
    KernelTuner,
    ShapeBucket,
    device_slug,
    heuristic_config,
    lever_candidates,
    tile_candidates,
)


def test_buckets() -> None:
    b = ShapeBucket.of("fp32", 128, num_lookups=4 * 2048 * 150, num_bags=4 * 2048)
    assert b.pooling == 128 and b.key() == "fp32-d128-L128-B4096"
    assert ShapeBucket.of("int8", 32, 1000, 1000).pooling == 1
    assert ShapeBucket.of("fp16", 64, 20_000, 1000, weighted=True).key().endswith("-w")


def test_heuristic_spreads_rows_over_bags_when_bags_are_short() -> None:
    short = heuristic_config(ShapeBucket("fp32", 32, 1, 65536))
    long = heuristic_config(ShapeBucket("fp32", 128, 128, 65536))
    few = heuristic_config(ShapeBucket("fp16", 32, 16, 1024))
    assert short.rows == 1 and short.bags > 1
    assert long.rows == 2 and long.bags * long.rows >= 8
    assert few.bags == 1 and few.rows == 16


def test_candidates_are_valid() -> None:
    for bucket in (ShapeBucket("fp32", 32, 1, 4096), ShapeBucket("int8", 128, 64, 65536)):
        cands = tile_candidates(bucket)
        assert cands and len(set(cands)) == len(cands)
        assert all(c.rows <= 2 * max(1, bucket.pooling) for c in cands)
    levers = lever_candidates(PooledConfig(), reordered=True)
    assert {c.evict for c in levers["evict"]} == {"first", "hotcold"}


def test_tune_picks_fastest_and_keeps_only_real_lever_gains(tmp_path: Path) -> None:
    tuner = KernelTuner("Test GPU")
    bucket = ShapeBucket("fp32", 64, 16, 16384)

    def fake_time(cfg: PooledConfig) -> float:
        us = 100.0 + abs(cfg.bags * cfg.rows - 32) + (0 if cfg.num_warps == 4 else 5)
        if cfg.maxnreg == 64:
            us *= 0.9  # a real gain: kept
        if cfg.num_stages == 3:
            us *= 0.99  # under the noise threshold: not kept
        return us

    entry = tuner.tune(bucket, fake_time)
    assert entry.config.bags * entry.config.rows == 32 and entry.config.num_warps == 4
    assert entry.config.maxnreg == 64 and entry.config.num_stages == 1
    assert entry.gains and entry.gains["maxnreg"] > 1.05
    assert tuner.config(bucket) == entry.config
    path = tmp_path / "tuned.json"
    tuner.save(path)
    loaded = KernelTuner.load(path)
    assert loaded.device == "Test GPU" and loaded.config(bucket) == entry.config
    assert KernelTuner.for_device("Test GPU", path).config(bucket) == entry.config
    other = ShapeBucket("fp16", 64, 16, 16384)
    assert loaded.config(other) == heuristic_config(other)


def test_device_slug() -> None:
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("  ") == "unknown"
