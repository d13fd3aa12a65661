"""Shape buckets, heuristics, the tuner's search and its JSON."""

from __future__ import annotations

from pathlib import Path

from recserve.kernels.pooled import PooledConfig
from recserve.kernels.tuning import (
    CombinedTimer,
    KernelTuner,
    ShapeBucket,
    TunedEntry,
    device_slug,
    heuristic_config,
    lever_candidates,
    shipped_configs,
    skew_tile_candidates,
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
    assert [c.prefetch for c in levers["prefetch"]] == [True]
    on = PooledConfig(prefetch=True)
    assert [c.prefetch for c in lever_candidates(on, reordered=False)["prefetch"]] == [False]
    assert [c.early_offsets for c in levers["early_offsets"]] == [True]


def test_skewed_buckets_add_small_tiles_and_evict_last() -> None:
    uniform = ShapeBucket("fp32", 128, 64, 65536)
    skewed = ShapeBucket("fp32", 128, 64, 65536, skew=1)
    extra = skew_tile_candidates(skewed)
    assert extra and all(c.num_stages == 1 and c.evict == "none" for c in extra)
    assert PooledConfig(bags=1, rows=8, num_warps=1) in extra  # one warp per program
    assert PooledConfig(bags=4, rows=1, num_warps=4) in extra  # one warp per bag
    for c in extra:
        elements = c.bags * c.rows * skewed.block_d
        assert c.num_warps == 1 or c.bags == c.num_warps
        assert 4 * 32 * c.num_warps <= elements <= 64 * 32 * c.num_warps
    assert not any(c.num_warps == 1 for c in tile_candidates(uniform))
    # The extra tiles survive a candidate limit, and only skewed buckets get them.
    limited = tile_candidates(skewed, limit=10)
    assert limited[:10] == tile_candidates(uniform, limit=10)
    assert set(extra) <= set(limited) and len(set(limited)) == len(limited)
    assert tile_candidates(skewed, limit=10, skew_tiles=False) == limited[:10]
    base = PooledConfig(bags=4, rows=2, num_warps=2)
    assert {c.evict for c in lever_candidates(base, False, skew=1)["evict"]} == {"first", "last"}
    assert {c.evict for c in lever_candidates(base, False)["evict"]} == {"first"}
    assert {c.evict for c in lever_candidates(base, False, 2, skew_levers=False)["evict"]} == {
        "first"
    }


def test_combined_timer_tunes_for_every_input_of_the_bucket() -> None:
    """Zipf 0.8 and 1.05 share a skew level: pipelining (cp.async, no L1) wins a little on the
    first and loses a lot on the second, so a bucket tuned on both must not keep it."""
    bucket = ShapeBucket("fp32", 128, 64, 65536, skew=1)

    def mild(cfg: PooledConfig) -> float:
        return 430.0 * (0.97 if cfg.num_stages == 3 else 1.0) + cfg.bags

    def steep(cfg: PooledConfig) -> float:
        return 250.0 * (1.6 if cfg.num_stages == 3 else 1.0) + cfg.bags

    alone = KernelTuner("Test GPU").tune(bucket, mild)
    assert alone.config.num_stages == 3
    timer = CombinedTimer([mild, steep])
    both = KernelTuner("Test GPU").tune(bucket, timer)
    assert both.config.num_stages == 1 and both.gains and both.gains["num_stages"] < 1.0
    assert timer.times[both.config] == [mild(both.config), steep(both.config)]
    assert abs(both.us - (mild(both.config) * steep(both.config)) ** 0.5) < 1e-9


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


def test_devices_of_the_same_architecture_take_the_shipped_h200_configs(tmp_path: Path) -> None:
    h200 = KernelTuner.for_device("NVIDIA H200")
    assert h200.entries and h200.sources == ["nvidia-h200.json"]
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA GH200 480GB"):
        tuner = KernelTuner.for_device(name)
        assert tuner.sources == ["nvidia-h200.json"]
        assert tuner.entries.keys() == h200.entries.keys()
    assert shipped_configs("NVIDIA A100-SXM4-80GB") is None
    other = KernelTuner.for_device("NVIDIA A100-SXM4-80GB")
    assert other.entries == {} and other.sources == []
    bucket = ShapeBucket("fp32", 32, 16, 1024)
    assert other.config(bucket) == heuristic_config(bucket)
    own = KernelTuner("NVIDIA H100 80GB HBM3")
    own.entries[bucket.key()] = TunedEntry(PooledConfig(bags=2, rows=4, num_warps=1), 1.0)
    own.save(tmp_path / "mine.json")
    mine = KernelTuner.for_device("NVIDIA H100 80GB HBM3", tmp_path / "mine.json")
    assert mine.config(bucket) == PooledConfig(bags=2, rows=4, num_warps=1)  # the user's file wins
    assert mine.sources == ["nvidia-h200.json", "mine.json"]
