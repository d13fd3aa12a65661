"""Which cases the kernel benchmark runs (issue 3's sweep), grouped by table set."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from recserve.kernels.bench.cases import Case, TableSet, model_tables, uniform_tables

BATCHES = (256, 2048, 16384, 65536)
POOLINGS = (1, 20, 80, 150)
DIMS = (32, 64, 128)
DTYPES = ("fp32", "fp16", "int8")
HOT_IDS = ("zipf:0.8", "zipf:1.05", "zipf:1.2", "one-item")
MODELS = ("micro24", "dlrm-rmc1", "dlrm-rmc2", "dlrm-rmc3", "wnd", "mt-wnd", "ncf", "din", "dien")
SWEEP_TABLES = 4


def plan(table_bytes: int, quick: bool = False) -> list[tuple[TableSet, list[Case]]]:
    """Table sets and their cases, in the order they run (a time budget may cut the tail).

    First the MICRO'24 shape and each DeepRecInfra model's tables (batch 2048 uniform and Zipf
    1.05, batch 16384 uniform), then per dtype and dim the uniform-id grid (every batch x
    pooling, 4 tables of about ``table_bytes`` together) and, for the smallest and largest dim,
    hotness (Zipf 0.8/1.05/1.2, one-item) at batch 2048 and 16384, pooling 1 and 80.
    """
    batches, poolings, dims, dtypes = BATCHES, POOLINGS, DIMS, DTYPES
    models, hot_ids = MODELS, HOT_IDS
    if quick:
        batches, poolings, dims, dtypes = (2048, 16384), (1, 80), (32, 128), ("fp32", "int8")
        models, hot_ids = ("micro24", "wnd"), ("zipf:1.05",)
    out: list[tuple[TableSet, list[Case]]] = []
    for model in models:
        for dtype in ("fp32", "fp16", "int8") if model == "micro24" else ("fp32",):
            ts, pooling = model_tables(model, dtype)
            cases = [
                Case(ts, 2048, (pooling,) * ts.num_tables, i, "model")
                for i in ("uniform", "zipf:1.05")
            ]
            if model != "micro24":
                cases.append(Case(ts, 16384, (pooling,) * ts.num_tables, "uniform", "model"))
            out.append((ts, cases))
    for dtype in dtypes:
        for dim in dims:
            ts = uniform_tables(SWEEP_TABLES, dim, dtype, table_bytes)
            cases = [
                Case(ts, b, (p,) * SWEEP_TABLES, "uniform", "grid")
                for b in batches
                for p in poolings
            ]
            if dim in (dims[0], dims[-1]):
                cases += [
                    Case(ts, b, (p,) * SWEEP_TABLES, ids, "hotness")
                    for ids in hot_ids
                    for b in (2048, 16384)
                    for p in (1, 80)
                ]
            out.append((ts, cases))
    return out


def smoke_plan() -> list[tuple[TableSet, list[Case]]]:
    """A few tiny cases that exercise every code path of the benchmark (CPU, interpreter)."""
    fp32 = TableSet("smoke", (500, 300, 200), (32, 32, 32), "fp32")
    int8 = TableSet("smoke8", (400, 400), (64, 64), "int8")
    out = [
        (
            fp32,
            [
                Case(fp32, b, (p,) * 3, ids, "grid")
                for b, p, ids in ((16, 1, "uniform"), (32, 5, "uniform"), (32, 5, "zipf:1.05"))
            ],
        ),
        (int8, [Case(int8, 16, (3, 3), "uniform", "grid")]),
    ]
    return out


def select_cases(
    sets: list[tuple[TableSet, list[Case]]], patterns: Sequence[str]
) -> list[tuple[TableSet, list[Case]]]:
    """The cases whose name (``tables/dtype/B<batch>/L<pooling>/<ids>``) matches one of the
    shell ``patterns``, grouped by table set as before; table sets left without a case are
    dropped, and the others run in the order of the first pattern that matches one of their
    cases (so a time budget cuts the later patterns first)."""

    def first_match(case: Case) -> int:
        hits = [i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(case.name, p)]
        return hits[0] if hits else len(patterns)

    out = []
    for ts, cases in sets:
        kept = [c for c in cases if first_match(c) < len(patterns)]
        if kept:
            out.append((min(first_match(c) for c in kept), ts, kept))
    out.sort(key=lambda item: item[0])
    return [(ts, kept) for _, ts, kept in out]
