"""Where one query's time goes in the server, for each ``--busy-poll-us`` setting.

Sequential 256-item queries (one caller): the in-process engine's p50, then over HTTP and gRPC
the client's p50 next to what the server's ``/metrics`` say of the same queries (the front
end's handler time, and the engine's time for the query), and the plain loopback TCP round
trip of a body that size. Optionally (``--saturation-s``) closed-loop HTTP and gRPC QPS at 32
and 64 callers, to show what a setting costs in throughput. Polling is limited to a light load
as in the server (``--busy-poll-max-outstanding``, default 1).

    PYTHONPATH=src python benchmarks/probe_server_latency.py --busy-poll-us 0 1000 \\
        --saturation-s 4 --out benchmarks/results

Writes ``<out>/<device>/server_latency_probe.json`` (``summary`` first: HTTP and gRPC p50
overheads per setting).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recserve.bench.common import device_label, write_result
from recserve.loadgen.synthetic import QueryFactory
from recserve.models import build_model, load_model, save_model
from recserve.runtime import resolve_device
from recserve.server.bench import (
    BenchOptions,
    ServerProcess,
    closed_loop_processes,
    in_process_engine,
    timed,
)
from recserve.server.client import GRPCClient, HTTPClient


def server_means_ms(url: str) -> dict[str, float]:
    """Sums and counts of the server's duration histograms (all labels together)."""
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for stage in ("request", "compute"):
            name = f"recserve_{stage}_duration_seconds"
            for part in ("_sum", "_count"):
                if line.startswith(name + part):
                    key = stage + part
                    out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def tcp_round_trip_ms(nbytes: int, n: int = 200) -> float:
    """p50 of sending ``nbytes`` over loopback TCP and a one-byte answer."""
    listener = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = listener.accept()
        buf = bytearray(nbytes)
        with conn:
            while True:
                view, got = memoryview(buf), 0
                while got < nbytes:
                    k = conn.recv_into(view[got:])
                    if not k:
                        return
                    got += k
                conn.sendall(b"x")

    threading.Thread(target=echo, daemon=True).start()
    data = bytearray(nbytes)
    with socket.create_connection(listener.getsockname()) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            sock.sendall(data)
            sock.recv(1)
            samples.append(time.perf_counter() - start)
    listener.close()
    return float(np.median(samples[n // 10 :]) * 1e3)


def probe(model_name: str, preset: str, device: str, frontends: int, busy: int, n: int,
          saturation_s: float, max_outstanding: int = 1) -> dict[str, Any]:  # fmt: skip
    opts = BenchOptions(models=(model_name,), preset=preset, frontends=frontends, device=device,
                        engine="rec", busy_poll_us=busy,
                        busy_poll_max_outstanding=max_outstanding)  # fmt: skip
    result: dict[str, Any] = {"busy_poll_us": busy, "busy_poll_max_outstanding": max_outstanding}
    with tempfile.TemporaryDirectory(prefix="recserve-probe-") as tmp:
        repo = Path(tmp)
        save_model(build_model(model_name, preset, seed=0), repo / model_name)
        model = load_model(repo / model_name, device="cpu")
        config = model.config
        queries = [QueryFactory(config, seed=0).make(256) for _ in range(4)]
        engine = in_process_engine(model, opts)
        try:
            samples = timed(lambda b: engine.submit(b).result(), queries, n, 20)
        finally:
            engine.close()
        result["inprocess_p50_ms"] = float(np.median(samples) * 1e3)
        server = ServerProcess(repo, opts)
        try:
            for proto, client in (("http", HTTPClient(server.http_url)),
                                  ("grpc", GRPCClient(server.grpc_url))):  # fmt: skip

                def call(b: Any, client: Any = client) -> Any:
                    return client.infer(model_name, config, b)

                timed(call, queries, 20, 10)
                before = server_means_ms(server.http_url)
                samples = timed(call, queries, n, 0)
                after = server_means_ms(server.http_url)
                client.close()
                d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                p50 = float(np.median(samples) * 1e3)
                result[proto] = {
                    "p50_ms": p50,
                    "overhead_ms": p50 - result["inprocess_p50_ms"],
                    "handler_mean_ms": d["request_sum"] / max(d["request_count"], 1) * 1e3,
                    "engine_mean_ms": d["compute_sum"] / max(d["compute_count"], 1) * 1e3,
                }
            if saturation_s > 0:
                urls = {"http": server.http_url, "grpc": server.grpc_url}
                for callers in (32, 64):
                    for proto, url in urls.items():
                        run = closed_loop_processes(proto, url, model_name, config, queries,
                                                    callers, saturation_s)  # fmt: skip
                        result[f"{proto}_qps_{callers}_callers"] = run["qps"]
        finally:
            server.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wnd")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frontends", type=int, default=8)
    parser.add_argument("--busy-poll-us", type=int, nargs="+", default=[0])
    parser.add_argument("-n", type=int, default=200, help="timed queries per side")
    parser.add_argument("--saturation-s", type=float, default=0.0)
    parser.add_argument("--busy-poll-max-outstanding", type=int, default=1,
                        help="poll only while at most this many answers are outstanding")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    runs = []
    for busy in args.busy_poll_us:
        r = probe(args.model, args.preset, str(device), args.frontends, busy, args.n,
                  args.saturation_s, args.busy_poll_max_outstanding)  # fmt: skip
        runs.append(r)
        qps = "; ".join(f"{k} {v:.0f}" for k, v in r.items() if "_qps_" in k)
        print(
            f"busy-poll {busy:5d} us: in-process {r['inprocess_p50_ms']:.2f} ms; "
            + "; ".join(
                f"{p} {r[p]['p50_ms']:.2f} ms (handler {r[p]['handler_mean_ms']:.2f}, "
                f"engine {r[p]['engine_mean_ms']:.2f})"
                for p in ("http", "grpc")
            )
            + (f"; {qps}" if qps else ""),
            flush=True,
        )
    body_bytes = sum(t.nbytes for t in _body_arrays(args.model, args.preset))
    summary = {
        f"{p}_p50_overhead_ms_busy{r['busy_poll_us']}": r[p]["overhead_ms"]
        for r in runs
        for p in ("http", "grpc")
    }
    summary["busy_poll_max_outstanding"] = args.busy_poll_max_outstanding
    body = {"model": args.model, "preset": args.preset, "frontends": args.frontends,
            "request_bytes": body_bytes, "tcp_round_trip_ms": tcp_round_trip_ms(body_bytes),
            "runs": runs}  # fmt: skip
    path = write_result(args.out, "server_latency_probe", summary, body, device_label(device))
    print(f"wrote {path}")


def _body_arrays(model: str, preset: str) -> list[np.ndarray]:
    from recserve.models import get_config

    q = QueryFactory(get_config(model, preset), seed=0).make(256)
    return [q.dense.numpy(), q.sparse.values.numpy(), q.sparse.offsets.numpy()]


if __name__ == "__main__":
    main()
