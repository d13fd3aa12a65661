"""Each lever's own effect (the MICRO'24 levers plus table batching), measured one at a time.

Starting from the config the backend would use (tuned or heuristic), each lever is varied on
its own: rows in flight, warps, register cap, pipelining stages, cache hints, one launch for
all tables vs one per table; then hot-row reordering (ids remapped in the kernel, or upstream),
``evict_last`` for hot rows and an L2 access-policy window over the hot prefix. Hot-row
variants are timed eagerly (a stream's window is not a graph node's attribute).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from recserve.kernels.bench.cases import Case, Inputs
from recserve.kernels.bench.sweep import TableBench
from recserve.kernels.pooled import PooledConfig, kernel_resources, pooled_lookup
from recserve.kernels.timing import time_us


def _with(cfg: PooledConfig, **kw: Any) -> PooledConfig:
    return PooledConfig(**{**cfg.to_dict(), **kw})  # type: ignore[arg-type]


def lever_variants(base: PooledConfig, pooling: int) -> dict[str, list[PooledConfig]]:
    if pooling <= 2:
        flight = [_with(base, bags=n, rows=1) for n in (4, 8, 16, 32, 64, 128)]
    else:
        flight = [
            _with(base, bags=max(1, n // base.rows), rows=min(n, base.rows))
            for n in (4, 8, 16, 32, 64, 128)
        ]
        flight += [_with(base, bags=1, rows=n) for n in (4, 8, 16, 32, 64)]
    return {
        "rows_in_flight": list(dict.fromkeys(flight)),
        "num_warps": [_with(base, num_warps=w) for w in (1, 2, 4, 8)],
        "maxnreg": [_with(base, maxnreg=n) for n in (0, 32, 64, 128)],
        "num_stages": [_with(base, num_stages=s) for s in (1, 2, 3)],
        "evict": [_with(base, evict=e) for e in ("none", "first", "last")],
        "order": [_with(base, order=o) for o in ("table", "bag")],
        "prefetch": [_with(base, prefetch=p) for p in (False, True)],
        "early_offsets": [_with(base, early_offsets=e) for e in (False, True)],
    }


def variants(base: PooledConfig, pooling: int, hot: bool) -> list[tuple[PooledConfig, bool, bool]]:
    """``(config, reordered, remap in kernel)`` of every launch :func:`ablate` makes."""
    out = [(c, False, False) for v in lever_variants(base, pooling).values() for c in v]
    out.append((base, False, False))
    if hot:
        for cfg in (base, _with(base, evict="hotcold")):
            out += [(cfg, True, True), (cfg, True, False)]
    return out


def ablate(
    bench: TableBench, case: Case, base: PooledConfig, hot_bytes: int | None, l2: bool
) -> dict[str, Any]:
    """Time every lever variant of ``case`` around ``base``; rows of {lever, config, us, regs}.

    With ``hot_bytes``, the backend's rows are then reordered (the backend stays reordered).
    """
    sets = bench.inputs(case, min(bench.sets_for(case), 64))
    b = case.batch
    packed = bench.backend.packed(0)
    out = torch.empty(b, sum(bench.tables.dims), device=bench.device)

    def calls(
        cfg: PooledConfig, remap: bool | None = None, ss: list[Inputs] = sets
    ) -> list[Callable[[], object]]:
        return [
            lambda s=s: pooled_lookup(
                bench.backend.packed(0), s.values, s.offsets, b, out, cfg, None, remap
            )
            for s in ss
        ]

    rows: list[dict[str, Any]] = []
    base_us = time_us(calls(base), reps=5)
    rows.append({"lever": "base", "config": base.to_dict(), "us": base_us, "gain": 1.0})
    for lever, variants in lever_variants(base, case.pooling[0]).items():
        for cfg in variants:
            try:
                res = kernel_resources(packed, sets[0].values, sets[0].offsets, b, out, cfg)
                us = time_us(calls(cfg), reps=5)
            except Exception as exc:
                rows.append(
                    {
                        "lever": lever,
                        "config": cfg.to_dict(),
                        "error": f"{type(exc).__name__}: {exc}"[:200],
                    }
                )
                continue
            rows.append(
                {"lever": lever, "config": cfg.to_dict(), "us": us, "gain": base_us / us, **res}
            )

    # Table batching: the same config, one launch per table instead of one for all.
    singles = [
        dataclasses.replace(
            packed, meta=packed.meta[t : t + 1], meta_host=packed.meta_host[t : t + 1], num_tables=1
        )
        for t in range(packed.num_tables)
    ]
    per_table = [
        lambda s=s: [pooled_lookup(p, s.values, s.offsets, b, out, base) for p in singles]
        for s in sets
    ]
    us = time_us(per_table, reps=5)
    rows.append(
        {
            "lever": "table_batching",
            "variant": "one launch per table",
            "us": us,
            "gain": base_us / us,
        }
    )

    if hot_bytes is not None:
        rows += _hot_rows(bench, case, sets, base, out, hot_bytes, l2)
    return {"case": case.name, "ids": case.ids, "base_us": base_us, "rows": rows}


def _hot_rows(
    bench: TableBench,
    case: Case,
    sets: list[Inputs],
    base: PooledConfig,
    out: torch.Tensor,
    hot_bytes: int,
    l2: bool,
) -> list[dict[str, Any]]:
    """Reorder rows by access counts from a separate profiling sample, then time variants."""
    b = case.batch
    backend = bench.backend

    def calls(
        cfg: PooledConfig, ss: list[Inputs], remap: bool | None
    ) -> list[Callable[[], object]]:
        return [
            lambda s=s: pooled_lookup(
                backend.packed(0), s.values, s.offsets, b, out, cfg, None, remap
            )
            for s in ss
        ]

    rows: list[dict[str, Any]] = []
    plain_us = time_us(calls(base, sets, None), reps=7)
    rows.append({"lever": "hot_rows", "variant": "plain", "us": plain_us, "gain": 1.0})
    profile = bench.inputs(case, 4)
    counts = [torch.zeros(r, dtype=torch.int64, device=bench.device) for r in bench.tables.rows]
    for s in profile:
        for t, c in enumerate(backend.access_counts(s.values, s.offsets, b)):
            counts[t] += c
    info = backend.reorder_hot_rows(counts, hot_bytes)
    packed = backend.packed(0)
    assert packed.remap is not None
    pre = [
        Inputs(backend.remap_ids(s.values, s.key_offsets), s.offsets, s.key_offsets) for s in sets
    ]
    reordered = {
        "n_hot_total": sum(info["n_hot"]),
        "hot_bytes": info["hot_bytes"],
        "profile_hot_share": info["hot_share"],
    }
    hot_variants = [
        ("reordered, ids remapped in kernel", base, sets, None),
        ("reordered + evict_last hot / evict_first cold", _with(base, evict="hotcold"), sets, None),
        ("reordered, ids remapped upstream", base, pre, False),
        ("reordered upstream + evict hot/cold", _with(base, evict="hotcold"), pre, False),
    ]
    without: dict[str, float] = {}
    for name, cfg, ss, remap in hot_variants:
        us = time_us(calls(cfg, ss, remap), reps=7)
        without[name] = us
        rows.append(
            {"lever": "hot_rows", "variant": name, "us": us, "gain": plain_us / us, **reordered}
        )
    if l2:
        ratios: list[float] = []

        def window(stream: Any) -> Callable[[], None]:
            ratios.append(backend.enable_l2_window(stream))
            return lambda: backend.disable_l2_window(stream)

        try:
            for name, cfg, ss, remap in hot_variants:
                us = time_us(calls(cfg, ss, remap), reps=7, stream_setup=window)
                ratio = ratios[-1] if ratios else None
                rows.append(
                    {
                        "lever": "l2_window",
                        "variant": name + " + L2 window",
                        "us": us,
                        "gain": plain_us / us,
                        "gain_vs_no_window": without[name] / us,
                        "hit_ratio": ratio,
                        **reordered,
                    }
                )
            # Cross-check without graphs (meaningful where kernels outlast their launch cost):
            # the window set on the launching stream itself.
            name, cfg, ss, remap = hot_variants[2]
            off_us = time_us(calls(cfg, ss, remap), graph=False, reps=7)
            on_us = time_us(calls(cfg, ss, remap), graph=False, reps=7, stream_setup=window)
            rows.append(
                {
                    "lever": "l2_window_eager",
                    "variant": name + " + L2 window, eager launches",
                    "us": on_us,
                    "us_without": off_us,
                    "gain_vs_no_window": off_us / on_us,
                    **reordered,
                }
            )
        except Exception as exc:
            rows.append({"lever": "l2_window", "error": f"{type(exc).__name__}: {exc}"[:300]})
    return rows
