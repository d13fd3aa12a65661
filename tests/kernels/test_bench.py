"""The kernel benchmark's CPU-side parts: the sweep plan, buckets, summary and plot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recserve.kernels.bench import report
from recserve.kernels.bench.cases import (
    Case,
    IdStream,
    TableSet,
    id_dtype,
    make_inputs,
    model_tables,
    top_k_coverage,
)
from recserve.kernels.bench.plan import plan, select_cases
from recserve.kernels.bench.run import ablation_picks, case_bucket
from recserve.kernels.bench.sweep import TableBench
from recserve.kernels.tuning import KernelTuner


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


def test_select_cases_by_name_pattern() -> None:
    sets = plan(2 << 30)
    picked = select_cases(
        sets,
        ["4x1048kx128/fp32/B*/L80/zipf:1.05", "micro24/fp32/B2048/L150/zipf:1.05"],
    )
    names = [c.name for _, cs in picked for c in cs]
    assert names == [  # in the order of the patterns, then of the plan
        "4x1048kx128/fp32/B2048/L80/zipf:1.05",
        "4x1048kx128/fp32/B16384/L80/zipf:1.05",
        "micro24/fp32/B2048/L150/zipf:1.05",
    ]
    assert all(cs for _, cs in picked) and len(picked) == 2
    first = select_cases(sets, ["micro24/fp16/*/zipf:1.05", "4x1048kx128/fp32/B2048/L80/*"])
    assert [(ts.name, ts.dtype) for ts, _ in first] == [
        ("micro24", "fp16"),
        ("4x1048kx128", "fp32"),
    ]
    later = select_cases(sets, ["4x1048kx128/fp32/B2048/L80/*", "micro24/fp16/*/zipf:1.05"])
    assert [ts.name for ts, _ in later] == ["4x1048kx128", "micro24"]
    assert [c.ids for c in later[0][1]] == [
        "uniform",
        "zipf:0.8",
        "zipf:1.05",
        "zipf:1.2",
        "one-item",
    ]
    assert select_cases(sets, ["nothing/*"]) == []


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


def test_int32_ids_read_the_same_rows_as_int64() -> None:
    ts = TableSet("tiny", (300, 200), (32, 16), "fp32")
    bench = TableBench(ts, KernelTuner("cpu"), fbgemm=False, seed=0, device="cpu", max_sets=1)
    assert bench.id_dtype == torch.int32 and bench.id_bytes == 4
    case = Case(ts, 8, (3, 2), "uniform")
    inputs = bench.inputs(case, 1)[0]
    assert inputs.values.dtype == torch.int32 and inputs.offsets.dtype == torch.int64
    ours = bench.backend.pooled(inputs.values, inputs.offsets, 8, None, inputs.key_offsets)
    wide = bench.backend.pooled(inputs.values.long(), inputs.offsets, 8, None, inputs.key_offsets)
    reference = bench.peers["torch"].call(inputs, 8)()  # PyTorch on the same int32 ids
    torch.testing.assert_close(ours, wide)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert case.must_move_bytes(4) == case.must_move_bytes(8) - 4 * case.lookups
    bench.close()
    assert id_dtype(ts, "int64") == torch.int64
    assert id_dtype(TableSet("huge", (2**31,), (4,), "fp32")) == torch.int64
    try:
        id_dtype(ts, "int16")
    except ValueError as err:
        assert "int16" in str(err)
    else:
        raise AssertionError("int16 ids were accepted")


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


def test_case_table_shows_speedups_and_the_earlier_config() -> None:
    row = _row("4x1048kx128/fp32/B16384/L80/zipf:1.05", "zipf:1.05", 80, 200.0, 900.0, 245.0)
    row["fbgemm_training"] = {"us": 240.0}
    row["recserve_before"] = {"us": 426.0}
    row["config"] = {
        "bags": 2,
        "rows": 8,
        "num_warps": 1,
        "maxnreg": 0,
        "num_stages": 1,
        "evict": "last",
        "order": "table",
    }
    row["config_before"] = {
        "bags": 8,
        "rows": 4,
        "num_warps": 8,
        "maxnreg": 0,
        "num_stages": 3,
        "evict": "none",
        "order": "table",
    }
    row["bucket"] = "fp32-d128-L64-B65536-h1"
    row["unique_vs_uniform"] = 0.29
    row["torch_max_rel_diff"] = 3e-7
    report.derive(row, {512: {"rows_per_s": 8.5e9}}, 4000.0)
    assert abs(row["speedup_vs_before"] - 2.13) < 1e-9
    assert abs(row["speedup_vs_fbgemm"] - 1.2) < 1e-9
    table = report.case_table([row, _row("b", "uniform", 1, 300.0, 900.0, 270.0)])
    header, first, second = table.splitlines()
    assert header.split()[:3] == ["case", "recserve", "before"]
    assert "2x8w1e:last (8x4w8s3)" in first and "2.13" in first and "1.20" in first
    assert "0.29" in first and "3.0e-07" in first
    assert second.split()[2] == "-"  # no earlier config timed
    columns = header.split()
    of_bytes = first.split()[columns.index("of_ceil_bytes")]
    assert of_bytes == f"{row['recserve']['frac_ceiling_bytes']:.2f}"


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
    # 1000 GB/s of bytes that must move, against 30 G rows/s x 128 B = 3840 GB/s
    assert abs(rows[0]["recserve"]["frac_ceiling_bytes"] - 1000 / 3840) < 1e-9
    assert (
        summary["frac_ceiling_bytes_uniform_pool20plus_min_large"]
        == (rows[0]["recserve"]["frac_ceiling_bytes"])
    )
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


@pytest.mark.interpreter
def test_a_skewed_bucket_is_tuned_on_all_its_cases() -> None:
    ts = TableSet("tiny", (300, 200), (32, 32), "fp32")
    # Pooling 4 and 5 share pooling bucket 4; one-item ids are skew level 2 for sure. No
    # candidates: only the heuristic config is timed (the interpreter is slow).
    skewed = [Case(ts, 16, (p, p), "one-item") for p in (4, 5)]
    uniform = [Case(ts, 16, (p, p), "uniform") for p in (4, 5)]
    tuner = KernelTuner("cpu")
    bench = TableBench(ts, tuner, fbgemm=False, seed=0, device="cpu", max_sets=1)
    flat, hot = bench.tune_tiles(uniform + skewed, lambda b: [])
    assert hot == flat + "-h2"
    assert bench.tuned_on[hot] == [c.name for c in skewed]
    assert bench.tuned_on[flat] == [uniform[0].name]  # uniform buckets: the first case
    assert list(bench.tuned_case_us(hot)) == bench.tuned_on[hot]
    assert tuner.entries[hot].us > 0
    bench.close()
    again = TableBench(ts, tuner, fbgemm=False, seed=1, device="cpu", max_sets=1)
    assert again.tune_tiles(skewed, lambda b: []) == []  # known: kept
    assert again.tune_tiles(skewed, lambda b: [], retune=lambda k: k == hot) == [hot]
    again.close()


def test_small_cases_are_also_judged_against_the_plain_kernel_at_their_size() -> None:
    main = {128: {"rows_per_s": 30e9, "reads": 1 << 24}}
    matched = {128: {"20480": {"rows_per_s": 4e9}, "65536:gather": {"rows_per_s": 10e9}}}

    def case(name: str, pooling: int, lookups: int, rows_per_s: float) -> dict:
        row = {
            "name": name, "ids": "uniform", "dtype": "fp16", "pooling": pooling,
            "lookups": lookups, "stored_row_bytes": 128,
            "recserve": {"us": 1.0, "rows_per_s": rows_per_s, "gbps": 1.0},
        }  # fmt: skip
        report.derive(row, main, 4000.0, matched)
        return row

    small = case("small", 20, 20480, 3.6e9)  # launch-bound: 0.12 of the main ceiling
    pool1 = case("pool1", 1, 65536, 8e9)
    large = case("large", 80, 1 << 24, 27e9)  # past every matched size: the main ceiling
    unmatched = case("odd", 20, 12345, 1e9)  # not measured at its size
    assert abs(small["recserve"]["frac_ceiling"] - 0.12) < 1e-9
    assert abs(small["recserve"]["frac_matched_ceiling"] - 0.9) < 1e-9
    assert abs(pool1["recserve"]["frac_matched_ceiling"] - 0.8) < 1e-9
    assert abs(large["recserve"]["frac_matched_ceiling"] - 0.9) < 1e-9
    assert "frac_matched_ceiling" not in unmatched["recserve"]
    summary = report.summarize([small, pool1, large, unmatched], [])
    assert abs(summary["frac_matched_ceiling_uniform_pool20plus_min"] - 0.9) < 1e-9
    assert abs(summary["frac_matched_ceiling_pool1_min"] - 0.8) < 1e-9
    assert summary["matched_ceiling_cases"] == 3
    assert summary["frac_ceiling_uniform_pool20plus_min"] < 0.04  # the issue's key, unchanged
