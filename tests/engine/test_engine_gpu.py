"""The engine's GPU runner on a real device: coalesced queries through the Triton/graph
pipeline (and op by op) answer exactly what the model answers."""

from __future__ import annotations

import pytest
import torch

from recserve.engine import EngineConfig, RecEngine, SchedConfig
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import build_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("runner", ["process", "thread"])
@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("name", ["dlrm-rmc2", "din", "dien"])
def test_gpu_runner_answers_like_the_model(name: str, kernels: str, runner: str) -> None:
    model = build_model(name, preset="small", seed=0)
    sched = SchedConfig(gpu_threshold=0, gpu_max_batch=256, gpu_max_delay=0.002)
    config = EngineConfig(
        sched=sched,
        cpu_workers=0,
        device="cuda",
        max_query_items=128,
        gpu_kernels=kernels,
        gpu_runner=runner,
    )
    queries = QueryFactory(model.config, "zipf:1.05", seed=7)
    batches = [queries.make(size) for size in (1, 7, 64, 128, 3, 100, 128, 50) * 3]
    with RecEngine(model, config) as engine:
        assert bool(engine.gpu_runner.pipeline) == (kernels == "triton")
        futures = [engine.submit(b) for b in batches]  # at once: coalesced into larger batches
        outs = [f.result(timeout=60) for f in futures]
    with torch.inference_mode():
        for batch, out in zip(batches, outs, strict=True):
            torch.testing.assert_close(out.cpu(), model(batch), rtol=1e-4, atol=1e-6)
    assert next(model.parameters()).device.type == "cpu"  # the caller's model stays put


@pytest.mark.parametrize("join_on_device", [True, False])
@pytest.mark.parametrize("name", ["dlrm-rmc2", "wnd", "ncf"])
def test_queries_in_shared_memory_are_joined_on_the_device(name: str, join_on_device: bool) -> None:
    """Queries kept in a :class:`QueryMemory` reach the runner with no copy in the engine, are
    joined by the device-side kernel (or on the host, for comparison) and answer exactly what
    the model answers, in order."""
    from recserve.engine.query_memory import QueryMemory

    model = build_model(name, preset="small", seed=1)
    sched = SchedConfig(gpu_threshold=0, gpu_max_batch=512, gpu_max_delay=0.002)
    config = EngineConfig(
        sched=sched,
        cpu_workers=0,
        device="cuda",
        max_query_items=128,
        gpu_max_inflight=1,
        join_on_device=join_on_device,
    )
    queries = QueryFactory(model.config, "zipf:1.05", seed=3, jitter=True)
    plain = [queries.make(size) for size in (1, 7, 64, 128, 3, 100, 128, 50, 9, 33)]
    with RecEngine(model, config) as engine, QueryMemory(engine, plain) as memory:
        assert memory.shared
        for _ in range(3):
            futures = [engine.submit(b) for b in memory.batches]
            outs = [f.result(timeout=60) for f in futures]
            with torch.inference_mode():
                for batch, out in zip(plain, outs, strict=True):
                    torch.testing.assert_close(out.cpu(), model(batch), rtol=1e-4, atol=1e-6)
        stats = engine.stats()
    assert stats["gpu_queries"] > stats["gpu_batches"]  # some batches were joins
    assert stats["gpu_zero_copy_batches"] == stats["gpu_batches"]
    routes = stats["gpu_batches_by_input"]
    joined = routes["device_join" if join_on_device else "host_join"]
    assert joined > 0 and routes["device_join" if not join_on_device else "host_join"] == 0
    assert joined + routes["in_place"] == stats["gpu_batches"]
    assert stats["gpu_runner_host_s"] > 0 and stats["gpu_runner_device_wait_s"] >= 0
