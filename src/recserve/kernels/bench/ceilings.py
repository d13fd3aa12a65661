"""Ceilings measured in the same run as the kernels they judge.

HBM copy bandwidth (a large device-to-device copy, bytes read + written) and the random-row-read
ceiling per row size: the best rate, over a few tile shapes and warps, at which
:func:`recserve.kernels.ceiling.random_rows` reads uniformly random rows of a multi-GB table,
with ids read from memory and with ids hashed in the kernel (no id traffic).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from recserve.kernels.ceiling import random_rows
from recserve.kernels.timing import eager_us

CEILING_VARIANTS: tuple[tuple[int, int], ...] = tuple(itertools.product((16, 32, 64), (4, 8)))
"""(rows per tile, warps) tried for each row size; the best counts."""


def copy_bandwidth(nbytes: int = 1 << 30, device: str = "cuda") -> dict[str, float]:
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    us = eager_us([lambda: dst.copy_(src)], reps=9, min_ms=20.0)
    return {"bytes": nbytes, "us": us, "gbps": 2 * nbytes / us / 1e3}


def random_row_ceilings(
    row_sizes: list[int],
    table_bytes: int = 4 << 30,
    reads_bytes: int = 2 << 30,
    variants: tuple[tuple[int, int], ...] = CEILING_VARIANTS,
    device: str = "cuda",
) -> dict[int, dict[str, Any]]:
    """``{row bytes: {rows_per_s, gbps, best variant, all variants}}`` on one table buffer.

    Each row size views the same ``table_bytes`` buffer (random floats) as rows of that size
    (a power of two rows, for hashed ids); each launch reads about ``reads_bytes``.
    """
    floats = torch.rand(table_bytes // 4, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(1234)
    out: dict[int, dict[str, Any]] = {}
    for size in row_sizes:
        if size % 16:
            raise ValueError(f"row size {size} is not a multiple of 16 bytes")
        stride = size // 4
        num_rows = 1 << ((floats.numel() // stride).bit_length() - 1)
        table = floats[: num_rows * stride].view(num_rows, stride)
        per_prog = 512
        reads = max(per_prog, min(1 << 25, reads_bytes // size) // per_prog * per_prog)
        ids = torch.randint(0, num_rows, (reads,), device=device, generator=gen)
        runs = []
        for (rows, warps), hashed in itertools.product(variants, (False, True)):
            us = _time_random_rows(table, None if hashed else ids, reads, per_prog, rows, warps)
            runs.append(
                {
                    "rows": rows,
                    "warps": warps,
                    "hashed_ids": hashed,
                    "us": us,
                    "rows_per_s": reads / us * 1e6,
                }
            )
        best = max(runs, key=lambda r: r["rows_per_s"])
        out[size] = {
            "row_bytes": size,
            "table_rows": num_rows,
            "table_bytes": num_rows * size,
            "reads": reads,
            "rows_per_s": best["rows_per_s"],
            "gbps": best["rows_per_s"] * size / 1e9,
            "best": best,
            "variants": runs,
        }
        del ids
    del floats
    return out


def _time_random_rows(
    table: torch.Tensor, ids: torch.Tensor | None, reads: int, per_prog: int, rows: int, warps: int
) -> float:
    stride = table.shape[1]

    def call() -> None:
        random_rows(table, stride, ids, reads, per_prog=per_prog, rows=rows, num_warps=warps)

    return eager_us([call], reps=5, min_ms=5.0)
