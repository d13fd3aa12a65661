"""Joining queued queries on the device instead of the host: what it saves, per model.

1. The runner's pipeline alone, ``Q`` production-sized queries per batch (Q = 1, 2, 4, 8),
   each query in page-locked memory: joined on the host into pinned buffers (one thread, as
   the runner does below 16 MB) and then run, against :meth:`GPUPipeline.call_joined` (one
   launch reads them in place over PCIe). Milliseconds per batch until the answer is on the
   host, and the host's share of it.
2. The engine at saturation (closed loop, GPU only, 16 outstanding queries), every query
   alone and queued queries joined up to 2048 items, with the queries in three places: this
   process's heap (the engine copies each into the runner's slot), a :class:`QueryMemory`
   joined on the host by the runner, and a :class:`QueryMemory` joined on the device.

    PYTHONPATH=src python benchmarks/probe_device_join.py --models dlrm-rmc1 dlrm-rmc2 wnd

Writes ``<out>/<device>/probe_device_join.json`` (``summary`` first).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recserve.bench.common import write_result
from recserve.engine import EngineConfig, RecEngine
from recserve.engine.batching import HostBuffers, concat_batches
from recserve.engine.config import SchedConfig
from recserve.engine.deeprecsched import saturation_qps
from recserve.engine.engine import default_ids_per_item
from recserve.engine.gpu_process import runner_buckets
from recserve.engine.query_memory import QueryMemory
from recserve.loadgen.driver import QueryPool
from recserve.loadgen.sizes import QuerySizes
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import build_model
from recserve.pipeline import runner_model
from recserve.types import Batch, KeyedJagged

SCHEDULES = {
    "alone": SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=1),
    "join-2048": SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=2048),
}
PLACES = ("heap", "shared-host-join", "shared-device-join")


def _pinned(batch: Batch, keys: tuple[str, ...]) -> Batch:
    s = batch.sparse if batch.sparse.keys == keys else batch.sparse.select(keys)
    sparse = KeyedJagged(keys, s.values.pin_memory(), s.offsets.pin_memory(), s.batch_size)
    return Batch(batch.dense.pin_memory(), sparse)


def pipeline_rows(model: Any, pool: QueryPool, device: torch.device, reps: int) -> list[dict]:
    ids = default_ids_per_item(model.config)
    _, pipeline = runner_model(model, device, "triton", runner_buckets(2048), ids)
    assert pipeline is not None
    keys = pipeline.keys
    pinned = [_pinned(b, keys) for b in pool.batches]
    bufs = HostBuffers.allocate(
        2048 * 8, 2048 * 8 * ids, len(keys), model.config.num_dense, pin=True
    )
    rows = []
    for q in (1, 2, 4, 8):
        for how in ("host", "device"):
            rng = np.random.default_rng(q)  # both ways join the same queries
            host_s, total_s, items = [], [], []
            for r in range(reps + 3):
                picks = [pinned[i] for i in rng.integers(0, len(pinned), q)]
                while sum(p.batch_size for p in picks) > 2048:
                    picks.pop()
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                if how == "host":
                    out = pipeline(concat_batches(picks, keys, bufs))
                else:
                    out = pipeline.call_joined(picks)
                    assert out is not None
                t1 = time.perf_counter()
                out.cpu()
                t2 = time.perf_counter()
                if r >= 3:
                    host_s.append(t1 - t0)
                    total_s.append(t2 - t0)
                    items.append(sum(p.batch_size for p in picks))
            rows.append(
                {
                    "queries": q,
                    "join": how,
                    "items_mean": float(np.mean(items)),
                    "host_ms": 1e3 * float(np.median(host_s)),
                    "total_ms": 1e3 * float(np.median(total_s)),
                }
            )
            print(f"  pipeline {rows[-1]}", flush=True)
    return rows


def engine_rows(model: Any, pool: QueryPool, seconds: float) -> list[dict]:
    rows = []
    for place in PLACES:
        config = EngineConfig(
            cpu_workers=0,
            device="cuda",
            queue_capacity=512,
            join_on_device=place == "shared-device-join",
        )
        with RecEngine(model, config) as engine:
            memory = QueryMemory(engine, pool.batches) if place != "heap" else None
            batches = pool.batches
            if memory is not None:
                assert memory.shared
                pool.batches = memory.batches
            try:
                for name, sched in SCHEDULES.items():
                    best, ratio = 0.0, 0.0
                    for _ in range(2):
                        before = engine.stats()
                        qps = saturation_qps(engine, pool, sched, seconds=seconds, outstanding=16)
                        after = engine.stats()
                        b = after["gpu_batches"] - before["gpu_batches"]
                        if qps > best:
                            best = qps
                            ratio = (after["gpu_queries"] - before["gpu_queries"]) / max(b, 1)
                    rows.append(
                        {"place": place, "schedule": name, "qps": best, "queries_per_batch": ratio}
                    )
                    print(f"  engine {rows[-1]}", flush=True)
            finally:
                pool.batches = batches
                if memory is not None:
                    memory.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["dlrm-rmc1", "dlrm-rmc2", "wnd"])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--ids", default="zipf:1.05")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=0.8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this probe needs a CUDA device")
    device = torch.device("cuda")
    summary: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for name in args.models:
        print(f"{name}:", flush=True)
        model = build_model(name, args.preset, seed=0)
        pool = QueryPool(
            QueryFactory(model.config, args.ids, seed=0), QuerySizes.parse("production")
        )
        pipe = pipeline_rows(model, pool, device, args.reps)
        eng = engine_rows(model, pool, args.seconds)
        models[name] = {"pipeline": pipe, "engine": eng}
        summary[name] = {f"{r['place']}/{r['schedule']}": round(r["qps"], 1) for r in eng} | {
            f"pipeline_q4_{r['join']}_ms": round(r["total_ms"], 3)
            for r in pipe
            if r["queries"] == 4
        }
        print(f"  summary {summary[name]}", flush=True)
        del model, pool
    body = {"settings": vars(args) | {"out": str(args.out)}, "models": models}
    path = write_result(args.out, "probe_device_join", summary, body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
