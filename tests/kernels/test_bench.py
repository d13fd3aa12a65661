"""The kernel benchmark's CPU-side parts: the sweep plan, buckets, summary and plot."""

from __future__ import annotations

from pathlib import Path

import torch

from recserve.kernels.bench import report
from recserve.kernels.bench.cases import IdStream, make_inputs, model_tables, top_k_coverage
from recserve.kernels.bench.plan import plan
from recserve.kernels.bench.run import ablation_picks, case_bucket


def test_plan_covers_the_issue_sweep() -> None:
    sets = plan(2 << 30)
    cases = [c for _, cs in sets for c in cs]
    grid = [c for c in cases if c.group == "grid"]
    assert len(grid) == 4 * 4 * 3 * 3  # batch x pooling x dim x dtype, uniform ids
    assert {c.ids for c in cases} == {"uniform", "zipf:0.8", "zipf:1.05", "zipf:1.2", "one-item"}
    assert any(
        c.tables.name == "micro24" and c.batch == 2048 and c.pooling[0] == 150 for c in cases
    )
    assert all(ts.nbytes < 5 << 30 for ts, _ in sets)  # a few GB each
    micro = next((ts, cs) for ts, cs in sets if ts.name == "micro24" and ts.dtype == "fp32")
    assert [hot for _, hot in ablation_picks(*micro)] == [False, True]


def test_case_bucket_and_bytes() -> None:
    ts, pooling = model_tables("dlrm-rmc1")
    case = next(c for t, cs in plan(2 << 30) for c in cs if t == ts)
    assert case_bucket(case).key() == "fp32-d32-L64-B16384"
    assert case.must_move_bytes() > case.lookups * 128
    assert pooling == 80


def test_id_streams() -> None:
    ts, _ = model_tables("ncf")
    gen = torch.Generator().manual_seed(0)
    case = next(c for t, cs in plan(2 << 30) for c in cs if t == ts and c.ids == "zipf:1.05")
    streams = [IdStream(r, case.ids, torch.device("cpu"), gen) for r in ts.rows]
    inputs = make_inputs(case, streams, torch.device("cpu"))
    assert inputs.values.numel() == case.lookups == inputs.key_offsets[-1]
    assert int(inputs.offsets[-1]) == case.lookups
    for t, r in enumerate(ts.rows):
        ids = inputs.values[inputs.key_offsets[t] : inputs.key_offsets[t + 1]]
        assert int(ids.min()) >= 0 and int(ids.max()) < r
    assert top_k_coverage(inputs.values[: inputs.key_offsets[1]], 100) > 0.3
    one = IdStream(1000, "one-item", torch.device("cpu"), gen).sample(50)
    assert torch.unique(one).numel() == 1


def _row(name: str, ids: str, pooling: int, us: float, torch_us: float, fb_us: float) -> dict:
    row = {
        "name": name,
        "ids": ids,
        "dtype": "fp32",
        "pooling": pooling,
        "lookups": 1 << 22,
        "stored_row_bytes": 128,
        "recserve": {"us": us, "rows_per_s": (1 << 22) / us * 1e6, "gbps": 1000.0},
        "torch": {"us": torch_us},
        "fbgemm_inference": {"us": fb_us},
    }
    report.derive(row, {128: {"rows_per_s": 30e9}, 512: {"rows_per_s": 8e9}}, 4000.0)
    return row


def test_summary_keys_and_plot(tmp_path: Path) -> None:
    rows = [
        _row("a", "uniform", 80, 150.0, 450.0, 180.0),
        _row("b", "uniform", 1, 300.0, 900.0, 270.0),
    ]
    ablation = [{"rows": [{"lever": "l2_window", "gain_vs_no_window": 1.03}]}]
    summary = report.summarize(rows, ablation)
    for key in (
        "frac_ceiling_uniform_pool20plus_min",
        "frac_ceiling_pool1_min",
        "geomean_speedup_vs_torch",
        "min_speedup_vs_torch",
        "geomean_speedup_vs_fbgemm",
        "min_speedup_vs_fbgemm",
        "l2_window_gain_max",
    ):
        assert key in summary
    assert abs(summary["geomean_speedup_vs_torch"] - 3.0) < 1e-9
    assert (
        abs(summary["min_speedup_vs_fbgemm"] - 0.9) < 1e-9
        and summary["cases_slower_than_fbgemm"] == 1
    )
    assert summary["l2_window_gain_max"] == 1.03
    assert abs(rows[0]["recserve"]["frac_ceiling"] - (1 << 22) / 150e-6 / 30e9) < 1e-9
    result = {
        "device": "test",
        "date": "today",
        "cases": [
            {
                **r,
                "torch": {**r["torch"], "rows_per_s": 1e9, "gbps": 100.0},
                "fbgemm_inference": {**r["fbgemm_inference"], "rows_per_s": 2e9, "gbps": 200.0},
            }
            for r in rows
        ],
        "ceilings": {"copy": {"gbps": 4000.0}, "random_rows": {"128": {"rows_per_s": 30e9}}},
    }
    report.plot(result, tmp_path / "roofline.png")
    assert (tmp_path / "roofline.png").stat().st_size > 10_000
