"""The end-to-end benchmark's logic on tiny models (CPU): rows, summary keys, equal predictions."""

from __future__ import annotations

import torch

from recserve.bench.e2e import bench_model, summarise


def test_bench_rows_and_summary() -> None:
    rows = []
    for name in ("dlrm-rmc2", "dien"):
        rows += bench_model(  # one timed call per variant: the Triton interpreter is slow
            name, [4, 16], iters=1, preset="tiny", device=torch.device("cpu"),
            log=lambda _: None, warmup=0, rounds=1,
        )  # fmt: skip
    assert [(r["model"], r["batch"]) for r in rows] == [
        ("dlrm-rmc2", 4),
        ("dlrm-rmc2", 16),
        ("dien", 4),
        ("dien", 16),
    ]
    for r in rows:
        assert r["eager_ms"] > 0 and r["recserve_ms"] > 0
        assert 0 < r["eager_embedding_share"] <= 1
        assert r["max_rel_diff"] < 1e-4
    summary = summarise(rows, min_batch=16)
    assert summary["e2e_speedup_vs_eager_min"] == min(
        r["speedup"] for r in rows if r["batch"] >= 16
    )
    assert summary["e2e_max_rel_diff"] < 1e-4
