"""Packing tables into the flat row layout that :mod:`recserve.kernels.pooled` reads.

One buffer per row dtype holds every table of a group; each row is padded to 16 bytes so it
starts aligned and is read with 16-byte vector loads. With hot-row reordering, each table's
rows are permuted so its hot rows come first, and the hot rows of all tables are stored
together at the start of the buffer: one contiguous range for an L2 access-policy window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

from recserve.config import TORCH_DTYPES
from recserve.embedding.backend import quantize_rowwise
from recserve.kernels.pooled import META_COLS, META_FIELDS, PackedRows

ALIGN_BYTES = 16
"""Row alignment: one 16-byte vector load per thread and lane."""


@dataclass(frozen=True)
class StoredRows:
    """One table's rows in their storage dtype: ``rows [R, D]`` and, for int8, ``scale_bias
    [R, 2]`` float32 (``row ≈ q * scale + bias``)."""

    rows: torch.Tensor
    scale_bias: torch.Tensor | None = None


def to_stored(weight: torch.Tensor, dtype: str) -> StoredRows:
    """Convert float rows ``[R, D]`` to a storage dtype (``fp32``/``fp16``/``bf16``/``int8``)."""
    if dtype == "int8":
        q, sb = quantize_rowwise(weight)
        return StoredRows(q, sb)
    return StoredRows(weight.to(TORCH_DTYPES[dtype]))


def element_size(dtype: str) -> int:
    return TORCH_DTYPES[dtype].itemsize


def row_layout(dim: int, dtype: str) -> tuple[int, int, int]:
    """``(stride, width, scale_off)`` in elements of the storage dtype for a row of ``dim``.

    ``width`` is D rounded up to 16 bytes (what a row load covers); int8 rows add an fp32
    scale and bias at ``scale_off`` (8-byte aligned: the kernel reads the pair in one load)
    and are padded to 16 bytes after them.
    """
    vec = ALIGN_BYTES // element_size(dtype)
    width = _round_up(dim, vec)
    if dtype == "int8":
        scale_off = _round_up(dim, 8)
        return _round_up(scale_off + 8, ALIGN_BYTES), width, scale_off
    return width, width, 0


def stored_row_bytes(dim: int, dtype: str) -> int:
    """Bytes a row occupies in the packed buffer (with padding)."""
    return row_layout(dim, dtype)[0] * element_size(dtype)


def plan_tables(
    dims: Sequence[int],
    num_rows: Sequence[int],
    dtype: str,
    *,
    cols: Sequence[int],
    features: Sequence[int],
    poolings: Sequence[str],
    n_hot: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> PackedRows:
    """Allocate the packed buffer (zeros) of tables of one dtype and build the kernel's metadata.

    ``cols[t]``: first output column of table ``t``; ``features[t]``: which KeyedJagged feature
    it reads; ``poolings[t]``: ``sum`` or ``mean``. With ``n_hot`` (hot-row reordering), table
    ``t``'s first ``n_hot[t]`` rows (in reordered numbering) go to the shared hot region and the
    kernel translates ids through ``remap`` (filled by :func:`write_table`).
    """
    if not dims:
        raise ValueError("a packed group needs at least one table")
    device = torch.device(device)
    vec = ALIGN_BYTES // element_size(dtype)
    num = len(dims)
    reordered = n_hot is not None
    hot = [int(h) for h in n_hot] if n_hot is not None else [0] * num
    layouts = [row_layout(int(d), dtype) for d in dims]
    for t in range(num):
        if not 0 <= hot[t] <= num_rows[t]:
            raise ValueError(f"table {t}: n_hot {hot[t]} outside [0, {num_rows[t]}]")

    pos = 0
    hot_starts = []
    for t in range(num):  # hot region first: every table's hot rows together
        hot_starts.append(pos)
        pos += hot[t] * layouts[t][0]
    cold_starts = []
    for t in range(num):
        cold_starts.append(pos)
        pos += (num_rows[t] - hot[t]) * layouts[t][0]

    meta = torch.zeros(num, META_COLS, dtype=torch.int64)
    field = {name: i for i, name in enumerate(META_FIELDS)}
    remap_pos = 0
    for t in range(num):
        stride, width, scale_off = layouts[t]
        meta[t, field["hot_base"]] = hot_starts[t]
        # Offset so that ``cold_base + r * stride`` addresses cold row r (r >= n_hot) directly.
        meta[t, field["cold_base"]] = cold_starts[t] - hot[t] * stride
        meta[t, field["n_hot"]] = hot[t]
        meta[t, field["stride"]] = stride
        meta[t, field["width"]] = width
        meta[t, field["dim"]] = int(dims[t])
        meta[t, field["col"]] = int(cols[t])
        meta[t, field["mean"]] = 1 if poolings[t] == "mean" else 0
        meta[t, field["feature"]] = int(features[t])
        meta[t, field["remap_base"]] = remap_pos
        meta[t, field["scale_off"]] = scale_off
        if reordered:
            remap_pos += int(num_rows[t])

    flat = torch.zeros(max(pos, vec), dtype=TORCH_DTYPES[dtype], device=device)
    block_d = max(triton.next_power_of_2(max(int(d) for d in dims)), vec)
    quant = dtype == "int8"
    return PackedRows(
        rows=flat,
        rows_sb=flat.view(torch.int64) if quant else None,
        meta=meta.to(device),
        remap=torch.zeros(remap_pos, dtype=torch.int32, device=device) if reordered else None,
        num_tables=num,
        num_rows=tuple(int(r) for r in num_rows),
        block_d=block_d,
        vec=vec,
        even_d=all(layout[1] == block_d for layout in layouts),
        quant=quant,
        split_hot=reordered,
        meta_host=meta,
    )


def write_table(
    packed: PackedRows,
    table: int,
    stored: StoredRows,
    order: torch.Tensor | None = None,
    first_row: int = 0,
) -> None:
    """Write rows ``[first_row, first_row + n)`` of table ``table`` (original numbering).

    ``order`` (reordered layouts only) is the table's permutation ``new position -> old row``;
    it must be given with the whole table (``first_row == 0``), and fills the remap slice.
    """
    f = _fields(packed, table)
    stride, scale_off, h = f["stride"], f["scale_off"], f["n_hot"]
    rows, sb = stored.rows, stored.scale_bias
    n = int(rows.shape[0])
    if packed.split_hot:
        if order is None or first_row != 0 or n != packed.num_rows[table]:
            raise ValueError("a reordered layout is written a whole table at a time, with order")
        assert packed.remap is not None
        perm = order.to(rows.device).long()
        rows = rows[perm]
        sb = sb[perm] if sb is not None else None
        base = f["remap_base"]
        dest_remap = packed.remap[base : base + n]
        dest_remap[perm.to(dest_remap.device)] = torch.arange(
            n, dtype=torch.int32, device=dest_remap.device
        )
        _write_rows(packed.rows, f["hot_base"], stride, scale_off, rows[:h], _head(sb, h))
        cold_start = f["cold_base"] + h * stride
        _write_rows(packed.rows, cold_start, stride, scale_off, rows[h:], _tail(sb, h))
        return
    if order is not None:
        raise ValueError("order given for a layout planned without hot rows")
    start = f["cold_base"] + first_row * stride
    _write_rows(packed.rows, start, stride, scale_off, rows, sb)


def pack_tables(
    tables: Sequence[StoredRows],
    dtype: str,
    *,
    cols: Sequence[int],
    features: Sequence[int],
    poolings: Sequence[str],
    order: Sequence[torch.Tensor] | None = None,
    n_hot: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> PackedRows:
    """:func:`plan_tables` then :func:`write_table` for each table (``order`` with ``n_hot``)."""
    if (order is None) != (n_hot is None):
        raise ValueError("order and n_hot go together")
    packed = plan_tables(
        [int(t.rows.shape[1]) for t in tables],
        [int(t.rows.shape[0]) for t in tables],
        dtype,
        cols=cols,
        features=features,
        poolings=poolings,
        n_hot=n_hot,
        device=device if device is not None else tables[0].rows.device,
    )
    for t, stored in enumerate(tables):
        write_table(packed, t, stored, None if order is None else order[t])
    return packed


def hot_region_bytes(packed: PackedRows) -> int:
    """Bytes of the contiguous hot prefix of ``packed.rows`` (0 if never reordered)."""
    if not packed.split_hot:
        return 0
    total = sum(
        _fields(packed, t)["n_hot"] * _fields(packed, t)["stride"] for t in range(packed.num_tables)
    )
    return total * packed.rows.element_size()


def unpack_table(packed: PackedRows, table: int) -> StoredRows:
    """Table ``table``'s stored rows in their original order (undoing any reordering)."""
    f = _fields(packed, table)
    stride, dim, h = f["stride"], f["dim"], f["n_hot"]
    num_rows = packed.num_rows[table]
    hot = packed.rows[f["hot_base"] : f["hot_base"] + h * stride].view(h, stride)
    cold_start = f["cold_base"] + h * stride
    cold = packed.rows[cold_start : cold_start + (num_rows - h) * stride].view(num_rows - h, stride)
    rows = torch.cat([hot, cold]) if h else cold
    q = rows[:, :dim]
    sb = None
    if packed.quant:
        so = f["scale_off"]
        sb = rows[:, so : so + 8].contiguous().view(torch.float32)
    if packed.remap is not None:
        new_of_old = packed.remap[f["remap_base"] : f["remap_base"] + num_rows].long()
        q = q[new_of_old]
        sb = sb[new_of_old] if sb is not None else None
    return StoredRows(q.contiguous(), sb)


def _fields(packed: PackedRows, table: int) -> dict[str, int]:
    row = packed.meta_host[table].tolist()
    return dict(zip(META_FIELDS, row, strict=True))


def _head(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if t is None else t[:n]


def _tail(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if t is None else t[n:]


def _write_rows(
    flat: torch.Tensor,
    start: int,
    stride: int,
    scale_off: int,
    rows: torch.Tensor,
    scale_bias: torch.Tensor | None,
) -> None:
    n, dim = rows.shape
    if n == 0:
        return
    dest = flat[start : start + n * stride].view(n, stride)
    dest[:, :dim].copy_(rows)
    if scale_bias is not None:
        dest[:, scale_off : scale_off + 8].view(torch.float32).copy_(scale_bias)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m
