"""QueryMemory: in-process callers' queries in a shared file the GPU runner reads in place."""

from __future__ import annotations

import os

import torch

from recserve.engine import EngineConfig, RecEngine, SchedConfig
from recserve.engine.query_memory import QueryMemory
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import build_model


def test_queries_in_shared_memory_answer_like_the_model_and_skip_the_copy() -> None:
    model = build_model("dlrm-rmc1", "tiny", seed=2)
    sched = SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=64)
    config = EngineConfig(
        sched=sched, cpu_workers=0, device="cpu", max_query_items=32, gpu_max_inflight=1
    )
    factory = QueryFactory(model.config, seed=9, jitter=True)
    plain = [factory.make(n) for n in (5, 1, 12, 7, 3, 9, 32)]
    with RecEngine(model, config) as engine:
        memory = QueryMemory(engine, plain)
        assert memory.shared and os.path.exists(memory.path)
        for batch, copy in zip(plain, memory.batches, strict=True):
            assert torch.equal(batch.sparse.values, copy.sparse.values)
            assert torch.equal(batch.dense, copy.dense)
            for t in (copy.dense, copy.sparse.values, copy.sparse.offsets):
                assert memory.address <= t.data_ptr() < memory.address + memory.size
                assert t.data_ptr() % 64 == 0
        for _ in range(2):
            futures = [engine.submit(b) for b in memory.batches]
            with torch.inference_mode():
                for batch, future in zip(plain, futures, strict=True):
                    torch.testing.assert_close(future.result(60), model(batch))
        stats = engine.stats()
        assert stats["gpu_zero_copy_batches"] == stats["gpu_batches"] > 0
        assert stats["gpu_queries"] > stats["gpu_batches"]  # joined (by the runner)
        memory.close()
        assert not os.path.exists(memory.path)
        memory.close()  # twice is fine
        # after close, queries the caller still holds are copied as before
        with torch.inference_mode():
            torch.testing.assert_close(engine.submit(plain[0]).result(60), model(plain[0]))


def test_query_memory_without_a_runner_process_is_not_shared() -> None:
    model = build_model("ncf", "tiny", seed=2)
    config = EngineConfig(cpu_workers=1, device="none")
    factory = QueryFactory(model.config, seed=1)
    with RecEngine(model, config) as engine, QueryMemory(engine, [factory.make(4)]) as memory:
        assert not memory.shared
        with torch.inference_mode():
            torch.testing.assert_close(
                engine.submit(memory.batches[0]).result(60), model(memory.batches[0])
            )
