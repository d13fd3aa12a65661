"""In-batch dedup and row gathers for the tiered lookups of :mod:`recserve.kernels.host`.

With dedup, each distinct row of a batch crosses PCIe once: :func:`dedup_ids` finds the batch's
distinct ids (in the id space shared by all tables, :func:`globalize`), :func:`gather_rows`
copies those rows from host into an HBM staging buffer (whole 128-byte lines, coalesced), and
the pooling kernel then reads staging. For cached tables :func:`gather_unique` does the gather
instead: every distinct row is copied from its cache slot (hit) or from host (miss), and its
accesses are recorded once, with its count, for the cache policy. Each kernel has a plain-torch
reference (``*_reference``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from recserve.kernels.host import (
    _CACHED,
    _FEATURE,
    _GID_BASE,
    _LANES,
    _NCOL,
    _SCORE_MAX,
    _SOURCE,
    RECORD_LFU,
    RECORD_LRU,
    RECORD_NONE,
    SCORE_MAX,
    SOURCE_HOST,
    STAT_LANES,
    _field,
)


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
