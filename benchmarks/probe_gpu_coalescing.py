"""Does coalescing queued queries pay on the GPU runner? Per model, two measurements.

1. The runner's own pipeline, outside the engine: ``Q`` production-sized queries joined into
   one batch (as the engine joins them, into pinned buffers), then one call, for Q = 1, 2, 4,
   8: host time to join, host time to launch, and time until the answer is on the host, per
   batch and per query. If the per-query time falls with Q, coalescing can raise throughput.
2. The engine at saturation (closed loop, GPU only, no CPU workers) for three schedules: every
   query alone (``gpu_max_batch`` 1, the GPU-only baseline of ``bench serve``), and queued
   queries joined up to 512 and 2048 items, at 4 and 16 outstanding queries; with the engine's
   own counts of batches and queries (how much it actually joined).

Both for each ``--stage-threads`` setting (threads that copy queries into the runner's slot).

    PYTHONPATH=src python benchmarks/probe_gpu_coalescing.py --models dlrm-rmc1 wnd

Writes ``<out>/<device>/probe_gpu_coalescing.json`` (``summary`` first).
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
from recserve.engine.batching import Copier, HostBuffers, concat_batches
from recserve.engine.config import SchedConfig
from recserve.engine.deeprecsched import saturation_qps
from recserve.engine.engine import default_ids_per_item
from recserve.engine.gpu_process import runner_buckets
from recserve.loadgen.driver import QueryPool
from recserve.loadgen.sizes import QuerySizes
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import build_model
from recserve.pipeline import runner_model

SCHEDULES = {
    "alone": SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=1),
    "join-512": SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=512),
    "join-2048": SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=2048),
}


def pipeline_per_q(
    model: Any, pool: QueryPool, device: torch.device, reps: int, stage_threads: int
) -> list[dict]:
    """Join Q queries into pinned buffers (with ``stage_threads`` copying) and run the
    runner's pipeline on them."""
    ids = default_ids_per_item(model.config)
    _, pipeline = runner_model(model, device, "triton", runner_buckets(2048), ids)
    assert pipeline is not None
    keys = pipeline.keys
    bufs = HostBuffers.allocate(
        2048 * 8, 2048 * 8 * ids, len(keys), model.config.num_dense, pin=True
    )
    rng = np.random.default_rng(0)
    copier = Copier(stage_threads)
    rows = []
    for q in (1, 2, 4, 8):
        join_s, launch_s, total_s, items = [], [], [], []
        for r in range(reps + 3):
            picks = [pool.batches[i] for i in rng.integers(0, len(pool), q)]
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            batch = concat_batches(picks, keys, bufs, copier)
            t1 = time.perf_counter()
            out = pipeline(batch)
            t2 = time.perf_counter()
            out.cpu()
            t3 = time.perf_counter()
            if r >= 3:
                join_s.append(t1 - t0)
                launch_s.append(t2 - t1)
                total_s.append(t3 - t0)
                items.append(batch.batch_size)
        med = float(np.median(total_s))
        rows.append(
            {
                "stage_threads": stage_threads,
                "queries": q,
                "items_mean": float(np.mean(items)),
                "join_ms": 1e3 * float(np.median(join_s)),
                "launch_ms": 1e3 * float(np.median(launch_s)),
                "total_ms": 1e3 * med,
                "per_query_ms": 1e3 * med / q,
            }
        )
        print(f"  pipeline Q={q}: {rows[-1]}", flush=True)
    copier.close()
    return rows


def engine_rows(model: Any, pool: QueryPool, seconds: float, stage_threads: int) -> list[dict]:
    config = EngineConfig(
        cpu_workers=0, device="cuda", queue_capacity=512, stage_threads=stage_threads
    )
    rows = []
    with RecEngine(model, config) as engine:
        for name, sched in SCHEDULES.items():
            for outstanding in (4, 16):
                before = engine.stats()
                qps = saturation_qps(engine, pool, sched, seconds=seconds, outstanding=outstanding)
                after = engine.stats()
                batches = after["gpu_batches"] - before["gpu_batches"]
                queries = after["gpu_queries"] - before["gpu_queries"]
                items = after["gpu_items"] - before["gpu_items"]
                rows.append(
                    {
                        "stage_threads": stage_threads,
                        "schedule": name,
                        "outstanding": outstanding,
                        "qps": qps,
                        "queries_per_batch": queries / max(batches, 1),
                        "items_per_batch": items / max(batches, 1),
                    }
                )
                print(f"  engine {rows[-1]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["dlrm-rmc1", "wnd"])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--ids", default="zipf:1.05")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument(
        "--stage-threads", type=int, nargs="+", default=[1, 4], help="EngineConfig.stage_threads"
    )
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
        factory = QueryFactory(model.config, args.ids, seed=0)
        pool = QueryPool(factory, QuerySizes.parse("production"), seed=0)
        pipe, eng = [], []
        for threads in args.stage_threads:
            pipe += pipeline_per_q(model, pool, device, args.reps, threads)
        for threads in args.stage_threads:
            eng += engine_rows(model, pool, args.seconds, threads)
        models[name] = {"pipeline": pipe, "engine": eng}

        def best(label: str, threads: int, rows: list[dict] = eng) -> float:
            return max(
                r["qps"] for r in rows if r["schedule"] == label and r["stage_threads"] == threads
            )

        summary[name] = {
            f"stage_threads_{t}": {
                "engine_qps_alone": best("alone", t),
                "engine_qps_join_512": best("join-512", t),
                "engine_qps_join_2048": best("join-2048", t),
                "join_ms_q4": next(
                    r["join_ms"] for r in pipe if r["stage_threads"] == t and r["queries"] == 4
                ),
            }
            for t in args.stage_threads
        }
        print(f"  summary {summary[name]}", flush=True)
        del model, pool
    body = {"settings": vars(args) | {"out": str(args.out)}, "models": models}
    path = write_result(args.out, "probe_gpu_coalescing", summary, body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
