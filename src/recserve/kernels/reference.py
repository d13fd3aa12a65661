"""Pure-torch references for every kernel: the test oracle and the CPU path.

They compute in float64 from the stored rows (dequantised the same way the kernels do), so a
kernel's error against them is its own rounding only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recserve.kernels.layout import StoredRows
from recserve.kernels.pooled import META_FIELDS, PackedRows


def stored_to_float(stored: StoredRows, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The rows a kernel sees, as floats: int8 codes ``q * scale + bias``, others converted."""
    rows = stored.rows.to(dtype)
    if stored.scale_bias is not None:
        sb = stored.scale_bias.to(dtype)
        rows = rows * sb[:, :1] + sb[:, 1:]
    return rows


def pooled_reference(
    tables: Sequence[StoredRows],
    values: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    poolings: Sequence[str],
    features: Sequence[int] | None = None,
    per_sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pooled lookup ``[B, ΣD]`` float64, tables in order (see ``pooled.py`` for the formula).

    ``features[t]`` is the KeyedJagged feature table ``t`` reads (default: ``t``).
    """
    b = batch_size
    features = list(range(len(tables))) if features is None else list(features)
    outs = []
    for t, stored in enumerate(tables):
        rows = stored_to_float(stored)
        f = features[t]
        off = offsets[f * b : (f + 1) * b + 1].long().cpu()
        lengths = off[1:] - off[:-1]
        ids = values[int(off[0]) : int(off[-1])].long().cpu()
        bag = torch.repeat_interleave(torch.arange(b), lengths)
        gathered = rows.cpu()[ids]
        if per_sample_weights is not None:
            w = per_sample_weights[int(off[0]) : int(off[-1])].cpu().double()
            gathered = gathered * w.unsqueeze(1)
        out = torch.zeros(b, rows.shape[1], dtype=torch.float64)
        out.index_add_(0, bag, gathered)
        if poolings[t] == "mean":
            out = out / lengths.clamp(min=1).unsqueeze(1).double()
        outs.append(out)
    return torch.cat(outs, dim=1)


def random_rows_reference(
    table: torch.Tensor, ids: torch.Tensor, rows_per_program: int
) -> torch.Tensor:
    """What the random-row-read ceiling kernel computes: per program, the fp32 sum of its rows.

    ``table [R, W]``, ``ids [P * rows_per_program]``; returns ``[P, W]`` float64.
    """
    rows = table.double().cpu()[ids.long().cpu()]
    return rows.view(-1, rows_per_program, table.shape[1]).sum(dim=1)


def pooled_packed(
    packed: PackedRows,
    values: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    out: torch.Tensor,
    per_sample_weights: torch.Tensor | None = None,
    remap: bool | None = None,
) -> torch.Tensor:
    """:func:`recserve.kernels.pooled.pooled_lookup` in plain torch (fp32), on the same packed
    layout: the CPU path where Triton cannot run, and a check of the layout's address math."""
    b = batch_size
    do_remap = packed.remap is not None if remap is None else remap
    flat = packed.rows
    field = {name: i for i, name in enumerate(META_FIELDS)}
    for t in range(packed.num_tables):
        m = packed.meta_host[t].tolist()
        f, stride, dim = m[field["feature"]], m[field["stride"]], m[field["dim"]]
        off = offsets[f * b : (f + 1) * b + 1]
        lo, hi = int(off[0]), int(off[-1])
        lengths = off[1:] - off[:-1]
        ids = values[lo:hi].long()
        if do_remap:
            assert packed.remap is not None
            ids = packed.remap[m[field["remap_base"]] + ids].long()
        hot = ids < m[field["n_hot"]]
        start = torch.where(hot, m[field["hot_base"]], m[field["cold_base"]]) + ids * stride
        rows = flat[start.unsqueeze(1) + torch.arange(dim, device=flat.device)].float()
        if packed.quant:
            as_f32 = flat.view(torch.float32)
            sb_at = (start + m[field["scale_off"]]) // 4
            rows = rows * as_f32[sb_at].unsqueeze(1) + as_f32[sb_at + 1].unsqueeze(1)
        if per_sample_weights is not None:
            rows = rows * per_sample_weights[lo:hi].float().unsqueeze(1)
        bag = torch.repeat_interleave(
            torch.arange(b, device=rows.device), lengths, output_size=hi - lo
        )
        pooled = torch.zeros(b, dim, dtype=torch.float32, device=rows.device)
        pooled.index_add_(0, bag, rows)
        if m[field["mean"]]:
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).float()
        col = m[field["col"]]
        out[:, col : col + dim] = pooled.to(out.dtype)
    return out
