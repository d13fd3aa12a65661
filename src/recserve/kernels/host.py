"""Pooled lookups over tiered rows: host DRAM read in place, an HBM cache, in-batch dedup.

Formula (as :mod:`recserve.kernels.pooled`), for table ``t`` and item ``b`` with ids ``v[s:e]``::

    out[b, col_t : col_t + D_t] = scale_b * sum_{i in [s, e)} w_i * row_t(v[i])

Where ``row_t(r)`` is read from, per table and per id (the *source*):

- an HBM table: ``hbm + base_t + r * stride_t``;
- a host table, in place: ``host + base_t + r * stride_t`` (pinned host memory, read over PCIe
  through unified virtual addressing; ``base_t`` and ``stride_t`` are multiples of 128 bytes so
  every row is whole, aligned 128-byte lines);
- a host table after dedup: ``stage + inverse[i] * stage_stride`` (the batch's unique rows,
  gathered once into HBM by :func:`recserve.kernels.gather.gather_rows`);
- and, for tables in the cache, ``cache + slot * cache_stride`` when ``slot_map[gid_t + r] >= 0``
  (``gid_t + r`` is the row's id in the id space shared by all cached tables).

All four are selected per id inside one launch, so cache hits come from HBM and misses from host
in the same kernel. The kernel also counts lookups of host tables and hits per table (``stats``)
and records accesses for the cache policy (LFU: ``score[g] += 1``; LRU: ``score[g] = tick``).
Those atomics are relaxed: Triton's default (acquire-release) compiles each to a GPU-wide
``MEMBAR`` before and an L1 invalidation after an atomic that must return, so every step of the
loop would wait for its atomics (queued behind all others on a hot row's counter) before its row
loads could start; relaxed ones compile to fire-and-forget reductions.

With dedup, cached tables go through :func:`recserve.kernels.gather.gather_unique` instead: every distinct row of the
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
