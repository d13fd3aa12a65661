"""The shared HBM cache: LFU and LRU hit/miss/evict sequences, pre-warming, sizing."""

from __future__ import annotations

import pytest
import torch

from recserve.config import TableConfig
from recserve.kernels.cache import plan_refresh
from recserve.storage.cache import (
    BYTES_PER_ID,
    BYTES_PER_SLOT_EXTRA,
    CacheConfig,
    cache_bytes,
    capacity_for_budget,
    resolve_capacity,
)
from recserve.storage.tiered import TieredBackend, TieredOptions


def _backend(policy: str, capacity: int = 2, rows: int = 6) -> TieredBackend:
    tables = (TableConfig("a", rows, 4, placement="host+cache"),)
    cfg = CacheConfig(policy=policy, capacity_rows=capacity, refresh_every=1)  # type: ignore[arg-type]
    tb = TieredBackend(tables, "cpu", options=TieredOptions(cache=cfg), init=False)
    tb.load_table(0, torch.arange(rows * 4, dtype=torch.float32).view(rows, 4))
    return tb


def _step(tb: TieredBackend, ids: list[int]) -> tuple[set[int], int]:
    """Look up ``ids`` (then the cache refreshes); returns the cached ids and the hits."""
    assert tb.cache is not None
    tb.cache.reset_stats()
    rows = tb.rows(0, torch.tensor(ids))
    assert torch.equal(rows, tb.dense_weight(0)[torch.tensor(ids)])  # hits read the right rows
    tb.cache.after_lookup()
    return set(tb.cache.cached_ids().tolist()), int(tb.cache.counts()[0, 1])


def test_lfu_keeps_frequent_rows_and_ages_counts() -> None:
    tb = _backend("lfu")
    assert _step(tb, [0, 0, 0, 1]) == ({0, 1}, 0)
    # Counts halve at each refresh: 0 -> 1, 1 -> 0; two lookups of 2 beat both, 0 stays.
    assert _step(tb, [2, 2]) == ({0, 2}, 0)
    # 0 aged to 0 and is no longer wanted; 3 (one lookup) replaces it; 2 was a hit.
    assert _step(tb, [3, 2]) == ({2, 3}, 1)


def test_lru_evicts_the_least_recently_used() -> None:
    tb = _backend("lru")
    assert _step(tb, [0]) == ({0}, 0)
    assert _step(tb, [1]) == ({0, 1}, 0)
    assert _step(tb, [2]) == ({1, 2}, 0)
    assert _step(tb, [1]) == ({1, 2}, 1)
    assert _step(tb, [3]) == ({1, 3}, 0)


def test_rows_never_seen_are_never_admitted() -> None:
    tb = _backend("lfu", capacity=5)
    assert _step(tb, [4, 4]) == ({4}, 0)
    assert tb.cache is not None and tb.cache.occupancy() == 1


def test_prewarm_fills_the_top_rows_by_count() -> None:
    for policy in ("lfu", "lru"):
        tb = _backend(policy, capacity=3)
        tb.prewarm([torch.tensor([5, 0, 9, 1, 7, 0])])
        assert tb.cache is not None
        assert set(tb.cache.cached_ids().tolist()) == {0, 2, 4}
        assert _step(tb, [2, 4, 1])[1] == 2


def test_ties_keep_incumbents() -> None:
    slot_map = torch.tensor([-1, 0, -1, 1], dtype=torch.int32)
    slot_row = torch.tensor([1, 3])
    new_rows, slots = plan_refresh(torch.ones(4, dtype=torch.int32), slot_map, slot_row)
    assert bool((new_rows < 0).all()) and bool((slots < 0).all())


def test_load_drops_stale_cached_rows() -> None:
    tb = _backend("lfu")
    _step(tb, [0, 1])
    tb.load_table(0, torch.zeros(6, 4))
    assert tb.cache is not None and tb.cache.occupancy() == 0
    assert torch.equal(tb.rows(0, torch.tensor([0, 1])), torch.zeros(2, 4))


def test_cache_is_shared_across_tables() -> None:
    tables = (
        TableConfig("a", 10, 4, placement="host+cache"),
        TableConfig("b", 10, 8, placement="host+cache"),
    )
    cfg = CacheConfig(capacity_rows=3, refresh_every=0)
    tb = TieredBackend(tables, "cpu", options=TieredOptions(cache=cfg), init=True)
    tb.prewarm([torch.tensor([0] * 9 + [5]), torch.tensor([9, 8] + [0] * 8)])
    assert tb.cache is not None
    assert set(tb.cache.cached_ids().tolist()) == {9, 10, 11}  # one id space: b from 10
    assert tb.cache.slot_bytes == 32  # slots fit the widest row


def test_capacity_from_budget() -> None:
    slot, ids = 256, 1000
    cap = capacity_for_budget(100_000, slot, ids)
    assert cap == (100_000 - ids * BYTES_PER_ID) // (slot + BYTES_PER_SLOT_EXTRA)
    assert cache_bytes(cap, slot, ids) <= 100_000
    assert capacity_for_budget(10, slot, ids) == 0
    cpu = torch.device("cpu")
    assert resolve_capacity(CacheConfig(capacity_rows=5000), slot, ids, cpu) == ids
    assert resolve_capacity(CacheConfig(budget_bytes=100_000), slot, ids, cpu) == cap
    with pytest.raises(ValueError, match="capacity or a budget"):
        resolve_capacity(CacheConfig(), slot, ids, cpu)
    with pytest.raises(ValueError):
        CacheConfig(policy="fifo")  # type: ignore[arg-type]
