"""Random jagged inputs for kernel tests."""

from __future__ import annotations

import torch


def jagged(
    rows: list[int], batch: int, max_len: int, gen: torch.Generator, fixed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, offsets)`` in KeyedJagged layout for tables of ``rows``: bag lengths in
    ``[0, max_len]`` (or all ``fixed``); the first bag is empty, and each table's ids include
    its last row and a repeated id when there are enough of them."""
    num = len(rows)
    if fixed is None:
        lengths = torch.randint(0, max_len + 1, (num * batch,), generator=gen)
        lengths[0] = 0
    else:
        lengths = torch.full((num * batch,), fixed, dtype=torch.int64)
    offsets = torch.zeros(num * batch + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    parts = []
    for t in range(num):
        n = int(lengths[t * batch : (t + 1) * batch].sum())
        ids = torch.randint(0, rows[t], (n,), generator=gen)
        if n >= 3:
            ids[0] = rows[t] - 1
            ids[2] = ids[1]
        parts.append(ids)
    return torch.cat(parts), offsets


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has unwritten (NaN) or non-finite elements"
    out64 = out.double()
    denom = ref.norm().clamp(min=1e-30)
    return float((out64 - ref).norm() / denom)
