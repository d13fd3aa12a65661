"""Does joining queued queries with several threads pay in an in-process engine?

The in-process engine of ``bench server`` (the DeepRecSys engine, every query to the GPU
runner, queued queries joined into one batch up to 4096 items) is driven by ``--callers``
threads in a closed loop, each submitting a query and waiting for its answer, for each
``EngineConfig.stage_threads`` setting, alternated over ``--rounds`` so that a host that
slows down falls on both. Reports QPS and this process's CPU per query, and the host's speed
before and after (``machine_speed``).

    PYTHONPATH=src python benchmarks/probe_stage_threads.py --device cuda --out benchmarks/results

Writes ``<out>/<device>/probe_stage_threads.json`` (``summary`` first). ``--device cpu`` runs
on CPU workers instead of the runner (no joins; a check that the script runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import torch

from recserve.bench.common import machine_speed, write_result
from recserve.engine import RecEngine
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import build_model
from recserve.server.repository import rec_engine_config
from recserve.server.settings import ServingConfig


def drive(engine: RecEngine, queries: list, callers: int, seconds: float) -> dict[str, float]:
    """``callers`` threads, each submitting and waiting, for ``seconds``."""
    stop = time.perf_counter() + seconds
    counts = [0] * callers

    def loop(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            engine.submit(queries[i % len(queries)]).result(60)
            counts[k] += 1
            i += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu, done = time.perf_counter() - t0, time.process_time() - cpu0, sum(counts)
    return {"qps": done / wall, "cpu_us_per_query": cpu / max(done, 1) * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="wnd")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--batch", type=int, default=256, help="items per query")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--stage-threads", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--callers", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = build_model(args.model, args.preset, seed=0)
    factory = QueryFactory(model.config, seed=0)
    keys = model.config.feature_keys
    queries = []
    for _ in range(4):
        b = factory.make(args.batch)
        queries.append(type(b)(b.dense, b.sparse.select(keys)))
    serving = ServingConfig(device=args.device, max_items=4096, max_inflight_batches=3)
    base = rec_engine_config(serving)
    speed_before = machine_speed()
    rows = []
    for rnd in range(args.rounds):
        for st in args.stage_threads:
            with RecEngine(model, dataclasses.replace(base, stage_threads=st)) as engine:
                for q in queries:  # warm: graphs captured, workers started
                    engine.submit(q).result(120)
                row = {"round": rnd, "stage_threads": st, "callers": args.callers}
                row |= drive(engine, queries, args.callers, args.seconds)
                stats = engine.stats()
                row |= {k: stats.get(k) for k in ("gpu_queries", "gpu_batches")}
            rows.append(row)
            print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
    summary = {
        "model": args.model,
        "batch": args.batch,
        **{
            f"qps_stage_threads_{st}": float(
                np.mean([r["qps"] for r in rows if r["stage_threads"] == st])
            )
            for st in args.stage_threads
        },
    }
    body = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "machine": {"speed_before": speed_before, "speed_after": machine_speed()},
    }
    print(summary)
    print(f"wrote {write_result(args.out, 'probe_stage_threads', summary, body)}")


if __name__ == "__main__":
    main()
