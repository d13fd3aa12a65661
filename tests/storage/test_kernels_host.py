"""The tiered kernels (interpreted) against their pure-torch references and TorchBackend."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from recserve.config import TableConfig
from recserve.embedding.backend import TorchBackend
from recserve.kernels.cache import install, install_reference, plan_refresh
from recserve.kernels.gather import (
    dedup_ids,
    gather_rows,
    gather_rows_reference,
    gather_unique,
    gather_unique_reference,
    globalize,
    globalize_reference,
)
from recserve.kernels.host import (
    RECORD_LFU,
    RECORD_LRU,
    SENTINEL32,
    SENTINEL64,
    STAT_LANES,
    tiered_pooled,
    tiered_pooled_reference,
)
from recserve.storage.cache import CacheConfig
from recserve.storage.tiered import TieredBackend, TieredOptions
from recserve.types import KeyedJagged

pytestmark = pytest.mark.interpreter

Batcher = Callable[..., KeyedJagged]


def _tables(dtype: str) -> tuple[TableConfig, ...]:
    return (
        TableConfig("a", 40, 8, dtype=dtype, placement="host+cache"),
        TableConfig("b", 23, 20, pooling="mean", dtype=dtype, placement="host"),
        TableConfig("c", 7, 4, dtype=dtype, placement="hbm"),
        TableConfig("d", 31, 16, dtype=dtype, placement="host+cache"),
    )


def _pair(
    tables: tuple[TableConfig, ...], seed: int, **opts: object
) -> tuple[TorchBackend, TieredBackend]:
    ref = TorchBackend(tables)
    ref.reset_parameters(torch.Generator().manual_seed(seed))
    cache = opts.pop("cache", CacheConfig(capacity_rows=12, refresh_every=1))
    tb = TieredBackend(
        tables,
        "cpu",
        options=TieredOptions(cache=cache, **opts),
        init=False,  # type: ignore[arg-type]
    )
    for i in range(len(tables)):
        tb.load_stored(i, 0, ref.weights[i].detach(), ref.scale_bias(i))
    return ref, tb


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("path", ["inplace", "dedup"])
def test_backend_matches_torch_backend(dtype: str, path: str, seed: int, batch_of: Batcher) -> None:
    tables = _tables(dtype)
    ref, tb = _pair(tables, seed, path=path)
    for step in range(3):  # the cache fills between steps: misses, then hits
        kjt = batch_of(tables, 5, 6, seed + step, weighted=step == 1, hot=4)
        want = ref.pooled(kjt.values, kjt.offsets, 5, kjt.weights, kjt.key_offsets())
        got = tb.pooled(kjt.values, kjt.offsets, 5, kjt.weights, kjt.key_offsets())
        tol = 1e-5 if dtype in ("fp32", "int8") else 1e-2
        assert torch.allclose(got, want, rtol=tol, atol=tol), (dtype, path, step)
    assert tb.cache is not None and tb.cache.occupancy() > 0
    stats = tb.cache_stats()
    assert set(stats) == {"a", "d"} and sum(s["hits"] for s in stats.values()) > 0
    ids = torch.tensor([0, 39, 5, 5])
    assert torch.allclose(tb.rows(0, ids), ref.rows(0, ids), rtol=1e-2, atol=1e-2)


def test_kernel_matches_reference_with_records_and_stats(seed: int, batch_of: Batcher) -> None:
    tables = _tables("fp32")
    _, tb = _pair(tables, seed)
    assert tb.cache is not None
    cache = tb.cache
    cache.prewarm([torch.arange(40, 0, -1), torch.arange(31)])
    kjt = batch_of(tables, 6, 5, seed, hot=5)
    group = tb._groups[0][1]
    for record in (RECORD_LFU, RECORD_LRU):
        outs, scores, stats = [], [], []
        for fn in (tiered_pooled, tiered_pooled_reference):
            score = cache.score.clone()
            st = torch.zeros_like(cache.stats)
            out = torch.full((6, tb.output_dim), float("nan"))
            host = tb.host.arena.tensor(torch.float32) if tb.host else None
            fn(  # type: ignore[operator]
                group, kjt.values, kjt.offsets, 6, out,
                host=host, hbm=tb.hbm.view(torch.float32),
                cache=cache.slots.view(torch.float32), cache_stride=cache.slot_bytes // 4,
                slot_map=cache.slot_map, score=score, record=record, tick=cache.tick, stats=st,
            )  # fmt: skip
            outs.append(out)
            scores.append(score)
            stats.append(st.sum(1))
        assert torch.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
        assert torch.equal(scores[0], scores[1])
        assert torch.equal(stats[0], stats[1])
        lookups = torch.tensor([kjt.key_offsets()[i + 1] - kjt.key_offsets()[i] for i in range(4)])
        lookups[2] = 0  # lookups are counted for host tables only (c is in HBM)
        assert torch.equal(stats[0][:, 0], lookups)


@pytest.mark.parametrize("sentinel", [SENTINEL32, SENTINEL64])
def test_dedup_ids_without_sync(sentinel: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = torch.int32 if sentinel == SENTINEL32 else torch.int64
    gids = torch.randint(0, 20, (50,), generator=g).to(dtype)
    gids[torch.rand(50, generator=g) < 0.2] = sentinel
    unique, inverse = dedup_ids(gids, sentinel)
    assert unique.shape == gids.shape and unique.dtype == gids.dtype
    assert torch.equal(unique[inverse.long()], gids)
    distinct = torch.unique(gids)
    assert torch.equal(unique[: distinct.numel()], distinct)
    assert bool((unique[distinct.numel() :] == sentinel).all())


@pytest.mark.parametrize("sentinel", [SENTINEL32, SENTINEL64])
def test_dedup_ids_counts_each_unique_id(sentinel: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = torch.int32 if sentinel == SENTINEL32 else torch.int64
    gids = torch.randint(0, 9, (64,), generator=g).to(dtype) ** 2  # repeats and gaps
    gids[torch.rand(64, generator=g) < 0.3] = sentinel
    unique, inverse, counts = dedup_ids(gids, sentinel, with_counts=True)
    assert torch.equal(unique[inverse.long()], gids)
    distinct, want = torch.unique(gids, return_counts=True)
    k = distinct.numel()
    assert torch.equal(unique[:k], distinct)
    assert torch.equal(counts[:k].long(), want)  # the sentinel run is counted too (skipped later)
    assert bool((counts[k:] == 0).all()) and int(counts.sum()) == gids.numel()


def _per_lookup_scores(
    tb: TieredBackend, gids: torch.Tensor, score: torch.Tensor, record: int, tick: torch.Tensor
) -> torch.Tensor:
    """What per-lookup recording (the in-place kernel) would make of ``score``."""
    out = score.clone()
    g = gids.long()
    g = g[(g != tb.sentinel) & (g < tb.num_cached_ids)]
    if record == RECORD_LFU:
        out.index_add_(0, g, torch.ones_like(g, dtype=out.dtype))
    else:
        out[g] = tick.to(out.dtype)
    return out


def test_gather_unique_matches_reference_and_per_lookup_records(
    seed: int, batch_of: Batcher
) -> None:
    tables = _tables("fp32")
    _, tb = _pair(tables, seed)
    assert tb.cache is not None and tb.host is not None
    cache = tb.cache
    cache.prewarm([torch.arange(40, 0, -1), torch.arange(31)])
    cache.tick.fill_(7)
    kjt = batch_of(tables, 6, 7, seed, hot=5)
    n = kjt.values.numel()
    gids = torch.full((n,), tb.sentinel, dtype=tb.gid_dtype)
    globalize_reference(tb._meta_all, kjt.values, kjt.offsets, 6, gids, tb.sentinel)
    unique, _, counts = dedup_ids(gids, tb.sentinel, with_counts=True)
    words = tb.stage_bytes // 4
    src = tb.host.arena.tensor(torch.int32)
    for record in (RECORD_LFU, RECORD_LRU):
        results = []
        for fn in (gather_unique, gather_unique_reference):
            out = torch.zeros(n * words, dtype=torch.int32)
            score = cache.score.clone()
            stats = torch.zeros_like(cache.stats)
            tally = torch.zeros(STAT_LANES, 2, dtype=torch.int64)
            args = [unique, counts, tb.row_bounds, tb.row_meta, src, out, words]
            if fn is gather_unique:
                args.append(words)
            fn(  # type: ignore[operator]
                *args, tb.sentinel,
                cache=cache.slots.view(torch.int32), cache_stride_words=cache.slot_bytes // 4,
                slot_map=cache.slot_map, num_cached=tb.num_cached_ids, score=score,
                record=record, tick=cache.tick, stats=stats, stat_table=tb._stat_table,
                tally=tally,
            )  # fmt: skip
            results.append((out, score, stats.sum(1), tally.sum(0)))
        for a, b in zip(results[0], results[1], strict=True):
            assert torch.equal(a, b), record
        out, score, stats, tally = results[0]
        # Every unique host row is staged whole, from the cache or the host alike.
        rows = out.view(n, words)
        for u in range(int((unique != tb.sentinel).sum())):
            g = int(unique[u])
            k = int(torch.searchsorted(tb.row_bounds[1:], torch.tensor(g), right=True))
            base, stride, w = (int(x) for x in tb.row_meta[k])
            want = src[base + (g - int(tb.row_bounds[k])) * stride :][:w]
            assert torch.equal(rows[u, :w], want), (u, g)
        # One update per distinct row records the same as one per lookup.
        assert torch.equal(score, _per_lookup_scores(tb, gids, cache.score, record, cache.tick))
        lookups = torch.tensor([kjt.key_offsets()[i + 1] - kjt.key_offsets()[i] for i in range(4)])
        lookups[2] = 0  # c is in HBM
        assert torch.equal(stats[:, 0], lookups)
        g = gids.long()[gids.long() != tb.sentinel]
        cached = g < tb.num_cached_ids
        hit = torch.zeros_like(cached)
        hit[cached] = cache.slot_map[g[cached]] >= 0
        assert int(stats[:, 1].sum()) == int(hit.sum()) > 0
        assert int(tally[1]) == g.numel()
        assert int(tally[0]) == torch.unique(g[~hit]).numel()


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_dedup_and_inplace_paths_record_alike(policy: str, seed: int, batch_of: Batcher) -> None:
    """Same outputs, scores, statistics and cache contents whichever path a batch takes."""
    tables = _tables("fp16")
    cfg = CacheConfig(policy=policy, capacity_rows=12, refresh_every=2)  # type: ignore[arg-type]
    backends = {}
    for path in ("inplace", "dedup"):
        _, tb = _pair(tables, seed, path=path, cache=cfg)
        assert tb.cache is not None
        tb.cache.prewarm([torch.arange(40) % 7, torch.arange(31) % 5])
        backends[path] = tb
    for step in range(4):
        kjt = batch_of(tables, 5, 6, seed + step, hot=4)
        outs = [
            tb.pooled(kjt.values, kjt.offsets, 5, None, kjt.key_offsets())
            for tb in backends.values()
        ]
        assert torch.allclose(outs[0], outs[1], rtol=1e-3, atol=1e-3), step
        caches = [tb.cache for tb in backends.values()]
        assert caches[0] is not None and caches[1] is not None
        assert torch.equal(caches[0].score, caches[1].score), step
        assert torch.equal(caches[0].counts(), caches[1].counts()), step
        assert torch.equal(caches[0].slot_map, caches[1].slot_map), step
    assert caches[0].refreshes == 2


def test_globalize_and_gather_match_references(seed: int, batch_of: Batcher) -> None:
    tables = _tables("fp16")
    _, tb = _pair(tables, seed)
    assert tb.cache is not None and tb.host is not None
    tb.cache.prewarm([torch.arange(40), torch.arange(31)])
    kjt = batch_of(tables, 4, 6, seed, hot=3)
    n = kjt.values.numel()
    got = torch.full((n,), tb.sentinel, dtype=tb.gid_dtype)
    want = got.clone()
    globalize(tb._meta_all, 4, kjt.values, kjt.offsets, 4, got, tb.sentinel, tb.cache.slot_map)
    globalize_reference(
        tb._meta_all, kjt.values, kjt.offsets, 4, want, tb.sentinel, tb.cache.slot_map
    )
    assert torch.equal(got, want)
    assert bool((got != tb.sentinel).any())
    unique, _ = dedup_ids(got, tb.sentinel)
    words = tb.stage_bytes // 4
    outs = [torch.zeros(n * words, dtype=torch.int32) for _ in range(2)]
    src = tb.host.arena.tensor(torch.int32)
    gather_rows(unique, tb.row_bounds, tb.row_meta, src, outs[0], words, words, tb.sentinel)
    gather_rows_reference(unique, tb.row_bounds, tb.row_meta, src, outs[1], words, tb.sentinel)
    assert torch.equal(outs[0], outs[1]) and bool(outs[0].any())


def test_install_matches_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 5, (30,), generator=g)
    maps = []
    for fn in (install, install_reference):
        slot_map = torch.full((30,), -1, dtype=torch.int32)
        slot_row = torch.full((6,), -1, dtype=torch.int64)
        for step in range(3):
            s = score.roll(step * 7)
            new_rows, slots = plan_refresh(s, slot_map, slot_row)
            fn(new_rows, slots, slot_map, slot_row)
        maps.append((slot_map, slot_row))
    assert torch.equal(maps[0][0], maps[1][0]) and torch.equal(maps[0][1], maps[1][1])
    slot_map, slot_row = maps[0]
    held = slot_row[slot_row >= 0]
    assert torch.equal(slot_map[held].long(), torch.nonzero(slot_row >= 0).squeeze(1))
