"""What a bare gRPC server spends per request, with each transport option the front ends could take.

At saturation the gRPC front ends use more CPU per query than the HTTP ones (`NOTES-server.md`,
points 10 and 11). The handler's own work is the same decode, so the difference is grpcio's.
This probe serves a fixed reply to a 256-item wnd request (636 KB) from a server that does
nothing else, in a process of its own, for each variant: ``grpc.aio`` with HTTP/2's default
16 KB frames (as the front ends run it), with 4 MB frames, with
``grpc.optimization_target=throughput``, with an 8 MB stream window, the synchronous server on
a thread pool, and aiohttp over HTTP as the reference.
Closed-loop callers (threads of this process, a connection each) keep it busy; the server's CPU
seconds per request come from ``/proc``.

    python benchmarks/probe_grpc_options.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from recserve.bench.common import write_result
from recserve.loadgen.synthetic import QueryFactory
from recserve.models import build_model
from recserve.server.client import HTTPClient, grpc_infer_bytes, http_infer_body
from recserve.server.echo import EchoServer
from recserve.server.proc_stats import cpu_seconds

SERVICE, METHOD = "recserve.Probe", "Call"
LIMIT = 256 << 20
BASE = [("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT)]
VARIANTS: dict[str, tuple[str, list[tuple[str, Any]]]] = {
    "aio, 16 KB frames (HTTP/2's default)": ("aio", []),
    "aio, 4 MB frames": ("aio", [("grpc.http2.max_frame_size", 4 << 20)]),
    "aio, optimization_target=throughput": ("aio", [("grpc.optimization_target", "throughput")]),
    "aio, 8 MB stream window": ("aio", [("grpc.http2.lookahead_bytes", 8 << 20)]),
    "sync server, 8 threads": ("sync", []),
}


def _serve(conn: Any, kind: str, options: list[tuple[str, Any]]) -> None:
    reply = bytes(1024)
    handlers = {METHOD: grpc.unary_unary_rpc_method_handler(lambda data, ctx: reply)}
    if kind == "sync":
        server = grpc.server(ThreadPoolExecutor(max_workers=8), options=[*BASE, *options])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        conn.send(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        conn.recv()
        server.stop(0)
        return

    async def call(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply

    async def main() -> None:
        server = grpc.aio.server(options=[*BASE, *options])
        aio = {METHOD: grpc.unary_unary_rpc_method_handler(call)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, aio),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await server.stop(0)

    asyncio.run(main())


def _closed_loop(calls: list[Callable[[], object]], pid: int, seconds: float) -> dict[str, float]:
    for call in calls:
        call()
    counts = [0] * len(calls)
    stop = time.perf_counter() + seconds

    def loop(k: int) -> None:
        while time.perf_counter() < stop:
            calls[k]()
            counts[k] += 1

    server0, client0, t0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, n = time.perf_counter() - t0, sum(counts)
    return {
        "requests_per_s": n / wall,
        "server_us_per_request": (cpu_seconds(pid) - server0) / n * 1e6,
        "client_us_per_request": (time.process_time() - client0) / n * 1e6,
    }


def _grpc_variant(
    kind: str, options: list[tuple[str, Any]], data: bytes, callers: int, seconds: float
) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, kind, options), daemon=True)
    proc.start()
    url = f"127.0.0.1:{conn.recv()}"
    client_options = [*BASE, ("grpc.use_local_subchannel_pool", 1), *options]
    channels = [grpc.insecure_channel(url, options=client_options) for _ in range(callers)]
    try:
        stubs = [c.unary_unary(f"/{SERVICE}/{METHOD}") for c in channels]
        calls = [lambda s=s: s(data) for s in stubs]
        return _closed_loop(calls, proc.pid or 0, seconds)
    finally:
        conn.send("stop")
        proc.join(10)
        for channel in channels:
            channel.close()


def _http_reference(header: bytes, blobs: list[Any], callers: int, seconds: float) -> dict:
    with EchoServer() as echo:
        clients = [HTTPClient(echo.http_url) for _ in range(callers)]
        try:
            pid = echo.pid
            calls = [lambda c=c: c.post("/echo", header, blobs) for c in clients]
            return _closed_loop(calls, pid, seconds)
        finally:
            for client in clients:
                client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--callers", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=2, help="each variant is run this many times")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    model = build_model("wnd", "small", seed=0)
    batch = QueryFactory(model.config, seed=1).make(256)
    data = grpc_infer_bytes("wnd", batch, model.config)
    header, blobs = http_infer_body(batch, model.config)
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for name, (kind, options) in VARIANTS.items():
            runs.setdefault(name, []).append(
                _grpc_variant(kind, options, data, args.callers, args.seconds)
            )
        runs.setdefault("HTTP, aiohttp (reference)", []).append(
            _http_reference(header, blobs, args.callers, args.seconds)
        )
    best = {name: min(r, key=lambda x: x["server_us_per_request"]) for name, r in runs.items()}
    print(f"request: {len(data)} bytes; {args.callers} callers; best of {args.rounds} rounds")
    for name, r in best.items():
        print(
            f"  {name:44s} {r['requests_per_s']:6.0f} req/s   server "
            f"{r['server_us_per_request']:6.0f} µs/req   client {r['client_us_per_request']:6.0f}"
        )
    summary = {
        "request_bytes": len(data),
        "grpc_aio_server_us_per_request": best["aio, 16 KB frames (HTTP/2's default)"][
            "server_us_per_request"
        ],
        "grpc_aio_4mb_frames_server_us_per_request": best["aio, 4 MB frames"][
            "server_us_per_request"
        ],
        "best_grpc_variant": min(
            (n for n in best if not n.startswith("HTTP")),
            key=lambda n: best[n]["server_us_per_request"],
        ),
        "http_server_us_per_request": best["HTTP, aiohttp (reference)"]["server_us_per_request"],
    }
    path = write_result(args.out, "probe_grpc_options", summary, {"best": best, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
