"""Correctness on the device: every kernel variant against the float64 reference.

Fresh random inputs for each check (jagged bags with empty ones, repeated ids, the last row),
the output poisoned with NaN first so an unwritten element fails.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from recserve.kernels.ceiling import random_rows
from recserve.kernels.layout import pack_tables, to_stored
from recserve.kernels.pooled import PooledConfig, pooled_lookup
from recserve.kernels.reference import pooled_reference, random_rows_reference

TOLERANCE = {"fp32": 1e-5, "fp16": 1e-5, "bf16": 1e-5, "int8": 1e-5}
"""Relative error bounds vs the float64 reference of the *stored* rows: only fp32 accumulation
rounding remains (the storage rounding is in the reference too)."""

FP16_OUT_TOLERANCE = 2e-3


def _random_case(
    dtype: str,
    dims: list[int],
    rows: list[int],
    batch: int,
    max_len: int,
    gen: torch.Generator,
    device: torch.device,
) -> dict[str, Any]:
    tables = [
        to_stored(torch.randn(r, d, generator=gen, device=device), dtype)
        for r, d in zip(rows, dims, strict=True)
    ]
    num = len(dims)
    lengths = torch.randint(0, max_len + 1, (num * batch,), generator=gen, device=device)
    lengths[0] = 0
    lengths[-1] = 1
    offsets = torch.zeros(num * batch + 1, dtype=torch.int64, device=device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    parts = []
    for t in range(num):
        n = int(lengths[t * batch : (t + 1) * batch].sum())
        ids = torch.randint(0, rows[t], (n,), generator=gen, device=device)
        if n > 2:
            ids[0] = rows[t] - 1  # the last row
            ids[1] = ids[2]  # a repeated id
        parts.append(ids)
    values = torch.cat(parts)
    psw = torch.rand(values.numel(), generator=gen, device=device)
    return {"tables": tables, "values": values, "offsets": offsets, "psw": psw}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64 = out.double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref).norm() / ref.norm().clamp(min=1e-30))


CHECK_CONFIGS = (
    PooledConfig(1, 32),
    PooledConfig(4, 8, num_warps=2, order="bag"),
    PooledConfig(64, 1, num_warps=4, order="bag"),
    PooledConfig(2, 16, maxnreg=64),
    PooledConfig(1, 16, num_stages=3),
    PooledConfig(8, 4, evict="first"),
    PooledConfig(2, 8, evict="hotcold"),
    PooledConfig(2, 4, num_warps=1, evict="last"),
    PooledConfig(16, 2, num_warps=2, prefetch=True),
    PooledConfig(1, 8, evict="first", prefetch=True),
    PooledConfig(8, 4, num_warps=2, early_offsets=True),
    PooledConfig(4, 8, order="bag", prefetch=True, early_offsets=True),
)
CHECK_SHAPES = (
    ("dim128", [128, 128], [5000, 3000]),
    ("mixed", [32, 96, 8, 64], [4000, 700, 50, 2000]),
)
CHECK_DTYPES = ("fp32", "fp16", "bf16", "int8")
VARIANTS = ((False, torch.float32), (True, torch.float32), (False, torch.float16))
"""(weighted, output dtype) of each check."""


def _grid(
    small: bool, configs: Sequence[PooledConfig] | None = None
) -> tuple[list[PooledConfig], list[tuple[str, list[int], list[int]]], int, int]:
    shapes = list(CHECK_SHAPES)
    if small:
        shapes = [(name, dims, [60] * len(dims)) for name, dims, _ in shapes]
        return list(configs or CHECK_CONFIGS[2:4]), shapes, 5, 6
    return list(configs or CHECK_CONFIGS), shapes, 37, 40


def check_jobs(
    dtypes: Sequence[str] = CHECK_DTYPES, configs: Sequence[PooledConfig] | None = None
) -> list[tuple[str, list[int], PooledConfig, bool, bool, int, torch.dtype]]:
    """``(dtype, dims, config, weighted, reordered, batch, out dtype)`` of every launch of
    :func:`run_checks` with the same ``dtypes`` and ``configs`` on the device (to compile
    them ahead, in parallel)."""
    configs, shapes, batch, _ = _grid(False, configs)
    return [
        (dtype, dims, cfg, weighted, cfg.evict == "hotcold", batch, out_dtype)
        for dtype, (_, dims, _), cfg in itertools.product(dtypes, shapes, configs)
        for weighted, out_dtype in VARIANTS
    ]


def run_checks(
    device: str = "cuda",
    seed: int = 0,
    small: bool = False,
    dtypes: Sequence[str] = CHECK_DTYPES,
    configs: Sequence[PooledConfig] | None = None,
    ceiling: bool = True,
) -> list[dict[str, Any]]:
    """Run every check; each result has ``name``, ``rel_err`` and ``ok``.

    ``small`` (CPU smoke runs under the interpreter): fewer rows, bags and variants.
    ``dtypes`` and ``configs`` (default :data:`CHECK_CONFIGS`) choose the pooled-lookup
    checks (e.g. the configs a run has just tuned); ``ceiling`` adds the ceiling kernel's.
    """
    dev = torch.device(device)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    results = []
    configs, shapes, batch, max_len = _grid(small, configs)
    for dtype, (shape, dims, rows), cfg in itertools.product(dtypes, shapes, configs):
        case = _random_case(dtype, dims, rows, batch, max_len, gen, dev)
        poolings = ["sum", "mean"] * (len(dims) // 2) + ["sum"] * (len(dims) % 2)
        cols = [sum(dims[:i]) for i in range(len(dims))]
        reordered = cfg.evict == "hotcold"
        orders = [torch.randperm(r, generator=gen, device=dev) for r in rows] if reordered else None
        packed = pack_tables(
            case["tables"],
            dtype,
            cols=cols,
            features=list(range(len(dims))),
            poolings=poolings,
            order=orders,
            n_hot=[r // 10 for r in rows] if reordered else None,
        )
        for weighted, out_dtype in VARIANTS:
            psw = case["psw"] if weighted else None
            out = torch.full((batch, sum(dims)), float("nan"), dtype=out_dtype, device=dev)
            pooled_lookup(packed, case["values"], case["offsets"], batch, out, cfg, psw)
            ref = pooled_reference(
                case["tables"],
                case["values"],
                case["offsets"],
                batch,
                poolings,
                per_sample_weights=psw,
            )
            err = _rel_err(out, ref)
            tol = FP16_OUT_TOLERANCE if out_dtype == torch.float16 else TOLERANCE[dtype]
            name = f"pooled/{dtype}/{shape}/{_cfg_name(cfg)}/{'w' if weighted else 'u'}/{str(out_dtype)[6:]}"
            results.append({"name": name, "rel_err": err, "ok": err <= tol})
    for width, hashed in itertools.product((12, 32, 128), (False, True)) if ceiling else ():
        table = torch.randn(1024, width, generator=gen, device=dev)
        ids = torch.randint(0, 1024, (2048,), generator=gen, device=dev)
        out = random_rows(
            table, width, None if hashed else ids, 2048, per_prog=256, rows=32, seed=3
        )
        if hashed:
            from recserve.kernels.ceiling import hashed_ids

            ids = hashed_ids(2048, 1024, 3)
        ref = random_rows_reference(table, ids, 256)
        err = _rel_err(out[:, :width], ref)
        results.append(
            {
                "name": f"ceiling/w{width}/{'hash' if hashed else 'ids'}",
                "rel_err": err,
                "ok": err <= 1e-5,
            }
        )
    return results


def _cfg_name(cfg: PooledConfig) -> str:
    name = f"b{cfg.bags}r{cfg.rows}w{cfg.num_warps}n{cfg.maxnreg}s{cfg.num_stages}{cfg.evict}"
    return name + ("-bag" if cfg.order == "bag" else "")
