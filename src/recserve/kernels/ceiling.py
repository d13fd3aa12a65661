"""The random-row-read ceiling: how fast a plain kernel reads uniformly random rows.

Small rows are limited by the rate of random accesses, not by bandwidth, so every pooled
lookup is judged against this ceiling for its row size (measured in the same run, on a table
of several GB). The kernel has no pooling structure: program ``p`` reads rows
``ids[p*P : (p+1)*P]`` (or ids hashed from their position, to leave out the id traffic) and
writes their fp32 sum, ``out[p, :] = sum_i table[id_i, :]``. In gather mode it writes every
row it reads instead (``out[i, :] = table[id_i, :]``): the ceiling for pooling 1, where a lookup
writes as many bytes as it reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    # lowbias32 (Chris Wellons): a cheap, well-mixed 32-bit hash, so hashed ids are uniform.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _random_rows_kernel(
    table_ptr,
    ids_ptr,
    out_ptr,
    rows_mask,
    stride,
    width,
    seed,
    PER_PROG: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    VEC: tl.constexpr,
    HASH: tl.constexpr,
    GATHER: tl.constexpr = False,
):
    pid = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, ROWS)
    w = tl.arange(0, BLOCK_W)
    w_ok = (w // VEC) < (tl.multiple_of(width, VEC) // VEC)
    acc = tl.zeros((ROWS, BLOCK_W), dtype=tl.float32)
    for j in range(0, PER_PROG, ROWS):
        i = pid * PER_PROG + j + r
        if HASH:
            ids = (_mix32((i + seed).to(tl.uint32)) & rows_mask).to(tl.int64)
        else:
            ids = tl.load(ids_ptr + i).to(tl.int64)  # int32 or int64 ids
        row = tl.multiple_of(ids * tl.multiple_of(stride, VEC), [VEC])
        tile = tl.load(table_ptr + row[:, None] + w[None, :], mask=w_ok[None, :], other=0.0)
        if GATHER:
            dst = tl.multiple_of(i * tl.multiple_of(width, VEC), [VEC])
            tl.store(out_ptr + dst[:, None] + w[None, :], tile, mask=w_ok[None, :])
        else:
            acc += tile
    if not GATHER:
        tl.store(out_ptr + pid * BLOCK_W + w, tl.sum(acc, axis=0))


def random_rows(
    table: torch.Tensor,
    width: int,
    ids: torch.Tensor | None,
    num_reads: int,
    out: torch.Tensor | None = None,
    *,
    per_prog: int = 512,
    rows: int = 32,
    num_warps: int = 4,
    seed: int = 0,
    gather: bool = False,
) -> torch.Tensor:
    """Read ``num_reads`` random rows of ``table [R, stride]`` (float32; ``width`` of the
    ``stride`` columns are read); ``ids`` None hashes them (``R`` must be a power of two).

    Returns ``out [num_reads / per_prog, BLOCK_W]`` (per-program sums), or with ``gather``
    ``out [num_reads, width]`` (every row read; ``width`` a multiple of 4 floats).
    """
    num_rows, stride = table.shape
    if num_reads % per_prog:
        raise ValueError("num_reads must be a multiple of per_prog")
    if ids is None and num_rows & (num_rows - 1):
        raise ValueError("hashed ids need a power-of-two number of rows")
    vec = 16 // table.element_size()
    block_w = max(triton.next_power_of_2(width), vec)
    progs = num_reads // per_prog
    if gather and width % vec:
        raise ValueError(f"gather needs a width that is a multiple of {vec} floats")
    if out is None:
        shape = (num_reads, width) if gather else (progs, block_w)
        out = torch.empty(shape, dtype=torch.float32, device=table.device)
    _random_rows_kernel[(progs,)](
        table,
        ids if ids is not None else table,
        out,
        num_rows - 1,
        stride,
        width,
        seed,
        PER_PROG=per_prog,
        ROWS=rows,
        BLOCK_W=block_w,
        VEC=vec,
        HASH=ids is None,
        GATHER=gather,
        num_warps=num_warps,
    )
    return out


def hashed_ids(num_reads: int, num_rows: int, seed: int = 0) -> torch.Tensor:
    """The ids the hashed mode of :func:`random_rows` reads (for tests)."""
    x = (torch.arange(num_reads, dtype=torch.int64) + seed) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x & (num_rows - 1)
