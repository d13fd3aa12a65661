"""``recserve bench serve --merge``: runs over disjoint models make one report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recserve.cli.main import main


def _run(models: dict[str, tuple[float, float, float]], commit: str) -> dict:
    records = []
    for name, (cpu, gpu, overhead) in models.items():
        medium = {"cpu-b64": 100.0, "tuned_cpu": 100.0 * cpu, "gpu-only": 50.0}
        medium |= {"tuned_cpu_gpu": 50.0 * gpu, "tuned_vs_best_static_cpu": cpu}
        medium |= {"tuned_vs_gpu_only": gpu}
        records.append(
            {
                "model": name,
                "targets_ms": {"medium": 10.0},
                "by_target": {"medium": medium},
                "runner_overhead": {"frac": overhead},
                "statics": {},
            }
        )
    summary = {"device": "NVIDIA H200", "date": "2026-11-22T05:00:00+00:00", "commit": commit}
    return {"summary": summary, "mode": "full", "models": records, "wall_s": 500.0}


def test_merge_recomputes_the_summary_over_all_models(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(_run({"m1": (2.5, 1.7, 0.02), "m2": (2.1, 1.9, 0.04)}, "abc")))
    b.write_text(json.dumps(_run({"m3": (1.8, 2.2, 0.01)}, "def")))
    assert main(["bench", "serve", "--merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "bench_serve.json").read_text())
    assert next(iter(merged)) == "summary"
    s = merged["summary"]
    assert s["models"] == ["m1", "m2", "m3"]
    assert s["tuned_vs_best_static_cpu_min"] == pytest.approx(1.8)
    assert s["tuned_vs_gpu_only_static_min"] == pytest.approx(1.7)
    assert s["engine_overhead_frac"] == pytest.approx(0.04)
    assert (s["device"], s["commit"]) == ("NVIDIA H200", "abc,def")
    assert (tmp_path / "m" / "bench_serve.png").is_file()
    b.write_text(json.dumps(_run({"m2": (1.0, 1.0, 0.0)}, "def")))
    out = ["--out", str(tmp_path / "x")]
    assert main(["bench", "serve", "--merge", str(a), str(b), *out]) == 2  # refused: overlap
    assert not (tmp_path / "x").exists()


def test_merge_with_replace_takes_each_model_from_the_last_run_that_has_it(
    tmp_path: Path,
) -> None:
    a, b, c = (tmp_path / f"{k}.json" for k in "abc")
    a.write_text(json.dumps(_run({"m1": (2.5, 1.7, 0.02), "m2": (2.1, 1.9, 0.04)}, "abc")))
    b.write_text(json.dumps(_run({"m2": (1.2, 1.3, 0.01)}, "def")))
    c.write_text(json.dumps(_run({"m2": (1.4, 1.6, 0.03), "m3": (3.0, 3.0, 0.0)}, "ghi")))
    args = ["bench", "serve", "--merge", str(a), str(b), str(c), "--replace"]
    assert main([*args, "--out", str(tmp_path / "m")]) == 0
    s = json.loads((tmp_path / "m" / "bench_serve.json").read_text())["summary"]
    assert s["models"] == ["m1", "m2", "m3"]
    assert s["tuned_vs_best_static_cpu_min"] == pytest.approx(1.4)  # m2 from c, not b
    assert s["tuned_vs_gpu_only_static_min"] == pytest.approx(1.6)
    assert s["engine_overhead_frac"] == pytest.approx(0.03)
    assert s["commit"] == "abc,ghi"  # b contributed nothing
    assert [p["models"] for p in s["merged_from"]] == [["m1"], ["m2", "m3"]]
