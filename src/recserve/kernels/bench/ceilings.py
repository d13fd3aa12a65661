"""Ceilings measured in the same run as the kernels they judge.

HBM copy bandwidth (a large device-to-device copy, bytes read + written) and the random-row-read
ceiling per row size: the best rate, over a few tile shapes and warps, at which
:func:`recserve.kernels.ceiling.random_rows` reads uniformly random rows of a multi-GB table,
with ids read from memory and with ids hashed in the kernel (no id traffic).

A small lookup cannot reach that ceiling: its few microseconds of work are mostly a launch and
one round of memory latency, for any kernel. :func:`size_matched_ceilings` therefore also
measures the same plain kernel reading exactly as many random rows as a case looks up (writing
each row, for pooling 1), timed as the cases are (CUDA graph replays), and
:func:`launch_floor_us` the shortest such launch: one program reading a handful of rows.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import triton

from recserve.kernels.bench.report import matched_key
from recserve.kernels.ceiling import random_rows
from recserve.kernels.timing import eager_us, time_us

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


MATCHED_VARIANTS: tuple[tuple[int, int, int], ...] = tuple(
    (per_prog, rows, 4) for per_prog in (32, 512) for rows in (16, 32)
)
"""(rows per program, rows per tile, warps) tried for each size-matched ceiling."""


def size_matched_ceilings(
    needs: dict[int, set[tuple[int, bool]]],
    table_bytes: int = 4 << 30,
    variants: tuple[tuple[int, int, int], ...] = MATCHED_VARIANTS,
    device: str = "cuda",
    sets: int = 4,
) -> dict[int, dict[str, dict[str, Any]]]:
    """``{row bytes: {matched_key(reads, gather): best run}}`` for each (reads, gather) in
    ``needs[row bytes]``: the best rate of the plain kernel reading ``reads`` uniformly random
    rows (``gather`` writes each row), CUDA-graph timed over ``sets`` rotating id sets, so
    that consecutive calls do not hit the same rows.

    The plain kernel reads its ids from memory (int32, as the benchmark's lookups do): a
    lookup must fetch its ids before its rows, and at these sizes that dependent round trip
    is a large part of the time. The best rate with ids hashed in the kernel instead (no id
    load at all) is kept beside it as ``hashed_ids_rows_per_s``."""
    floats = torch.rand(table_bytes // 4, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(4321)
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for size, wanted in sorted(needs.items()):
        stride = size // 4
        num_rows = 1 << ((floats.numel() // stride).bit_length() - 1)
        table = floats[: num_rows * stride].view(num_rows, stride)
        top = max(-(-r // v[0]) * v[0] for r, _ in wanted for v in variants)
        ids = torch.randint(
            0, num_rows, (sets, top), device=device, generator=gen, dtype=torch.int32
        )
        out[size] = {}
        for reads, gather in sorted(wanted):
            runs = []
            for (per_prog, rows, warps), hashed in itertools.product(variants, (False, True)):
                n = -(-reads // per_prog) * per_prog
                us = _time_matched(table, ids, n, per_prog, rows, warps, hashed, gather)
                runs.append(
                    {"reads": n, "per_prog": per_prog, "rows": rows, "warps": warps,
                     "hashed_ids": hashed, "us": us, "rows_per_s": n / us * 1e6}
                )  # fmt: skip
            best = max((r for r in runs if not r["hashed_ids"]), key=lambda r: r["rows_per_s"])
            hashed_best = max(r["rows_per_s"] for r in runs if r["hashed_ids"])
            out[size][matched_key(reads, gather)] = {**best, "hashed_ids_rows_per_s": hashed_best}
        del ids
    del floats
    return out


def _time_matched(
    table: torch.Tensor,
    ids: torch.Tensor,
    n: int,
    per_prog: int,
    rows: int,
    warps: int,
    hashed: bool,
    gather: bool,
) -> float:
    stride = table.shape[1]
    shape = (n, stride) if gather else (n // per_prog, max(triton.next_power_of_2(stride), 4))
    target = torch.empty(shape, device=table.device)

    def call(k: int) -> None:
        random_rows(
            table, stride, None if hashed else ids[k, :n], n, target, per_prog=per_prog,
            rows=rows, num_warps=warps, seed=k * n, gather=gather,
        )  # fmt: skip

    calls = [lambda k=k: call(k) for k in range(ids.shape[0])]
    return time_us(calls, reps=5, min_ms=2.0)


def launch_floor_us(device: str = "cuda") -> float:
    """The shortest launch of the plain kernel, timed as the cases are: one program reading
    16 rows of a small table."""
    table = torch.rand(1024, 4, device=device)
    out = torch.empty(1, 4, device=device)

    def call() -> None:
        random_rows(table, 4, None, 16, out, per_prog=16, rows=16, num_warps=4)

    return time_us([call], reps=5, min_ms=2.0)
