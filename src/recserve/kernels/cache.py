"""Device-side bookkeeping of the HBM row cache: which rows to admit, where, and installing them.

The cache (:mod:`recserve.storage.cache`) maps ids of a shared id space to slots:
``slot_map [R] int32`` (-1: not cached) and back, ``slot_row [C] int64`` (-1: empty slot). Every
lookup records accesses in ``score [R]`` (LFU: counts; LRU: the batch tick of the last access).
A refresh makes the cache hold the ``C`` rows of highest score:

1. ``key = 2 * score + cached`` (ties go to rows already cached, so equal scores do not churn);
   the top ``C`` keys with ``score > 0`` are the wanted rows.
2. Wanted rows not cached are *admitted*; slots that are empty or hold a row no longer wanted
   are *free*; the i-th admitted row goes to the i-th free slot. There are always at least as
   many free slots as admitted rows (both sets have ``C`` members).
3. :func:`install` updates both maps; the row data is copied by
   :func:`recserve.kernels.gather.gather_rows` with the slots as destinations.

Everything has a fixed size (no ``nonzero``, no ``.item()``), so a refresh never synchronises
with the host and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def plan_refresh(
    key_score: torch.Tensor,
    slot_map: torch.Tensor,
    slot_row: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new_rows [k], slots [k])`` int64: row ``new_rows[i]`` goes to slot ``slots[i]``
    (both -1 where nothing moves). ``key_score [R]`` is the policy's score (>= 0)."""
    rows = slot_map.numel()
    capacity = slot_row.numel()
    k = min(capacity, rows)
    if k == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=slot_map.device)
        return empty, empty
    cached = slot_map >= 0
    key = key_score.to(torch.int64) * 2 + cached.to(torch.int64)
    top_key, top_rows = torch.topk(key, k, sorted=False)
    wanted = top_key >= 2
    admit = wanted & ~cached[top_rows]
    in_want = torch.zeros(rows, dtype=torch.bool, device=slot_map.device)
    in_want.scatter_(0, top_rows, wanted)
    held = slot_row >= 0
    free = ~held | ~in_want[slot_row.clamp(min=0)]
    # Stable sorts put admitted rows (by position) and free slots (by slot number) first.
    admit_order = torch.sort((~admit).to(torch.int8), stable=True).indices
    free_order = torch.sort((~free).to(torch.int8), stable=True).indices[:k]
    n_admit = admit.sum()
    pair = torch.arange(k, device=slot_map.device) < n_admit
    new_rows = torch.where(pair, top_rows[admit_order], -1)
    slots = torch.where(pair, free_order, -1)
    return new_rows, slots


@triton.jit
def _install_kernel(
    new_rows_ptr, slots_ptr, slot_map_ptr, slot_row_ptr, count, BLOCK: tl.constexpr
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < count
    g = tl.load(new_rows_ptr + i, mask=ok, other=-1)
    s = tl.load(slots_ptr + i, mask=ok, other=-1)
    ok = ok & (g >= 0) & (s >= 0)
    old = tl.load(slot_row_ptr + s, mask=ok, other=-1)
    tl.store(slot_map_ptr + old, tl.full(old.shape, -1, tl.int32), mask=ok & (old >= 0))
    tl.store(slot_map_ptr + g, s.to(tl.int32), mask=ok)
    tl.store(slot_row_ptr + s, g, mask=ok)


def install(
    new_rows: torch.Tensor,
    slots: torch.Tensor,
    slot_map: torch.Tensor,
    slot_row: torch.Tensor,
    block: int = 1024,
) -> None:
    """Point ``slot_map``/``slot_row`` at the new rows (evicting what the slots held)."""
    n = new_rows.numel()
    if n:
        _install_kernel[(triton.cdiv(n, block),)](
            new_rows, slots, slot_map, slot_row, n, BLOCK=block
        )


def install_reference(
    new_rows: torch.Tensor, slots: torch.Tensor, slot_map: torch.Tensor, slot_row: torch.Tensor
) -> None:
    """:func:`install` in plain torch."""
    ok = (new_rows >= 0) & (slots >= 0)
    g, s = new_rows[ok], slots[ok]
    old = slot_row[s]
    slot_map[old[old >= 0]] = -1
    slot_map[g] = s.to(slot_map.dtype)
    slot_row[s] = g
