"""``recserve serve`` as a real process (SIGTERM drains it), and ``recserve bench server``."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console
from server_helpers import query, reference

from recserve.cli.bench_server import print_report
from recserve.models import RecModel
from recserve.server.bench import SOAK_HEADROOM_S, BenchOptions, run_bench
from recserve.server.client import GRPCClient, HTTPClient, InferError

READY = re.compile(r"HTTP on (\S+):(\d+), gRPC on (\S+):(\d+)")
SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])),
}


def start(
    repo: Path, *extra: str, device: str | None = "cpu", stderr: Any = None
) -> tuple[subprocess.Popen[str], str, str]:
    """``recserve serve`` on free loopback ports; on the CPU unless ``device`` says otherwise
    (None: the command's default, the GPU where there is one)."""
    where = [] if device is None else ["--device", device]
    cmd = [sys.executable, "-m", "recserve.cli.main", "serve", "--repository", str(repo),
           "--http-port", "0", "--grpc-port", "0", "--log-level", "WARNING", *where, *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=ENV)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        match = READY.search(line)
        if match:
            return proc, f"{match[1]}:{match[2]}", f"{match[3]}:{match[4]}"
        assert time.monotonic() < deadline, "server did not start"
    raise AssertionError(f"server exited with {proc.wait()}")


def test_serve_process_answers_then_drains_on_sigterm(
    repo: Path, models: dict[str, RecModel]
) -> None:
    proc, http_url, grpc_url = start(repo, "--model", "wnd", "--model", "din")
    try:
        model = models["din"]
        batch = query(model.config, 8)
        for client in (HTTPClient(http_url), GRPCClient(grpc_url)):
            np.testing.assert_allclose(
                client.infer("din", model.config, batch), reference(model, batch), rtol=1e-6
            )
            client.close()
        answered, refused = [], []
        stop = threading.Event()

        def hammer() -> None:
            client = HTTPClient(http_url, timeout_s=30)
            while not stop.is_set():
                try:
                    answered.append(client.infer("din", model.config, batch))
                except (OSError, InferError):
                    refused.append(1)  # after SIGTERM: connection refused or closed, or 503
                    return

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        stop.set()
        for t in threads:
            t.join(30)
        assert len(answered) > 0
        for scores in answered:
            np.testing.assert_allclose(scores, reference(model, batch), rtol=1e-6)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.gpu
def test_serve_by_default_runs_the_rec_engine_on_the_gpu_with_front_ends(
    repo: Path, models: dict[str, RecModel], tmp_path: Path
) -> None:
    from recserve.server.proc_stats import children
    from recserve.server.repository import default_frontends

    log = (tmp_path / "serve.log").open("w+")
    try:
        proc, http_url, grpc_url = start(
            repo, "--model", "din", "--log-level", "INFO", device=None, stderr=log
        )
    except AssertionError:
        log.seek(0)
        raise AssertionError(log.read()[-3000:]) from None
    try:
        frontends = default_frontends("rec", "cuda")
        log.seek(0)
        assert f"engine rec on cuda, {frontends} front-end processes" in log.read()
        assert len(children(proc.pid)) >= frontends + 1  # front ends and the engine process
        model = models["din"]
        for seed in range(3):
            batch = query(model.config, 64, seed=seed)
            for client in (HTTPClient(http_url), GRPCClient(grpc_url)):
                np.testing.assert_allclose(
                    client.infer("din", model.config, batch),
                    reference(model, batch),
                    rtol=1e-4,
                    atol=1e-5,
                )
                client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_serve_rejects_missing_repository(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from recserve.cli.main import main

    assert main(["serve", "--repository", str(tmp_path / "no"), "--http-port", "0"]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["local", "rec"])
def test_bench_server_writes_summary_first(tmp_path: Path, engine: str) -> None:
    opts = BenchOptions(
        preset="tiny", iters=5, warmup=1, concurrency=2, saturation_s=0.5, soak_s=2.0,
        saturation_levels=(1, 3),
        soak_warmup_s=0.5, out=tmp_path, name="bench_server_test", device="cpu", frontends=1,
        engine=engine,
    )  # fmt: skip
    path, _ = run_bench(opts)
    assert path == tmp_path / "cpu" / "bench_server_test.json"
    data = json.loads(path.read_text())
    assert next(iter(data)) == "summary"
    summary = data["summary"]
    assert list(summary)[:6] == [
        "http_p50_overhead_ms_wnd256", "grpc_p50_overhead_ms_wnd256",
        "http_overhead_frac_rmc2_256", "grpc_overhead_frac_rmc2_256",
        "server_vs_inprocess_qps_frac", "soak_memory_growth_frac",
    ]  # fmt: skip
    assert {"device", "date", "commit"} <= set(summary)
    assert all(
        math.isfinite(v) for k, v in summary.items() if k not in ("device", "date", "commit")
    )
    assert data["soak"]["failures"] == 0 and data["soak"]["queries"] > 0
    # open loop: enough client threads that no query waits for one at the soak's rate
    assert data["soak"]["client_threads"] >= data["soak"]["target_qps"] * SOAK_HEADROOM_S
    assert data["shutdown"]["returncode"] == 0 and data["options"]["frontends"] == 1
    for when in ("speed_before", "speed_after"):  # how fast the host ran, to tell slow runs
        speed = data["machine"][when]
        assert speed["copy_gbps_one_core"] > 0 and speed["python_ns_per_step"] > 0
    for name in ("wnd", "dlrm-rmc2"):
        for proto in ("http", "grpc", "http_shm", "grpc_shm"):  # *_shm: inputs in shared memory
            assert data["latency"][name][proto]["max_abs_diff_vs_inprocess"] < 1e-5
        for proto in ("http_floor", "grpc_floor"):  # the bare echo server's round trip
            assert data["latency"][name][proto]["p50_ms"] > 0
    assert summary["http_floor_p50_ms_wnd256"] == data["latency"]["wnd"]["http_floor"]["p50_ms"]
    saturation = data["saturation"]
    assert [lv["callers"] for lv in saturation["levels"]] == [1, 3]
    for proto in ("inprocess", "http", "grpc"):  # each side's best level is its saturation QPS
        best = max(lv[proto]["qps"] for lv in saturation["levels"])
        assert saturation[proto]["qps"] == best > 0 and saturation[proto]["errors"] == 0
    # CPU by process role (process names): the server's tree is found and nothing else
    server_roles = {"server", "frontends", "clients"} | (
        {"engine", "cpu_workers"} if engine == "rec" else set()
    )
    for level in saturation["levels"]:
        cpu = level["http"]["cpu"]
        assert set(cpu) == server_roles, cpu
        assert cpu["frontends"]["processes"] == 1 and cpu["server"]["processes"] == 1
        assert cpu["frontends"]["us_per_query"] > 0 and cpu["clients"]["us_per_query"] > 0
        if engine == "rec":  # the engine's own counts over the run, scraped from /metrics
            counted = level["http"]["engine"]
            assert 0.9 * level["http"]["queries"] <= counted["completed"] > 0
            assert counted["gpu_batches"] == 0  # a CPU-only engine here
            assert level["inprocess"]["engine"]["completed"] >= level["inprocess"]["queries"]
        # the in-process engine driven by a thread per query and by one thread: the better counts
        drivers = [level["inprocess_threads"], level["inprocess_inflight"]]
        assert level["inprocess"]["qps"] == max(d["qps"] for d in drivers) > 0
        assert level["inprocess"]["driver"] in ("threads", "inflight")
        assert level["inprocess_inflight"]["errors"] == 0
        in_process = level["inprocess"]["cpu"]
        assert "callers_and_engine" in in_process and "frontends" not in in_process
        if engine == "rec":
            assert in_process["cpu_workers"]["processes"] >= 1
    console = Console(record=True, width=200)
    print_report(data, console)
    text = console.export_text()
    for words in (
        "p50 latency",
        "shared memory",
        "closed-loop QPS",
        "frontends",
        "soak:",
        "host speed",
        "echo server",
    ):
        assert words in text


def test_the_in_process_side_of_bench_server_is_the_engine_itself() -> None:
    """The server runs the rec engine in a process of its own; the baseline it is compared
    with must be that engine called in this process, configured the same way."""
    from recserve.engine import RecEngine
    from recserve.models import build_model
    from recserve.server.bench import in_process_engine
    from recserve.server.repository import rec_engine_config
    from recserve.server.settings import ServingConfig

    model = build_model("ncf", "tiny", seed=0)
    opts = BenchOptions(models=("ncf",), preset="tiny", device="cpu", engine="rec", workers=1)
    engine = in_process_engine(model, opts)
    try:
        assert isinstance(engine, RecEngine)
        serving = ServingConfig(device="cpu", max_items=4096)
        assert engine.engine_config.max_query_items == rec_engine_config(serving).max_query_items
        batch = query(model.config, 3)
        np.testing.assert_allclose(
            engine.submit(batch).result(30).numpy(), reference(model, batch), rtol=1e-5, atol=1e-6
        )
    finally:
        engine.close()


def test_the_rec_engine_on_a_gpu_takes_the_servers_batching_knobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Front ends send requests to the rec engine directly, so on a GPU the engine does the
    dynamic batching: the server's delay, slots and polling settings must reach it."""
    import torch

    from recserve.server import repository
    from recserve.server.settings import ServingConfig

    monkeypatch.setattr(repository, "resolve_device", lambda device: torch.device("cuda"))
    serving = ServingConfig(
        device="cuda", max_queue_delay_ms=1.5, max_inflight_batches=5, busy_poll_us=40,
        busy_poll_max_outstanding=3,
    )  # fmt: skip
    config = repository.rec_engine_config(serving)
    assert config.sched.gpu_max_delay == pytest.approx(1.5e-3)
    assert config.sched.gpu_threshold == 0 and config.cpu_workers == 0
    assert config.gpu_max_inflight == 5
    assert (config.busy_poll_us, config.busy_poll_max_outstanding) == (40, 3)
    assert repository.rec_engine_config(ServingConfig(device="cuda")).sched.gpu_max_delay == 0


def test_bench_server_engine_auto_is_rec_on_a_gpu_and_local_on_the_cpu() -> None:
    from recserve.cli.bench_server import add_parser, options_from_args, resolve_engine

    assert resolve_engine("auto", "cpu") == "local"
    assert resolve_engine("rec", "cpu") == "rec" and resolve_engine("local", "cuda") == "local"
    expected = "rec" if torch.cuda.is_available() else "local"
    assert resolve_engine("auto", "auto") == expected
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["server", "--device", "cpu"])
    assert options_from_args(args).engine == "local"


def test_serve_defaults_follow_the_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``recserve serve`` with no engine, device or front-end count: the GPU with the rec engine
    and front ends where there is a GPU, the CPU with the local engine and none where not."""
    from recserve.cli import serve as serve_cli
    from recserve.server import repository

    parser = argparse.ArgumentParser()
    serve_cli.add_server_arguments(parser)
    args = parser.parse_args(["--repository", str(tmp_path)])
    assert (args.engine, args.device, args.frontends) == ("auto", "auto", None)

    cpu = lambda device: torch.device("cpu")  # noqa: E731
    monkeypatch.setattr(repository, "resolve_device", cpu)
    monkeypatch.setattr(serve_cli, "resolve_device", cpu)
    settings = serve_cli.settings_from_args(args)
    assert settings.serving.device == "cpu" and settings.frontends == 0
    assert repository.resolve_engine("auto", "auto") == "local"

    cuda = lambda device: torch.device("cuda")  # noqa: E731
    monkeypatch.setattr(repository, "resolve_device", cuda)
    monkeypatch.setattr(serve_cli, "resolve_device", cuda)
    monkeypatch.setattr(repository.os, "cpu_count", lambda: 16)
    settings = serve_cli.settings_from_args(args)
    assert settings.serving.device == "cuda" and settings.frontends == 8
    assert repository.resolve_engine("auto", "auto") == "rec"
    assert repository.default_frontends("rec", "cuda", cores=2) == 1
    assert repository.default_frontends("local", "cuda", cores=16) == 0
    # asked for explicitly: kept as given
    args = parser.parse_args(
        ["--repository", str(tmp_path), "--engine", "local", "--frontends", "3"]
    )
    assert serve_cli.settings_from_args(args).frontends == 3
    assert repository.resolve_engine("local", "cuda") == "local"
    with pytest.raises(ValueError, match="unknown engine"):
        repository.resolve_engine("fast", "cpu")
