"""The rec engine in a process of its own, through the server process's own connection."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import pytest
import torch
from server_helpers import query, reference

from recserve.engine import EngineConfig, SchedConfig
from recserve.engine.interface import EngineClosed
from recserve.models import build_model
from recserve.server import ipc
from recserve.server.engine_host import EngineHost, batch_arrays, infer_meta


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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_runner_reads_a_front_ends_arena_in_place(tmp_path, device: str) -> None:  # type: ignore[no-untyped-def]
    """A front end's arena is shared with the GPU runner: a batch of one request decoded
    there is read by the runner where it is (no join into the runner's slot) and answered
    like the model; a request sent in the frame itself is joined as before."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = build_model("dlrm-rmc1", "tiny", seed=3)
    sched = SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=1)
    config = EngineConfig(
        sched=sched, cpu_workers=0, device=device, max_query_items=64, queue_capacity=16
    )
    arena = ipc.Arena(str(tmp_path / "arena"), 1 << 20)
    batches = [query(model.config, b, seed=b) for b in (1, 7, 64)]
    replies: dict[int, tuple[dict[str, Any], bytearray]] = {}
    proto = ipc.FrameProtocol(lambda meta, data: replies.__setitem__(meta["id"], (meta, data)))
    with EngineHost(model, config) as host, socket.socket(socket.AF_UNIX) as sock:
        sock.connect(host.address)

        def send(meta: dict[str, Any], arrays: tuple[Any, ...] = ()) -> None:
            sock.sendall(b"".join(bytes(p) for p in ipc.frame(meta, arrays)))

        def answer(call: int) -> tuple[dict[str, Any], bytearray]:
            while call not in replies:
                buf = proto.get_buffer(-1)
                n = sock.recv_into(buf)
                assert n, "the engine process closed the connection"
                proto.buffer_updated(n)
            return replies.pop(call)

        send({"op": "hello", "arena": arena.path, "arena_size": arena.size})
        for k, batch in enumerate(batches):
            placed = arena.write(batch_arrays(batch))
            assert placed is not None
            block, offsets = placed
            send({**infer_meta(batch), "id": k, "shm": list(block), "arrays": offsets})
            meta, data = answer(k)
            scores = ipc.array(data, meta["arrays"][0], "<f4", int(np.prod(meta["shape"])))
            np.testing.assert_allclose(
                scores.reshape(meta["shape"]), reference(model, batch), rtol=1e-4, atol=1e-5
            )
            arena.free(block)
        send({**infer_meta(batches[1]), "id": 10}, batch_arrays(batches[1]))  # in the frame
        meta, data = answer(10)
        scores = ipc.array(data, meta["arrays"][0], "<f4", int(np.prod(meta["shape"])))
        np.testing.assert_allclose(
            scores.reshape(meta["shape"]), reference(model, batches[1]), rtol=1e-4, atol=1e-5
        )
        send({"op": "stats", "id": 11})
        stats = answer(11)[0]["stats"]
        assert stats["gpu_zero_copy_batches"] == len(batches)
        assert stats["gpu_batches"] == len(batches) + 1
    arena.close()
