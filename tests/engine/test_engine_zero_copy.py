"""The GPU runner reads a query in place from memory shared with it (``share_memory``)."""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recserve.engine import EngineConfig, RecEngine, SchedConfig
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import build_model
from recserve.polling import LOCK_HANDOFF_S
from recserve.types import Batch, KeyedJagged


def _in_region(batch: Batch, data: np.ndarray, keys: tuple[str, ...]) -> Batch:
    """A copy of ``batch`` whose arrays live in ``data`` (dense, ids, offsets back to back)."""
    arrays = (batch.dense.numpy(), batch.sparse.values.numpy(), batch.sparse.offsets.numpy())
    views, pos = [], 0
    for a in arrays:
        view = data[pos : pos + a.nbytes].view(a.dtype).reshape(a.shape)
        view[...] = a
        views.append(torch.from_numpy(view))
        pos += a.nbytes + (-a.nbytes % 64)
    sparse = KeyedJagged(keys, views[1], views[2], batch.batch_size)
    return Batch(views[0], sparse)


def _shared_file(path: Path, size: int) -> tuple[mmap.mmap, np.ndarray]:
    """A file of ``size`` bytes mapped here (as a front end's arena is), and its bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    fd = os.open(path, os.O_RDWR)
    mapping = mmap.mmap(fd, size)
    os.close(fd)
    return mapping, np.frombuffer(mapping, np.uint8)


def test_shared_queries_are_read_in_place_until_unshared(tmp_path: Path) -> None:
    model = build_model("wnd", "tiny", seed=4)
    sched = SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=1)
    config = EngineConfig(sched=sched, cpu_workers=0, device="cpu", max_query_items=32)
    path, size = tmp_path / "region", 1 << 20
    mapping, data = _shared_file(path, size)
    factory = QueryFactory(model.config, seed=5, jitter=True)
    with RecEngine(model, config) as engine:
        keys = engine.keys
        plain = factory.make(9)
        plain = Batch(plain.dense, plain.sparse.select(keys))
        shared = _in_region(plain, data, keys)
        askew = _in_region(plain, data[size // 2 + 4 :], keys)  # ids off their 8-byte grid
        with torch.inference_mode():
            expected = model(plain)
        handle = engine.share_memory(str(path), int(data.ctypes.data), size)
        assert handle is not None
        for batch in (shared, plain, shared, askew):
            torch.testing.assert_close(engine.submit(batch).result(60), expected)
        assert engine.stats()["gpu_zero_copy_batches"] == 2  # plain and askew were copied
        assert engine.stats()["gpu_batches_by_input"] == {
            "slot": 2, "in_place": 2, "host_join": 0, "device_join": 0
        }  # fmt: skip
        engine.unshare_memory(handle)
        torch.testing.assert_close(engine.submit(shared).result(60), expected)
        assert engine.stats()["gpu_zero_copy_batches"] == 2  # joined again once unshared
        stats = engine.stats()
        assert stats["gpu_batches"] == 5
        # the runner on the CPU: its host time is each forward; it never waits for a device
        assert stats["gpu_runner_host_s"] > 0 and stats["gpu_runner_device_wait_s"] == 0
        # its threads hand the interpreter lock over promptly (this process keeps its own)
        assert engine._gpu.info["switch_interval_s"] == pytest.approx(LOCK_HANDOFF_S)
        assert sys.getswitchinterval() != pytest.approx(LOCK_HANDOFF_S)
    del shared, askew, data
    with contextlib.suppress(BufferError):  # a view the engine still holds goes with it
        mapping.close()


def test_shared_queries_queued_together_are_joined_by_the_runner(tmp_path: Path) -> None:
    """With one slot, queries that queue behind a batch are joined; when they all lie in
    shared memory the runner joins them itself, and every answer is still its own."""
    model = build_model("dlrm-rmc1", "tiny", seed=6)
    sched = SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=64)
    config = EngineConfig(
        sched=sched, cpu_workers=0, device="cpu", max_query_items=32, gpu_max_inflight=1
    )
    path, size = tmp_path / "region", 1 << 22
    mapping, data = _shared_file(path, size)
    factory = QueryFactory(model.config, seed=7, jitter=True)
    with RecEngine(model, config) as engine:
        keys = engine.keys
        plains = [factory.make(n) for n in (5, 1, 12, 7, 3, 9)]
        plains = [Batch(p.dense, p.sparse.select(keys)) for p in plains]
        shared = []
        for k, p in enumerate(plains):  # each in its own stretch of the region
            shared.append(_in_region(p, data[k * (size // 8) : (k + 1) * (size // 8)], keys))
        assert engine.share_memory(str(path), int(data.ctypes.data), size) is not None
        for _ in range(3):
            futures = [engine.submit(b) for b in shared]
            for plain, future in zip(plains, futures, strict=True):
                with torch.inference_mode():
                    torch.testing.assert_close(future.result(60), model(plain))
        stats = engine.stats()
        assert stats["gpu_queries"] > stats["gpu_batches"]  # some were joined
        assert stats["gpu_zero_copy_batches"] == stats["gpu_batches"]
        routes = stats["gpu_batches_by_input"]  # the CPU runner joins on the host
        assert routes["host_join"] > 0 and routes["slot"] == routes["device_join"] == 0
        assert routes["host_join"] + routes["in_place"] == stats["gpu_batches"]
    del shared, data
    with contextlib.suppress(BufferError):
        mapping.close()


def test_only_parts_inside_the_locked_span_are_joined_on_the_device(tmp_path: Path) -> None:
    """A region's last partial page is not page-locked: a query reaching into it must not be
    read by the device (the runner joins it on the host instead)."""
    from recserve.engine.gpu_process import _Regions, _Request

    path = tmp_path / "region"
    path.write_bytes(bytes(3 * mmap.PAGESIZE + 100))
    regions = _Regions(torch.device("cpu"))
    regions.map(7, str(path), 3 * mmap.PAGESIZE + 100)
    try:
        part = _Request(0, items=4, ids=10, region=7, dense=0, values=64, offsets=256)
        assert not regions.pinned((part,), num_keys=2, num_dense=3)  # nothing locked on a CPU
        regions._locked[7] = 3 * mmap.PAGESIZE  # as a CUDA runner locks it: whole pages only
        assert regions.pinned((part,), num_keys=2, num_dense=3)
        end = 3 * mmap.PAGESIZE - 8 * (2 * 4 + 1)  # offsets end exactly at the locked span
        assert regions.pinned((dataclasses.replace(part, offsets=end),), 2, 3)
        assert not regions.pinned((dataclasses.replace(part, offsets=end + 8),), 2, 3)
        assert not regions.pinned((dataclasses.replace(part, region=8),), 2, 3)  # unknown
    finally:
        regions.close()


def test_runner_overhead_reports_the_runners_time_per_batch() -> None:
    """bench serve's engine-overhead measurement says where the runner's time per batch went
    (on the CPU: all host work, no device wait)."""
    from recserve.cli.bench_serve import runner_overhead
    from recserve.loadgen.driver import QueryPool
    from recserve.loadgen.sizes import QuerySizes

    model = build_model("ncf", "tiny", seed=1)
    pool = QueryPool(QueryFactory(model.config, seed=2), QuerySizes.parse("fixed:8"), pool_size=8)
    config = EngineConfig(cpu_workers=0, device="cpu", max_query_items=64, queue_capacity=64)
    with RecEngine(model, config) as engine:
        result = runner_overhead(model, engine, pool)
    assert result["engine_qps"] > 0 and result["tight_loop_qps"] > 0
    levels = result["engine_qps_by_outstanding"]
    assert set(levels) == {"4", "16"}
    assert result["engine_qps"] == max(levels.values())
    assert result["runner_host_ms_per_batch"] > 0
    assert result["runner_device_wait_ms_per_batch"] == 0
