"""Where the GPU runner's host time per batch goes, against the same pipeline in a tight loop.

``bench serve`` measures the engine's overhead as its GPU throughput (every query alone) against
a tight loop calling the runner's own pipeline on the same queries. This probe splits both:

- the tight loop's host time per query (the pipeline call returns once everything is
  enqueued) and its whole time (after copying the answer to the host);
- the engine at 1, 4 and 16 queries in flight, with the runner's host time and device wait
  per batch (the runner reports both);
- the pipeline alone on 1, 2, 4 and 8 queries joined into one page-locked host batch (copies
  in, forward, synchronised each call): whether the time per query falls as queries are
  joined, or grows with the items so that joining cannot raise the GPU's throughput;
- the engine joining queued queries (T=0, cap 2048, no delay and 0.5 ms) at 16 and 64 in
  flight, with how the runner read its inputs and the queries per batch;
- with ``OPEN=1``: the engine under open-loop Poisson arrivals (what ``bench serve`` offers),
  each query alone and joined, at a few loads for 2 s each: achieved QPS, p50 / p95 / p99 /
  max latency and queries per batch (``bench serve``'s probes last 0.4 s);
- with ``GC=1`` instead of all the above: that open loop with the garbage collector frozen
  after start-up (``EngineConfig.gc_freeze``) and not, alternately, twice, with the engine
  process's full collections in each run (the runner logs any collection over 5 ms);
- a py-spy profile of the runner process (and of this process, the engine's loop thread) at 4
  in flight, when ``py-spy`` is on the PATH: the most-sampled lines, self and inclusive.

Queries are DeepRecInfra's production sizes with Zipf 1.05 ids, in one shared file the runner
reads in place (as ``bench serve`` does). Needs CUDA (``DEV=cpu`` runs the CPU stand-in, for a
check of the script only)::

    PYTHONPATH=src python benchmarks/probe_runner_host.py dlrm-rmc1 > runner.txt

``OUT`` names the folder for py-spy's raw profiles (default ``/tmp``); ``PRESET`` the model
scale (default ``paper``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from recserve.bench.pyspy import top_frames
from recserve.cli.bench_serve import runner_baseline, runner_overhead
from recserve.engine.batching import concat_batches
from recserve.engine.config import EngineConfig, SchedConfig
from recserve.engine.deeprecsched import STATIC_GPU, saturation_qps
from recserve.engine.engine import RecEngine
from recserve.engine.query_memory import QueryMemory
from recserve.loadgen.driver import QueryPool, run_open_loop
from recserve.loadgen.sizes import QuerySizes
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import build_model
from recserve.procname import process_name
from recserve.types import Batch, KeyedJagged


def spy(pid: int, seconds: int, out: str) -> subprocess.Popen[bytes]:
    cmd = ["py-spy", "record", "-p", str(pid), "-d", str(seconds), "-r", "500",
           "--format", "raw", "-o", out, "--nonblocking", "--threads"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def pinned_copy(batch: Batch) -> Batch:
    s = batch.sparse
    sparse = KeyedJagged(s.keys, s.values.pin_memory(), s.offsets.pin_memory(), s.batch_size)
    return Batch(batch.dense.pin_memory(), sparse)


def device_scaling(base: object, pool: QueryPool, device: torch.device | None) -> None:
    """The pipeline on k queries joined into one page-locked host batch (copies in, forward,
    each call synchronised): the median time per call and per query."""
    if device is None or device.type != "cuda":
        return
    first = pool.batches[0]
    print(
        "shared queries seen as page-locked here:",
        first.dense.is_pinned(), first.sparse.values.is_pinned(),
    )  # fmt: skip
    keys = first.sparse.keys
    for k in (1, 2, 4, 8):
        joined = [
            pinned_copy(concat_batches(pool.batches[i : i + k], keys)) for i in range(0, 8 * k, k)
        ]
        times = []
        with torch.inference_mode():
            for i in range(120):
                b = joined[i % len(joined)]
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                base(b)  # type: ignore[operator]
                torch.cuda.synchronize(device)
                if i >= 20:
                    times.append(time.perf_counter() - t0)
        per_call = statistics.median(times) * 1e6
        items = statistics.mean(b.batch_size for b in joined)
        print(
            f"device, {k} joined ({items:.0f} items): {per_call:.0f} us per call, "
            f"{per_call / k:.0f} us per query"
        )


def open_loop(
    engine: RecEngine,
    pool: QueryPool,
    joining: SchedConfig,
    loads: tuple[float, ...] = (2000.0, 3000.0, 4000.0, 5000.0),
    label: str = "",
) -> None:
    """Each query alone and joined under Poisson arrivals at a few loads, 2 s each, with the
    engine process's garbage collections over each run (full ones: count and longest)."""
    for kind, sched in (("alone", STATIC_GPU["gpu-only"]), ("joined", joining)):
        engine.set_schedule(sched)
        for qps in loads:
            s0 = engine.stats()
            r = run_open_loop(engine, pool, qps, int(2 * qps), seed=int(qps))
            s1 = engine.stats()
            n = max(1, s1["gpu_batches"] - s0["gpu_batches"])
            ms = np.percentile(r.latencies, [50, 95, 99, 100]) * 1e3 if r.latencies.size else []
            full = s1["gc"]["collections"][2] - s0["gc"]["collections"][2]
            print(
                f"open loop{label}, {kind}, offered {qps:.0f}: achieved {r.achieved_qps:.0f} "
                f"QPS, p50/p95/p99/max {' / '.join(f'{x:.1f}' for x in ms)} ms, "
                f"{r.latencies.size / n:.1f} queries per batch, lost {r.lost}; "
                f"full collections {full} (longest so far {s1['gc']['max_ms'][2]:.1f} ms)"
            )


def gc_ab(model: torch.nn.Module, pool: QueryPool, config: EngineConfig) -> None:
    """The open loop with the collector frozen after start-up and without, alternately."""
    joining = SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=2048)
    batches = pool.batches
    for rnd in range(2):
        for freeze in (False, True):
            engine = RecEngine(model, dataclasses.replace(config, gc_freeze=freeze))
            memory = QueryMemory(engine, batches)
            pool.batches = memory.batches
            label = f" [round {rnd}, gc_freeze={freeze}]"
            print(label, "objects frozen:", engine.stats()["gc"]["frozen_objects"])
            open_loop(engine, pool, joining, (3000.0, 4500.0), label)
            memory.close()
            engine.close()
    pool.batches = batches


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "dlrm-rmc1"
    out = os.environ.get("OUT", "/tmp")
    torch.set_num_threads(1)
    model = build_model(name, os.environ.get("PRESET", "paper"), seed=0)
    factory = QueryFactory(model.config, "zipf:1.05", seed=0)
    pool = QueryPool(factory, QuerySizes.parse("production"), seed=0)
    config = EngineConfig(
        cpu_workers=0, device=os.environ.get("DEV", "cuda"), queue_capacity=512,
        gpu_runner="process",
    )  # fmt: skip
    if os.environ.get("GC") == "1":
        gc_ab(model, pool, config)
        return
    engine = RecEngine(model, config)
    memory = QueryMemory(engine, pool.batches)
    pool.batches = memory.batches
    memory.pin()
    items = statistics.mean(b.batch_size for b in pool.batches)
    print("shared", memory.shared, "batches", len(pool.batches), "items mean", items)
    print("overhead", runner_overhead(model, engine, pool))
    base = runner_baseline(model, engine)
    launch, whole = [], []
    with torch.inference_mode():
        for i in range(600):
            b = pool.batches[i % len(pool.batches)]
            t0 = time.perf_counter()
            answer = base(b)
            t1 = time.perf_counter()
            answer.cpu()
            t2 = time.perf_counter()
            if i > 50:
                launch.append(t1 - t0)
                whole.append(t2 - t0)
    print(
        f"tight loop: launch {statistics.median(launch) * 1e6:.0f} us, "
        f"whole {statistics.median(whole) * 1e6:.0f} us"
    )
    device_scaling(base, pool, engine.device)
    joining = SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=2048)
    runs = [("alone", STATIC_GPU["gpu-only"], level) for level in (1, 4, 16)] + [
        (f"joined, delay {d} ms", joining.with_(gpu_max_delay=d / 1e3), level)
        for d in (0, 0.5)
        for level in (16, 64)
    ]
    for label, sched, level in runs:
        s0 = engine.stats()
        qps = saturation_qps(engine, pool, sched, seconds=1.0, outstanding=level)
        s1 = engine.stats()
        n = s1["gpu_batches"] - s0["gpu_batches"]
        host = (s1["gpu_runner_host_s"] - s0["gpu_runner_host_s"]) / n * 1e6
        wait = (s1["gpu_runner_device_wait_s"] - s0["gpu_runner_device_wait_s"]) / n * 1e6
        routes = {
            k: v - s0["gpu_batches_by_input"][k]
            for k, v in s1["gpu_batches_by_input"].items()
            if v > s0["gpu_batches_by_input"][k]
        }
        print(
            f"{label}, outstanding {level}: {qps:.0f} QPS, {qps * 1.0 / max(n, 1):.1f} queries "
            f"per batch, runner host {host:.0f} us/batch, wait {wait:.0f} us/batch, "
            f"{n} batches, inputs {routes}"
        )
    if os.environ.get("OPEN") == "1":
        open_loop(engine, pool, joining)
    if shutil.which("py-spy"):
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        runner = next(p for p in pids if process_name(p) == "recserve-gpu")
        spies = [spy(runner, 3, f"{out}/runner-0.raw"), spy(os.getpid(), 3, f"{out}/engine-0.raw")]
        time.sleep(0.3)
        qps = saturation_qps(engine, pool, STATIC_GPU["gpu-only"], seconds=3.5, outstanding=4)
        for s in spies:
            s.wait()
        print(f"== runner profile native=False ({qps:.0f} QPS)")
        print("\n".join(top_frames(f"{out}/runner-0.raw", 30, skip_outer=6)))
        print("== engine process profile")
        print("\n".join(top_frames(f"{out}/engine-0.raw", 20, skip_outer=6)))
    memory.close()
    engine.close()


if __name__ == "__main__":
    main()
