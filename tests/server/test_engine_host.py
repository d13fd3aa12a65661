"""The rec engine in a process of its own, through the server process's own connection."""

from __future__ import annotations

import numpy as np
import pytest
from server_helpers import query, reference

from recserve.engine import EngineConfig
from recserve.engine.interface import EngineClosed
from recserve.models import build_model
from recserve.server.engine_host import EngineHost


def test_engine_process_answers_counts_and_closes() -> None:
    model = build_model("dlrm-rmc2", "tiny", seed=2)
    config = EngineConfig(device="none", max_query_items=64, queue_capacity=16)
    batches = [query(model.config, b, seed=b) for b in (1, 8, 64)]
    with EngineHost(model, config, torch_threads=2) as host:
        futures = [host.submit(b) for b in batches]  # in flight together
        for batch, future in zip(batches, futures, strict=True):
            np.testing.assert_allclose(
                future.result(60).numpy(), reference(model, batch), rtol=1e-5, atol=1e-6
            )
        stats = host.stats()
        assert stats["accepted"] == 3 and stats["items"] == 73 and stats["in_system"] == 0
        assert stats["torch_threads"] == 2  # its own, not one per core nor this process's
        with pytest.raises(ValueError, match="must be 1 to 64"):
            host.submit(query(model.config, 65))
    with pytest.raises(EngineClosed):
        host.submit(batches[0])
    assert not host._proc.is_alive()


def test_a_failing_engine_start_is_reported() -> None:
    model = build_model("ncf", "tiny")
    config = EngineConfig(cpu_workers=0, device="none")  # neither workers nor a runner
    with pytest.raises(RuntimeError, match="(?s)engine process failed to start.*needs CPU workers"):
        EngineHost(model, config)
