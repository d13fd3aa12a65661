"""Pooled lookups over tiered rows: host DRAM read in place, an HBM cache, in-batch dedup.

Formula (as :mod:`recserve.kernels.pooled`), for table ``t`` and item ``b`` with ids ``v[s:e]``::

    out[b, col_t : col_t + D_t] = scale_b * sum_{i in [s, e)} w_i * row_t(v[i])

Where ``row_t(r)`` is read from, per table and per id (the *source*):

- an HBM table: ``hbm + base_t + r * stride_t``;
- a host table, in place: ``host + base_t + r * stride_t`` (pinned host memory, read over PCIe
  through unified virtual addressing; ``base_t`` and ``stride_t`` are multiples of 128 bytes so
  every row is whole, aligned 128-byte lines);
- a host table after dedup: ``stage + inverse[i] * stage_stride`` (the batch's unique rows,
  gathered once into HBM by :func:`gather_rows`);
- and, for tables in the cache, ``cache + slot * cache_stride`` when ``slot_map[gid_t + r] >= 0``
  (``gid_t + r`` is the row's id in the id space shared by all cached tables).

All four are selected per id inside one launch, so cache hits come from HBM and misses from host
in the same kernel. The kernel also counts lookups of host tables and hits per table (``stats``)
and records accesses for the cache policy (LFU: ``score[g] += 1``; LRU: ``score[g] = tick``).
Those atomics are relaxed: Triton's default (acquire-release) compiles each to a GPU-wide
``MEMBAR`` before and an L1 invalidation after an atomic that must return, so every step of the
loop would wait for its atomics (queued behind all others on a hot row's counter) before its row
loads could start; relaxed ones compile to fire-and-forget reductions.

With dedup, cached tables go through :func:`gather_unique` instead: every distinct row of the
batch is visited once, copied into staging from its cache slot (hit) or from the host (miss),
and its accesses are recorded once with its count (no atomics on the policy's scores at all);
the pooling kernel then reads staging only, as for host tables without a cache.

Per-table metadata ``meta [T, len(TIER_FIELDS)]`` int64, offsets in elements of the row dtype
(bytes for int8, whose rows hold D codes, then at ``scale_off`` an fp32 scale and bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

TIER_FIELDS = (
    "source",
    "base",
    "stride",
    "width",
    "dim",
    "col",
    "mean",
    "feature",
    "gid_base",
    "cached",
    "scale_off",
    "table",
)
"""Per-table metadata columns: source (0 host, 1 HBM), where row 0 starts in that source, row
stride, elements a row load covers (D rounded up to 16 bytes), D, first output column, 1 for
mean pooling, which KeyedJagged feature the table reads, the id of row 0 in the shared id space
(-1: not a host table), 1 if the table's rows may be cached, the int8 scale's byte offset in a
row, and the table's index in the backend (its row of ``stats``)."""
TIER_COLS = len(TIER_FIELDS)
SOURCE_HOST = 0
SOURCE_HBM = 1
STAT_LANES = 64
"""Programs add their counts to one of this many lanes per table (spreads atomic contention)."""
RECORD_NONE, RECORD_LFU, RECORD_LRU = 0, 1, 2
SENTINEL32 = 2**31 - 1
SENTINEL64 = 2**63 - 1

_NCOL = tl.constexpr(TIER_COLS)
_SOURCE = tl.constexpr(0)
_BASE = tl.constexpr(1)
_STRIDE = tl.constexpr(2)
_WIDTH = tl.constexpr(3)
_DIM = tl.constexpr(4)
_COL = tl.constexpr(5)
_MEAN = tl.constexpr(6)
_FEATURE = tl.constexpr(7)
_GID_BASE = tl.constexpr(8)
_CACHED = tl.constexpr(9)
_SCALE_OFF = tl.constexpr(10)
_TABLE = tl.constexpr(11)
_LANES = tl.constexpr(STAT_LANES)
SCORE_MAX = 2**30
"""LFU counts saturate here (int32 scores; a refresh halves them)."""
_SCORE_MAX = tl.constexpr(SCORE_MAX)


@dataclass(frozen=True)
class TierConfig:
    """Launch knobs: ``bags`` items per program, ``rows`` ids of each in flight at once."""

    bags: int = 1
    rows: int = 32
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("bags", "rows"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {v}")


@dataclass(frozen=True)
class TierGroup:
    """Tables of one row dtype, as one launch sees them."""

    meta: torch.Tensor
    """``[T, TIER_COLS]`` int64 on the device."""
    meta_host: torch.Tensor
    block_d: int
    """Tile width: next power of two of the widest row load, in elements."""
    vec: int
    """Elements in 16 bytes."""
    quant: bool
    any_cached: bool

    @property
    def num_tables(self) -> int:
        return int(self.meta_host.shape[0])


@triton.jit
def _load_rows(rowp, ok, d_ok, d, QUANT: tl.constexpr, scale_off):
    """Rows at pointers ``rowp [BAGS, ROWS]`` as fp32 ``[BAGS, ROWS, BLOCK_D]`` (0 where not
    ``ok``); int8 rows are dequantised with the scale and bias at byte ``scale_off``."""
    m = ok[:, :, None] & d_ok[None, None, :]
    x = tl.load(rowp[:, :, None] + d[None, None, :], mask=m, other=0.0).to(tl.float32)
    if QUANT:
        sbp = (rowp + scale_off).to(tl.pointer_type(tl.float32), bitcast=True)
        scale = tl.load(sbp, mask=ok, other=0.0)
        bias = tl.load(sbp + 1, mask=ok, other=0.0)
        x = x * scale[:, :, None] + bias[:, :, None]
    return x


@triton.jit
def _tiered_pooled_kernel(
    values_ptr,
    offsets_ptr,
    psw_ptr,
    inverse_ptr,
    host_ptr,
    hbm_ptr,
    stage_ptr,
    cache_ptr,
    slot_map_ptr,
    score_ptr,
    tick_ptr,
    stats_ptr,
    meta_ptr,
    out_ptr,
    batch,
    out_stride,
    stage_stride,
    cache_stride,
    BAGS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VEC: tl.constexpr,
    QUANT: tl.constexpr,
    HAS_PSW: tl.constexpr,
    DEDUP: tl.constexpr,
    CACHED: tl.constexpr,
    RECORD: tl.constexpr,
    STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks = tl.cdiv(batch, BAGS)
    t = pid // blocks
    blk = pid - t * blocks

    meta = meta_ptr + t * _NCOL
    source = tl.load(meta + _SOURCE)
    is_hbm = source == 1
    is_host = source == 0
    base = tl.multiple_of(tl.load(meta + _BASE), VEC)
    stride = tl.multiple_of(tl.load(meta + _STRIDE), VEC)
    width = tl.multiple_of(tl.load(meta + _WIDTH), VEC)
    dim = tl.load(meta + _DIM)
    col = tl.load(meta + _COL)
    feature = tl.load(meta + _FEATURE)
    if CACHED:
        gid_base = tl.load(meta + _GID_BASE)
        cached_t = tl.where(is_host, tl.load(meta + _CACHED) != 0, False)
        if RECORD == 2:
            tick = tl.load(tick_ptr)
    scale_off = tl.load(meta + _SCALE_OFF)

    if DEDUP:  # host rows come from the staging buffer, indexed by the unique-row number
        src = tl.where(is_hbm, hbm_ptr, stage_ptr)
        row_base = tl.where(is_hbm, base, 0)
        row_stride = tl.multiple_of(tl.where(is_hbm, stride, stage_stride), VEC)
    else:
        src = tl.where(is_hbm, hbm_ptr, host_ptr)
        row_base = base
        row_stride = stride

    bags = blk * BAGS + tl.arange(0, BAGS)
    bag_ok = bags < batch
    bag_idx = feature * batch + bags
    start = tl.load(offsets_ptr + bag_idx, mask=bag_ok, other=0)
    end = tl.load(offsets_ptr + bag_idx + 1, mask=bag_ok, other=0)
    length = end - start
    max_len = tl.max(length, axis=0)

    d = tl.arange(0, BLOCK_D)
    # Compare in units of VEC so the mask is constant over each 16-byte vector.
    d_ok = (d // VEC) < (width // VEC)
    pos0 = tl.arange(0, ROWS)
    acc = tl.zeros((BAGS, ROWS, BLOCK_D), dtype=tl.float32)
    n_lookups = tl.sum(length, axis=0)
    n_hits = n_lookups * 0
    for j in range(0, max_len, ROWS):
        pos = j + pos0
        ok = pos[None, :] < length[:, None]
        idx = start[:, None] + pos[None, :]
        ids = tl.load(values_ptr + idx, mask=ok, other=0).to(tl.int64)
        if DEDUP:
            u = tl.load(inverse_ptr + idx, mask=tl.where(is_host, ok, False), other=0)
            u = u.to(tl.int64)
            r = tl.where(is_hbm, ids, u)
        else:
            r = ids
        row = tl.multiple_of(row_base + r * row_stride, [VEC, VEC])
        from_src = ok
        if CACHED:
            use = tl.where(cached_t, ok, False)
            gid = gid_base + ids
            slot = tl.load(slot_map_ptr + gid, mask=use, other=-1).to(tl.int64)
            hit = slot >= 0
            from_src = ok & (slot < 0)
            if RECORD == 1:  # relaxed: a fire-and-forget reduction, no fence before the loads
                tl.atomic_add(score_ptr + gid, 1, mask=use, sem="relaxed")
            if RECORD == 2:
                tl.store(score_ptr + gid, tl.zeros_like(slot).to(tl.int32) + tick, mask=use)
            if STATS:
                n_hits += tl.sum(tl.sum(hit.to(tl.int64), axis=1), axis=0)
        # Hits and misses are two masked loads from two bases (not one load through a selected
        # pointer), so the compiler keeps the alignment it needs for 16-byte vector loads.
        x = _load_rows(src + row, from_src, d_ok, d, QUANT, scale_off)
        if CACHED:
            crow = tl.multiple_of(slot * cache_stride, [VEC, VEC])
            x += _load_rows(cache_ptr + crow, hit, d_ok, d, QUANT, scale_off)
        if HAS_PSW:
            w = tl.load(psw_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            x = x * w[:, :, None]
        acc += x

    pooled = tl.sum(acc, axis=1)
    mean = tl.load(meta + _MEAN)
    inv = tl.where(mean != 0, 1.0 / tl.maximum(length, 1).to(tl.float32), 1.0)
    pooled = pooled * inv[:, None]
    out_ptrs = out_ptr + bags[:, None].to(tl.int64) * out_stride + col + d[None, :]
    tl.store(out_ptrs, pooled, mask=bag_ok[:, None] & (d < dim)[None, :])
    if STATS:
        lane = stats_ptr + (tl.load(meta + _TABLE) * _LANES + blk % _LANES) * 2
        tl.atomic_add(lane, tl.where(is_host, n_lookups, 0).to(tl.int64), sem="relaxed")
        tl.atomic_add(lane + 1, n_hits.to(tl.int64), sem="relaxed")


@triton.jit
def _globalize_kernel(
    values_ptr,
    offsets_ptr,
    meta_ptr,
    slot_map_ptr,
    gids_ptr,
    batch,
    sentinel,
    BAGS: tl.constexpr,
    BLOCK: tl.constexpr,
    CACHED: tl.constexpr,
):
    """``gids[i] = gid_t + values[i]`` for positions of host tables (cache hits excluded)."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(batch, BAGS)
    t = pid // blocks
    blk = pid - t * blocks
    meta = meta_ptr + t * _NCOL
    is_host = tl.load(meta + _SOURCE) == 0
    gid_base = tl.load(meta + _GID_BASE)
    feature = tl.load(meta + _FEATURE)
    first = feature * batch + blk * BAGS
    last = feature * batch + tl.minimum(blk * BAGS + BAGS, batch)
    lo = tl.load(offsets_ptr + first)
    hi = tl.load(offsets_ptr + last)
    hi = tl.where(is_host, hi, lo)
    if CACHED:
        cached_t = tl.load(meta + _CACHED) != 0
    for p in range(lo, hi, BLOCK):
        idx = p + tl.arange(0, BLOCK)
        ok = idx < hi
        g = gid_base + tl.load(values_ptr + idx, mask=ok, other=0).to(tl.int64)
        if CACHED:
            slot = tl.load(slot_map_ptr + g, mask=tl.where(cached_t, ok, False), other=-1)
            g = tl.where(slot >= 0, sentinel, g)
        tl.store(gids_ptr + idx, g.to(gids_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gather_rows_kernel(
    gids_ptr,
    dest_ptr,
    row_bounds_ptr,
    row_meta_ptr,
    src_ptr,
    out_ptr,
    count,
    out_stride,
    num_tables,
    sentinel,
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    TP2: tl.constexpr,
    HAS_DEST: tl.constexpr,
):
    """Copy rows ``gids[u]`` from the host into ``out`` row ``dest[u]`` (or ``u``), as 32-bit
    words; ``row_bounds [H + 1]`` are the first ids of each host table, ``row_meta [H, 3]`` its
    base, stride and copy length in words."""
    pid = tl.program_id(0).to(tl.int64)
    u = pid * ROWS + tl.arange(0, ROWS)
    ok = u < count
    g = tl.load(gids_ptr + u, mask=ok, other=sentinel).to(tl.int64)
    ok = ok & (g != sentinel)
    if HAS_DEST:
        dest = tl.load(dest_ptr + u, mask=ok, other=-1).to(tl.int64)
        ok = ok & (dest >= 0)
    else:
        dest = u
    tt = tl.arange(0, TP2)
    bounds = tl.load(row_bounds_ptr + 1 + tt, mask=tt < num_tables, other=sentinel)
    table = tl.sum((g[:, None] >= bounds[None, :]).to(tl.int32), axis=1)
    table = tl.where(ok, table, 0)
    first = tl.load(row_bounds_ptr + table)
    rm = row_meta_ptr + table * 3
    src_row = tl.load(rm) + (g - first) * tl.load(rm + 1)
    src_row = tl.multiple_of(tl.where(ok, src_row, 0), [4])
    words = tl.load(rm + 2)
    w = tl.arange(0, BLOCK_W)
    m = ok[:, None] & ((w // 4)[None, :] < (words // 4)[:, None])
    x = tl.load(src_ptr + src_row[:, None] + w[None, :], mask=m, other=0)
    dst_row = tl.multiple_of(dest * out_stride, [4])
    tl.store(out_ptr + dst_row[:, None] + w[None, :], x, mask=m)


@triton.jit
def _gather_unique_kernel(
    gids_ptr,
    counts_ptr,
    row_bounds_ptr,
    row_meta_ptr,
    src_ptr,
    out_ptr,
    cache_ptr,
    slot_map_ptr,
    score_ptr,
    tick_ptr,
    stats_ptr,
    stat_table_ptr,
    tally_ptr,
    count,
    out_stride,
    cache_stride,
    num_tables,
    num_cached,
    sentinel,
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    TP2: tl.constexpr,
    RECORD: tl.constexpr,
    STATS: tl.constexpr,
    TALLY: tl.constexpr,
):
    """Visit each distinct host row ``gids[u]`` of a batch once (looked up ``counts[u]`` times):
    copy it into ``out`` row ``u`` from its cache slot (hit) or from the host (miss), record its
    accesses (LFU: score += count; LRU: score = tick), add its lookups and hits to ``stats`` of
    its table (``stat_table`` maps host tables to rows of ``stats``) and, with ``TALLY``, the
    distinct misses and lookups to ``tally``. Ids below ``num_cached`` may be cached. Every id is
    distinct, so the score updates need no atomics."""
    pid = tl.program_id(0).to(tl.int64)
    u = pid * ROWS + tl.arange(0, ROWS)
    ok = u < count
    g = tl.load(gids_ptr + u, mask=ok, other=sentinel).to(tl.int64)
    ok = ok & (g != sentinel)
    n = tl.load(counts_ptr + u, mask=ok, other=0).to(tl.int32)
    tt = tl.arange(0, TP2)
    bounds = tl.load(row_bounds_ptr + 1 + tt, mask=tt < num_tables, other=sentinel)
    table = tl.sum((g[:, None] >= bounds[None, :]).to(tl.int32), axis=1)
    table = tl.where(ok, table, 0)
    first = tl.load(row_bounds_ptr + table)
    rm = row_meta_ptr + table * 3
    cached = ok & (g < num_cached)
    slot = tl.load(slot_map_ptr + g, mask=cached, other=-1).to(tl.int64)
    hit = cached & (slot >= 0)
    miss = ok & ~hit
    if RECORD == 1:
        old = tl.load(score_ptr + g, mask=cached, other=0)
        tl.store(score_ptr + g, tl.minimum(old + n, _SCORE_MAX), mask=cached)
    if RECORD == 2:
        tl.store(score_ptr + g, tl.zeros_like(n) + tl.load(tick_ptr), mask=cached)
    words = tl.load(rm + 2)
    w = tl.arange(0, BLOCK_W)
    in_row = (w // 4)[None, :] < (words // 4)[:, None]
    src_row = tl.load(rm) + (g - first) * tl.load(rm + 1)
    src_row = tl.multiple_of(tl.where(miss, src_row, 0), [4])
    x = tl.load(src_ptr + src_row[:, None] + w[None, :], mask=miss[:, None] & in_row, other=0)
    crow = tl.multiple_of(tl.where(hit, slot * cache_stride, 0), [4])
    y = tl.load(cache_ptr + crow[:, None] + w[None, :], mask=hit[:, None] & in_row, other=0)
    x = tl.where(hit[:, None], y, x)
    dst_row = tl.multiple_of(u * out_stride, [4])
    tl.store(out_ptr + dst_row[:, None] + w[None, :], x, mask=ok[:, None] & in_row)
    lane = pid % _LANES
    if STATS:  # per-table sums of this program, then one relaxed add per table it touched
        sel = (table[:, None] == tt[None, :]) & ok[:, None]
        lookups = tl.sum(tl.where(sel, n[:, None], 0).to(tl.int64), axis=0)
        hits = tl.sum(tl.where(sel & hit[:, None], n[:, None], 0).to(tl.int64), axis=0)
        live = (tt < num_tables) & (lookups > 0)
        row = tl.load(stat_table_ptr + tt, mask=live, other=0).to(tl.int64)
        at = stats_ptr + (row * _LANES + lane) * 2
        tl.atomic_add(at, lookups, mask=live, sem="relaxed")
        tl.atomic_add(at + 1, hits, mask=live, sem="relaxed")
    if TALLY:
        distinct = tl.sum(miss.to(tl.int64), axis=0)
        tl.atomic_add(tally_ptr + lane * 2, distinct, sem="relaxed")
        tl.atomic_add(tally_ptr + lane * 2 + 1, tl.sum(n.to(tl.int64), axis=0), sem="relaxed")


def tiered_pooled(
    group: TierGroup,
    values: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    out: torch.Tensor,
    *,
    host: object,
    hbm: object | None = None,
    config: TierConfig = TierConfig(),
    per_sample_weights: torch.Tensor | None = None,
    stage: object | None = None,
    stage_stride: int = 0,
    inverse: torch.Tensor | None = None,
    cache: object | None = None,
    cache_stride: int = 0,
    slot_map: torch.Tensor | None = None,
    score: torch.Tensor | None = None,
    record: int = RECORD_NONE,
    tick: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the tiered pooled lookup for every table of ``group`` into ``out [B, *]``.

    ``host``/``hbm``/``stage``/``cache`` are pointer arguments of the group's element type
    (tensors, or :class:`~recserve.storage.host.DevicePointer` for registered host memory);
    strides are in elements. Dedup mode needs ``stage`` and ``inverse``; cache mode needs
    ``cache``, ``slot_map`` (and ``score`` to record, ``stats`` to count). No host sync.
    """
    dedup = inverse is not None
    cached = slot_map is not None and group.any_cached
    if dedup and stage is None:
        raise ValueError("dedup needs the staging buffer")
    if cached and cache is None:
        raise ValueError("a slot map needs the cache rows")
    grid = (group.num_tables * triton.cdiv(batch_size, config.bags),)
    if grid[0] == 0:
        return out
    dummy = group.meta
    _tiered_pooled_kernel[grid](
        values,
        offsets,
        per_sample_weights if per_sample_weights is not None else values,
        inverse if dedup else values,
        host,
        hbm if hbm is not None else host,
        stage if dedup else host,
        cache if cached else host,
        slot_map if cached else dummy,
        score if (cached and record) else dummy,
        tick if tick is not None else dummy,
        stats if stats is not None else dummy,
        group.meta,
        out,
        batch_size,
        out.stride(0),
        stage_stride,
        cache_stride,
        BAGS=config.bags,
        ROWS=config.rows,
        BLOCK_D=group.block_d,
        VEC=group.vec,
        QUANT=group.quant,
        HAS_PSW=per_sample_weights is not None,
        DEDUP=dedup,
        CACHED=cached,
        RECORD=record if cached else RECORD_NONE,
        STATS=stats is not None,
        num_warps=config.num_warps,
    )
    return out


def globalize(
    meta: torch.Tensor,
    num_tables: int,
    values: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    gids: torch.Tensor,
    sentinel: int,
    slot_map: torch.Tensor | None = None,
    bags: int = 64,
) -> torch.Tensor:
    """Fill ``gids`` (prefilled with the sentinel) with shared-space ids of host-table
    positions; with ``slot_map``, cached rows keep the sentinel (they need no gather)."""
    grid = (num_tables * triton.cdiv(batch_size, bags),)
    if grid[0]:
        _globalize_kernel[grid](
            values,
            offsets,
            meta,
            slot_map if slot_map is not None else meta,
            gids,
            batch_size,
            sentinel,
            BAGS=bags,
            BLOCK=256,
            CACHED=slot_map is not None,
        )
    return gids


def dedup_ids(
    gids: torch.Tensor, sentinel: int, with_counts: bool = False
) -> tuple[torch.Tensor, ...]:
    """Unique ids without a host sync: ``(unique [N], inverse [N])`` with ``unique[inverse[i]]
    == gids[i]``; ``unique`` is sorted and padded with ``sentinel`` (fixed size N). With
    ``with_counts``, also ``counts [N]``: how many times ``unique[u]`` occurs (0 past the last)."""
    n = gids.numel()
    ordered, perm = torch.sort(gids)
    new = torch.ones(n, dtype=torch.bool, device=gids.device)
    torch.ne(ordered[1:], ordered[:-1], out=new[1:])
    index_dtype = torch.int32 if n < 2**31 - 2 else torch.int64
    uid = torch.cumsum(new, 0, dtype=index_dtype) - 1
    inverse = torch.empty_like(uid).scatter_(0, perm, uid)
    uid_long = uid.long()
    unique = torch.full_like(gids, sentinel).scatter_(0, uid_long, ordered)
    if not with_counts:
        return unique, inverse
    # Where each run of equal ids starts in sorted order (n after the last run); repeats write
    # to a spare entry. A run's length is the distance to the next run's start.
    starts = torch.full((n + 2,), n, dtype=index_dtype, device=gids.device)
    first = torch.where(new, uid_long, n + 1)
    starts.scatter_(0, first, torch.arange(n, dtype=index_dtype, device=gids.device))
    counts = starts[1 : n + 1] - starts[:n]
    return unique, inverse, counts


def gather_rows(
    gids: torch.Tensor,
    row_bounds: torch.Tensor,
    row_meta: torch.Tensor,
    src: object,
    out: object,
    out_stride_words: int,
    max_words: int,
    sentinel: int,
    dest: torch.Tensor | None = None,
    rows: int = 32,
    num_warps: int = 4,
) -> None:
    """Copy host rows ``gids`` (sentinels skipped) into rows ``dest`` (default: their index) of
    ``out``; ``src``/``out`` are int32 pointer arguments, strides and lengths in words."""
    count = gids.numel()
    if count == 0:
        return
    num_tables = int(row_meta.shape[0])
    _gather_rows_kernel[(triton.cdiv(count, rows),)](
        gids,
        dest if dest is not None else gids,
        row_bounds,
        row_meta,
        src,
        out,
        count,
        out_stride_words,
        num_tables,
        sentinel,
        ROWS=rows,
        BLOCK_W=max(triton.next_power_of_2(max_words), 4),
        TP2=max(triton.next_power_of_2(num_tables), 2),
        HAS_DEST=dest is not None,
        num_warps=num_warps,
    )


def gather_unique(
    gids: torch.Tensor,
    counts: torch.Tensor,
    row_bounds: torch.Tensor,
    row_meta: torch.Tensor,
    src: object,
    out: object,
    out_stride_words: int,
    max_words: int,
    sentinel: int,
    *,
    cache: object,
    cache_stride_words: int,
    slot_map: torch.Tensor,
    num_cached: int,
    score: torch.Tensor | None = None,
    record: int = RECORD_NONE,
    tick: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    stat_table: torch.Tensor | None = None,
    tally: torch.Tensor | None = None,
    rows: int = 32,
    num_warps: int = 4,
) -> None:
    """The cached tables' dedup gather: each distinct row ``gids[u]`` (sentinels skipped,
    looked up ``counts[u]`` times in the batch) is copied into row ``u`` of ``out`` from the
    cache (``slot_map[g] >= 0``, ids below ``num_cached``) or from the host, with the accesses
    recorded once per row (``record``: LFU ``score += count``, LRU ``score = tick``) and the
    lookups and hits added to ``stats`` row ``stat_table[host table]``; ``tally [LANES, 2]``
    (optional) gets the distinct misses and the lookups. ``src``/``out``/``cache`` are int32
    pointer arguments, strides and lengths in words. No host sync, no contended atomics."""
    count = gids.numel()
    if count == 0:
        return
    if stats is not None and stat_table is None:
        raise ValueError("stats need stat_table (host table -> row of stats)")
    num_tables = int(row_meta.shape[0])
    dummy = row_meta
    _gather_unique_kernel[(triton.cdiv(count, rows),)](
        gids,
        counts,
        row_bounds,
        row_meta,
        src,
        out,
        cache,
        slot_map,
        score if (score is not None and record) else dummy,
        tick if tick is not None else dummy,
        stats if stats is not None else dummy,
        stat_table if stat_table is not None else dummy,
        tally if tally is not None else dummy,
        count,
        out_stride_words,
        cache_stride_words,
        num_tables,
        num_cached,
        sentinel,
        ROWS=rows,
        BLOCK_W=max(triton.next_power_of_2(max_words), 4),
        TP2=max(triton.next_power_of_2(num_tables), 2),
        RECORD=record if score is not None else RECORD_NONE,
        STATS=stats is not None,
        TALLY=tally is not None,
        num_warps=num_warps,
    )


# ---------------------------------------------------------------------------- references


def _field(meta_row: list[int], name: str) -> int:
    return meta_row[TIER_FIELDS.index(name)]


def _rows_at(src: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
    """``[n, width]`` elements of the flat ``src`` from each element index in ``start``."""
    return src[start.unsqueeze(1) + torch.arange(width, device=src.device)]


def _scale_bias_at(src: torch.Tensor, start: torch.Tensor, scale_off: int) -> torch.Tensor:
    sb = src.view(torch.float32)
    at = (start + scale_off) // 4
    return torch.stack([sb[at], sb[at + 1]], dim=1)


def tiered_pooled_reference(
    group: TierGroup,
    values: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    out: torch.Tensor,
    *,
    host: torch.Tensor,
    hbm: torch.Tensor | None = None,
    per_sample_weights: torch.Tensor | None = None,
    stage: torch.Tensor | None = None,
    stage_stride: int = 0,
    inverse: torch.Tensor | None = None,
    cache: torch.Tensor | None = None,
    cache_stride: int = 0,
    slot_map: torch.Tensor | None = None,
    score: torch.Tensor | None = None,
    record: int = RECORD_NONE,
    tick: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`tiered_pooled` in plain torch on flat tensors (one device): the test oracle and
    the path where Triton cannot run. Updates ``score`` and ``stats`` as the kernel does."""
    b = batch_size
    cached_mode = slot_map is not None and group.any_cached
    for t in range(group.num_tables):
        m = group.meta_host[t].tolist()
        f, dim, width = _field(m, "feature"), _field(m, "dim"), _field(m, "width")
        off = offsets[f * b : (f + 1) * b + 1].long()
        lo, hi = int(off[0]), int(off[-1])
        lengths = off[1:] - off[:-1]
        ids = values[lo:hi].long()
        is_hbm = _field(m, "source") == SOURCE_HBM
        if inverse is not None and not is_hbm:
            assert stage is not None
            src, start = stage, inverse[lo:hi].long() * stage_stride
        else:
            src = hbm if is_hbm else host
            assert src is not None
            start = _field(m, "base") + ids * _field(m, "stride")
        rows = _rows_at(src, start, width)[:, :dim].float()
        if group.quant:
            sb = _scale_bias_at(src, start, _field(m, "scale_off"))
        hits = torch.zeros(0)
        if cached_mode and _field(m, "cached") and not is_hbm:
            assert slot_map is not None and cache is not None
            gid = _field(m, "gid_base") + ids
            slot = slot_map[gid].long()
            hits = slot >= 0
            cstart = slot[hits] * cache_stride
            rows[hits] = _rows_at(cache, cstart, width)[:, :dim].float()
            if group.quant:
                sb[hits] = _scale_bias_at(cache, cstart, _field(m, "scale_off"))
            if record == RECORD_LFU:
                assert score is not None
                score.index_add_(0, gid, torch.ones_like(gid, dtype=score.dtype))
            elif record == RECORD_LRU:
                assert score is not None and tick is not None
                score[gid] = tick.to(score.dtype)
        if group.quant:
            rows = rows * sb[:, :1] + sb[:, 1:]
        if per_sample_weights is not None:
            rows = rows * per_sample_weights[lo:hi].float().unsqueeze(1)
        bag = torch.repeat_interleave(torch.arange(b, device=rows.device), lengths)
        pooled = torch.zeros(b, dim, dtype=torch.float32, device=rows.device)
        pooled.index_add_(0, bag, rows)
        if _field(m, "mean"):
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).float()
        col = _field(m, "col")
        out[:, col : col + dim] = pooled
        if stats is not None:
            lane = stats.view(-1, STAT_LANES, 2)[_field(m, "table"), 0]
            lane[0] += 0 if is_hbm else hi - lo
            lane[1] += int(hits.sum()) if hits.numel() else 0
    return out


def globalize_reference(
    meta_host: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    gids: torch.Tensor,
    sentinel: int,
    slot_map: torch.Tensor | None = None,
) -> torch.Tensor:
    b = batch_size
    for t in range(meta_host.shape[0]):
        m = meta_host[t].tolist()
        if _field(m, "source") != SOURCE_HOST:
            continue
        f = _field(m, "feature")
        lo, hi = int(offsets[f * b]), int(offsets[(f + 1) * b])
        g = _field(m, "gid_base") + values[lo:hi].long()
        if slot_map is not None and _field(m, "cached"):
            g = torch.where(slot_map[g] >= 0, sentinel, g)
        gids[lo:hi] = g.to(gids.dtype)
    return gids


def gather_rows_reference(
    gids: torch.Tensor,
    row_bounds: torch.Tensor,
    row_meta: torch.Tensor,
    src: torch.Tensor,
    out: torch.Tensor,
    out_stride_words: int,
    sentinel: int,
    dest: torch.Tensor | None = None,
) -> None:
    """:func:`gather_rows` in plain torch (``src``/``out`` flat int32 tensors)."""
    g = gids.long()
    ok = g != sentinel
    d = dest.long() if dest is not None else torch.arange(g.numel(), device=g.device)
    if dest is not None:
        ok &= d >= 0
    g, d = g[ok], d[ok]
    table = torch.searchsorted(row_bounds[1:].contiguous(), g, right=True)
    meta = row_meta[table]
    src_row = meta[:, 0] + (g - row_bounds[table]) * meta[:, 1]
    for words in torch.unique(meta[:, 2]).tolist():
        sel = meta[:, 2] == words
        cols = torch.arange(words, device=g.device)
        rows = src[src_row[sel].unsqueeze(1) + cols]
        out[(d[sel] * out_stride_words).unsqueeze(1) + cols] = rows


def gather_unique_reference(
    gids: torch.Tensor,
    counts: torch.Tensor,
    row_bounds: torch.Tensor,
    row_meta: torch.Tensor,
    src: torch.Tensor,
    out: torch.Tensor,
    out_stride_words: int,
    sentinel: int,
    *,
    cache: torch.Tensor,
    cache_stride_words: int,
    slot_map: torch.Tensor,
    num_cached: int,
    score: torch.Tensor | None = None,
    record: int = RECORD_NONE,
    tick: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    stat_table: torch.Tensor | None = None,
    tally: torch.Tensor | None = None,
) -> None:
    """:func:`gather_unique` in plain torch (``src``/``out``/``cache`` flat int32 tensors)."""
    g = gids.long()
    ok = g != sentinel
    u = torch.arange(g.numel(), device=g.device)[ok]
    g, n = g[ok], counts[ok].long()
    cached = g < num_cached
    slot = torch.full_like(g, -1)
    slot[cached] = slot_map[g[cached]].long()
    hit = slot >= 0
    gather_rows_reference(
        torch.where(hit, sentinel, g), row_bounds, row_meta, src, out, out_stride_words,
        sentinel, dest=u,
    )  # fmt: skip
    table = torch.searchsorted(row_bounds[1:].contiguous(), g, right=True)
    words_of = row_meta[table, 2]
    for words in torch.unique(words_of[hit]).tolist():
        sel = hit & (words_of == words)
        cols = torch.arange(words, device=g.device)
        rows = cache[(slot[sel] * cache_stride_words).unsqueeze(1) + cols]
        out[(u[sel] * out_stride_words).unsqueeze(1) + cols] = rows
    if score is not None and record == RECORD_LFU:
        gc = g[cached]
        score[gc] = (score[gc].long() + n[cached]).clamp(max=SCORE_MAX).to(score.dtype)
    elif score is not None and record == RECORD_LRU:
        assert tick is not None
        score[g[cached]] = tick.to(score.dtype)
    if stats is not None:
        assert stat_table is not None
        lane = stats.view(-1, STAT_LANES, 2)[:, 0]
        row = stat_table.long()[table]
        lane[:, 0].index_add_(0, row, n)
        lane[:, 1].index_add_(0, row, torch.where(hit, n, 0))
    if tally is not None:
        tally.view(-1, 2)[0, 0] += int((~hit).sum())
        tally.view(-1, 2)[0, 1] += int(n.sum())
