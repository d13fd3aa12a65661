"""What the engine process spends per request, with and without the runner reading requests
where the front ends decoded them.

The server's engine process (``recserve.server.engine_host``) was the saturated process of
``bench server`` on the H200: 1.00 core, 338 µs of CPU per wnd request, most of it joining
requests into the GPU runner's slot. Here one stand-in front end (this process) writes
requests into a shared-memory arena, as front ends do, and keeps ``--outstanding`` of them in
the engine process; for each ``share_inputs`` setting it reports requests per second and the
CPU seconds per request of the engine process and of the runner process (from ``/proc``).

    PYTHONPATH=src python benchmarks/probe_engine_copy.py --model wnd --preset paper \\
        --device cuda --out benchmarks/results

``--device cpu`` runs the runner's CPU stand-in (the model on the CPU), where the engine
process's CPU per request is still measured but the runner is slow. Writes
``<out>/<device>/probe_engine_copy.json`` (``summary`` first).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from recserve.bench.common import write_result
from recserve.engine import EngineConfig, SchedConfig
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import build_model
from recserve.server import ipc
from recserve.server.engine_host import EngineHost, batch_arrays, infer_meta
from recserve.server.proc_stats import children, cpu_seconds


def place(arena: ipc.Arena, batches: list[Any]) -> list[tuple[dict[str, Any], Any]]:
    """Each batch written into the arena once (every setting reads the same copies)."""
    placed = []
    for batch in batches:
        where = arena.write(batch_arrays(batch))
        assert where is not None, "arena too small"
        placed.append((infer_meta(batch), where))
    return placed


def drive(
    host: EngineHost,
    arena: ipc.Arena,
    placed: list[tuple[dict[str, Any], Any]],
    outstanding: int,
    seconds: float,
) -> dict[str, float]:
    """Closed loop of ``outstanding`` requests from the arena for ``seconds``."""
    replies: list[int] = []
    proto = ipc.FrameProtocol(lambda meta, data: replies.append(meta["id"]))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(host.address)

        def send(meta: dict[str, Any]) -> None:
            sock.sendall(b"".join(bytes(p) for p in ipc.frame(meta)))

        def request(call: int) -> None:
            meta, (block, offsets) = placed[call % len(placed)]
            send({**meta, "id": call, "shm": list(block), "arrays": offsets})

        send({"op": "hello", "arena": arena.path, "arena_size": arena.size})
        runner = children(host.pid)
        call = 0
        for _ in range(outstanding):
            request(call)
            call += 1
        answered, began = 0, 0.0
        engine_cpu = runner_cpu = 0.0
        while True:
            buf = proto.get_buffer(-1)
            n = sock.recv_into(buf)
            if not n:
                raise RuntimeError("the engine process closed the connection")
            proto.buffer_updated(n)
            for _ in replies:
                if answered == outstanding * 4 and not began:  # warmed up: start counting
                    began, counted = time.perf_counter(), answered
                    engine_cpu = cpu_seconds(host.pid)
                    runner_cpu = sum(cpu_seconds(p) for p in runner)
                answered += 1
                request(call)
                call += 1
            replies.clear()
            if began and time.perf_counter() - began > seconds:
                break
        wall = time.perf_counter() - began
        done = answered - counted
        engine_cpu = cpu_seconds(host.pid) - engine_cpu
        runner_cpu = sum(cpu_seconds(p) for p in runner) - runner_cpu
        while answered < call:  # drain before the next setting
            buf = proto.get_buffer(-1)
            n = sock.recv_into(buf)
            if not n:
                break
            proto.buffer_updated(n)
            answered += len(replies)
            replies.clear()
    return {
        "qps": done / wall,
        "engine_cpu_us_per_request": 1e6 * engine_cpu / done,
        "engine_cores_busy": engine_cpu / wall,
        "runner_cpu_us_per_request": 1e6 * runner_cpu / done,
        "runner_cores_busy": runner_cpu / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wnd")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--batch", type=int, default=256, help="items per request")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (the runner's stand-in)")
    parser.add_argument("--outstanding", type=int, nargs="+", default=[16])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    model = build_model(args.model, args.preset, seed=0)
    factory = QueryFactory(model.config, "zipf:1.05", seed=0)
    keys = model.config.feature_keys
    batches = []
    for _ in range(8):
        b = factory.make(args.batch)
        batches.append(type(b)(b.dense, b.sparse.select(keys)))
    request_bytes = sum(a.nbytes for a in batch_arrays(batches[0]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="recserve-probe-", dir="/dev/shm") as tmp:
        arena = ipc.Arena(os.path.join(tmp, "arena"), max(1 << 24, 16 * request_bytes))
        placed = place(arena, batches)
        for share in (False, True):
            sched = SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=2048)
            config = EngineConfig(
                sched=sched,
                cpu_workers=0,
                device=args.device,
                max_query_items=args.batch,
                queue_capacity=256,
                share_inputs=share,
            )
            with EngineHost(model, config) as host:
                for outstanding in args.outstanding:
                    row = {"share_inputs": share, "outstanding": outstanding}
                    row |= drive(host, arena, placed, outstanding, args.seconds)
                    rows.append(row)
                    print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
        arena.close()

    def mean(share: bool, key: str) -> float:
        return float(np.mean([r[key] for r in rows if r["share_inputs"] is share]))

    summary = {
        "model": args.model,
        "request_bytes": request_bytes,
        "engine_cpu_us_per_request_copy": mean(False, "engine_cpu_us_per_request"),
        "engine_cpu_us_per_request_shared": mean(True, "engine_cpu_us_per_request"),
        "qps_copy": mean(False, "qps"),
        "qps_shared": mean(True, "qps"),
        "runner": args.device,
    }
    body = {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    print(summary)
    path = write_result(args.out, "probe_engine_copy", summary, body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
