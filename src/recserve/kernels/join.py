"""Join queries into one batch on the device, reading them where they lie in host memory.

A GPU batch that coalesces ``Q`` queries needs them in the layout the forward reads:
feature-major ids (feature ``f``'s ids of query 1, then of query 2, ...), offsets over
``size >= B`` items (the CUDA graph's bucket; items past ``B`` are empty bags) and item-major
dense rows. Joined on the host, every byte is copied at one core's memcpy rate (3-7 GB/s on the
H200 machine: 6.8 ms for four 8 MB dlrm-rmc2 queries, longer than the GPU's work on them).

When the queries lie in page-locked host memory the device can address (the shared regions the
GPU runner registers), :func:`join_queries` reads them over PCIe in place, in one launch, and
writes the joined batch straight into the graph's static inputs. The host only computes where
each piece goes (``Q x F`` segment bounds, read from the queries' offsets) into a small table
the kernel reads. Each program does one row of that table:

- ``OFFSETS``: the bags of one (feature, query) segment: ``out_offsets[dst + i] =
  offsets_q[f * b_q + i] + shift`` for its ``b_q`` bags, then ``pad`` empty bags at the
  feature's end (after the last query: the bucket's padding, and for the last feature the
  closing offset);
- ``IDS``: one chunk of a segment's ids, int64, host to ``out_values``;
- ``DENSE``: one chunk of a query's dense rows, fp32, host to ``out_dense``.

Source positions are element indices relative to one base tensor per dtype (the first query's
arrays): queries in different regions are still one unified address space on the device.
:func:`join_plan` builds the table; :func:`join_reference` is the plain-torch reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from recserve.types import Batch

OFFSETS, IDS, DENSE = 0, 1, 2
PLAN_COLUMNS = 7
"""Columns of a plan row: the role, then up to six fields."""
_NCOL = PLAN_COLUMNS
CHUNK = 1 << 15
"""Elements a copy program moves (256 KB of ids): enough programs to keep PCIe busy."""
BLOCK = 1024


@triton.jit
def _join_kernel(
    plan_ptr,
    src64_ptr,
    src32_ptr,
    out_offsets_ptr,
    out_values_ptr,
    out_dense_ptr,
    BLOCK: tl.constexpr,
):
    row = plan_ptr + tl.program_id(0).to(tl.int64) * 7
    role = tl.load(row)
    a = tl.load(row + 1)
    count = tl.load(row + 2)
    dst = tl.load(row + 3)
    lanes = tl.arange(0, BLOCK)
    if role == 0:  # OFFSETS: a = source of the segment's first offset
        shift = tl.load(row + 4)
        pad = tl.load(row + 5)
        end = tl.load(row + 6)
        for p in range(0, count, BLOCK):
            i = p + lanes
            ok = i < count
            v = tl.load(src64_ptr + a + i, mask=ok, other=0)
            tl.store(out_offsets_ptr + dst + i, v + shift, mask=ok)
        for p in range(0, pad, BLOCK):
            i = p + lanes
            tl.store(out_offsets_ptr + dst + count + i, tl.zeros_like(i) + end, mask=i < pad)
    elif role == 1:  # IDS
        for p in range(0, count, BLOCK):
            i = p + lanes
            ok = i < count
            tl.store(out_values_ptr + dst + i, tl.load(src64_ptr + a + i, mask=ok), mask=ok)
    else:  # DENSE
        for p in range(0, count, BLOCK):
            i = p + lanes
            ok = i < count
            tl.store(out_dense_ptr + dst + i, tl.load(src32_ptr + a + i, mask=ok), mask=ok)


def _index(t: torch.Tensor, base: torch.Tensor) -> int:
    """``t``'s first element as an element index from ``base``'s (same dtype, aligned)."""
    delta = t.data_ptr() - base.data_ptr()
    size = t.element_size()
    if delta % size:
        raise ValueError("query arrays must be aligned to their elements")
    return delta // size


def join_plan(parts: Sequence[Batch], size: int, out: np.ndarray | None = None) -> np.ndarray:
    """The table :func:`join_queries` runs: ``[rows, 7]`` int64 (written into ``out`` when
    it has room). Sources are relative to ``parts[0]``'s ids (offsets, ids) and dense rows."""
    keys = parts[0].sparse.keys
    nf = len(keys)
    b_total = sum(p.batch_size for p in parts)
    if size < b_total:
        raise ValueError(f"cannot join {b_total} items into a bucket of {size}")
    base64, base32 = parts[0].sparse.values, parts[0].dense
    nq = len(parts)
    starts = np.empty((nf + 1, nq), dtype=np.int64)
    off_src = np.empty(nq, dtype=np.int64)
    val_src = np.empty(nq, dtype=np.int64)
    bags = np.empty(nq, dtype=np.int64)
    for q, p in enumerate(parts):
        s = p.sparse
        if s.keys != keys:
            raise ValueError("joined queries must have the same features")
        b = s.batch_size
        bags[q] = b
        starts[:, q] = s.offsets.numpy()[::b] if b else 0
        off_src[q] = _index(s.offsets, base64)
        val_src[q] = _index(s.values, base64)
    seglen = np.diff(starts, axis=0)  # [F, Q]
    dst = np.zeros(nf * nq + 1, dtype=np.int64)
    np.cumsum(seglen.reshape(-1), out=dst[1:])
    dst_start = dst[:-1].reshape(nf, nq)
    item_base = np.concatenate([[0], np.cumsum(bags)[:-1]])
    feature = np.arange(nf, dtype=np.int64)[:, None]
    # OFFSETS rows, one per (feature, query), feature-major
    pad = np.zeros((nf, nq), dtype=np.int64)
    pad[:, -1] = size - b_total
    pad[-1, -1] += 1  # the closing offset
    offs = np.empty((nf, nq, _NCOL), dtype=np.int64)
    offs[..., 0] = OFFSETS
    offs[..., 1] = off_src[None, :] + feature * bags[None, :]
    offs[..., 2] = bags[None, :]
    offs[..., 3] = feature * size + item_base[None, :]
    offs[..., 4] = dst_start - starts[:-1]
    offs[..., 5] = pad
    offs[..., 6] = dst_start + seglen
    # IDS rows: every segment cut into chunks of CHUNK ids
    seg_src = (val_src[None, :] + starts[:-1]).reshape(-1)
    seg_len, seg_dst = seglen.reshape(-1), dst_start.reshape(-1)
    ids = _chunks(IDS, seg_src, seg_len, seg_dst)
    # DENSE rows
    nd = parts[0].dense.shape[-1] if parts[0].dense.dim() == 2 else 0
    dense_rows = np.empty((0, _NCOL), dtype=np.int64)
    if nd:
        d_src = np.array([_index(p.dense, base32) for p in parts], dtype=np.int64)
        dense_rows = _chunks(DENSE, d_src, bags * nd, item_base * nd)
    rows = offs.shape[0] * offs.shape[1] + ids.shape[0] + dense_rows.shape[0]
    table = (
        out[:rows]
        if out is not None and out.shape[0] >= rows
        else np.empty((rows, _NCOL), np.int64)
    )
    k = nf * nq
    table[:k] = offs.reshape(k, _NCOL)
    table[k : k + ids.shape[0]] = ids
    table[k + ids.shape[0] :] = dense_rows
    return table


def _chunks(role: int, src: np.ndarray, length: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Copy rows for segments ``(src, length, dst)`` cut into pieces of at most CHUNK."""
    pieces = -(-length // CHUNK)
    seg = np.repeat(np.arange(length.size), pieces)
    first = np.concatenate([[0], np.cumsum(pieces)[:-1]])
    at = (np.arange(seg.size) - np.repeat(first, pieces)) * CHUNK
    rows = np.zeros((seg.size, _NCOL), dtype=np.int64)
    rows[:, 0] = role
    rows[:, 1] = src[seg] + at
    rows[:, 2] = np.minimum(length[seg] - at, CHUNK)
    rows[:, 3] = dst[seg] + at
    return rows


def join_queries(
    parts: Sequence[Batch],
    plan: torch.Tensor,
    out_offsets: torch.Tensor,
    out_values: torch.Tensor,
    out_dense: torch.Tensor,
) -> None:
    """Run ``plan`` (from :func:`join_plan`, in memory the device reads) on the current stream:
    ``out_offsets [F*size + 1]``, ``out_values`` and ``out_dense`` (``[size, nd]``) receive
    the joined batch. Every array of ``parts`` must be readable by the device in place."""
    if plan.shape[0] == 0:
        return
    src64, src32 = parts[0].sparse.values, parts[0].dense
    if out_dense.numel() == 0:  # no dense features: never read, but pointers must be valid
        src32, out_dense = src64, out_values
    _join_kernel[(plan.shape[0],)](
        *(_pointer(t, out_values.device) for t in (plan, src64, src32)),
        out_offsets,
        out_values,
        out_dense,
        BLOCK=BLOCK,
    )


def _pointer(t: torch.Tensor, device: torch.device) -> Any:
    """Host memory the device reads in place, as the kernel's pointer argument."""
    if device.type != "cuda" or t.device.type == "cuda":
        return t
    from recserve.storage.host import DevicePointer

    return DevicePointer(t.data_ptr(), t.dtype)


def join_reference(
    parts: Sequence[Batch], size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain torch: the joined batch's offsets over ``size`` items, ids and dense rows."""
    from recserve.pipeline import pad_offsets

    keys = parts[0].sparse.keys
    nf = len(keys)
    values, lengths = [], []
    for f in range(nf):
        for p in parts:
            s, b = p.sparse, p.sparse.batch_size
            lo, hi = int(s.offsets[f * b]), int(s.offsets[(f + 1) * b])
            values.append(s.values[lo:hi])
    for p in parts:
        b = p.sparse.batch_size
        lengths.append(torch.diff(p.sparse.offsets).view(nf, b))
    lens = torch.cat(lengths, dim=1).reshape(-1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])
    b_total = sum(p.batch_size for p in parts)
    return (
        pad_offsets(offsets, nf, b_total, size),
        torch.cat(values),
        torch.cat([p.dense for p in parts]),
    )
