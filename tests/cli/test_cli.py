"""The console script's subcommands, run for real."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from recserve.cli.main import main
from recserve.models import MODEL_NAMES


def test_models_json_lists_all_eight(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(MODEL_NAMES)
    rmc1 = rows[0]
    assert rmc1["tables"] == 8 and rmc1["rows"] == [4_000_000] and rmc1["pooling"] == [80]
    assert rmc1["embedding_bytes"] == 8 * 4_000_000 * 32 * 4


def test_models_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--preset", "small"]) == 0
    out = capsys.readouterr().out
    for name in MODEL_NAMES:
        assert name in out


def test_run_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "run",
        "--model",
        "wnd",
        "--preset",
        "tiny",
        "--batch",
        "8",
        "--iters",
        "3",
        "--device",
        "cpu",
        "--json",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "wnd" and result["batch"] == 8
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["items_per_s"] > 0


def test_run_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--model", "ncf", "--preset", "tiny", "--batch", "0"]) == 2
    assert "--batch and --iters must be positive" in capsys.readouterr().err


def test_demo_on_cpu_subset(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "demo",
                "--device",
                "cpu",
                "--preset",
                "tiny",
                "--iters",
                "2",
                "--no-real",
                "--models",
                "dlrm-rmc1",
                "dien",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "dlrm-rmc1" in out and "dien" in out and "done in" in out


def test_console_script_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "recserve.cli.main", "models", "--json", "--preset", "tiny"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == len(MODEL_NAMES)


@pytest.mark.slow
def test_demo_trains_serves_and_matches(
    shared_data, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = shared_data / "criteo_dac_head8k"
    args = [
        "demo",
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--iters",
        "2",
        "--models",
        "ncf",
        "--data",
        str(data),
        "--repository",
        str(tmp_path),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "criteo-dlrm" / "model.safetensors").is_file()
    flat = " ".join(out.split())
    assert "391 items served" in flat
    assert "largest difference from the in-process model 0.0e+00" in flat


@pytest.mark.parametrize("workers", [1, 0])
def test_tune_prints_the_chosen_schedule(workers: int, capsys: pytest.CaptureFixture[str]) -> None:
    """``recserve tune`` climbs on a live engine: with CPU workers b first; with none (a GPU
    runner alone, here its CPU stand-in) the coalescing cap and delay, from T = 0."""
    args = ["tune", "--model", "ncf", "--preset", "tiny", "--p95", "200ms", "--json"]
    args += ["--workers", str(workers), "--device", "none" if workers else "cpu"]
    args += ["--probe-seconds", "0.05", "--min-queries", "20", "--sizes", "fixed:16"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["qps"] > 0 and result["probes"] > 0
    climbed = [c["config"] for c in result["climbed"]]
    if workers:
        assert {c["sub_batch_size"] for c in climbed} >= {8, 64}
        assert all(c["gpu_threshold"] is None for c in climbed)
    else:
        assert all(c["gpu_threshold"] == 0 for c in climbed)
        assert {c["gpu_max_batch"] for c in climbed} == {2048, 512, 1}
