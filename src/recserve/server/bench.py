"""``recserve bench server``: what the network front end costs over calling the engine in-process.

Questions, each answered on the same machine, loopback, in one run:

1. p50 latency overhead of one query (256 items by default) over HTTP and over gRPC, against
   ``engine.submit(batch).result()`` in-process, for wnd and dlrm-rmc2 (the latter about 1M ids,
   8 MB on the wire: moving bytes dominates).
2. Saturation throughput: closed-loop callers against the server (client processes, several
   connections each) and the same number of threads submitting to an in-process engine, at each
   of ``saturation_levels`` callers; each side's best level, and the ratio.
3. Soak: open-loop Poisson arrivals at ``soak_load`` of the server's saturation QPS (HTTP and
   gRPC alternating) for ``soak_s`` seconds; the server process's resident memory after warm-up
   and at the end.

The server runs as a separate process (``python -m recserve.server``) on a repository written
for the run, so client and server do not share a GIL. Both sides use the same engine
(:class:`~recserve.server.local_engine.LocalEngine`) on the same device.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recserve.bench.common import device_label, machine_speed, write_result
from recserve.config import ModelConfig
from recserve.engine.config import EngineConfig
from recserve.engine.engine import RecEngine
from recserve.engine.gpu_process import INPUT_ROUTES
from recserve.engine.interface import InferenceEngine
from recserve.loadgen.closed import closed_loop_inflight
from recserve.loadgen.synthetic import QueryFactory
from recserve.models import build_model, load_model, save_model
from recserve.polling import default_busy_poll_us
from recserve.runtime import resolve_device
from recserve.server.client import (
    GRPCClient,
    HTTPClient,
    InferError,
    batch_tensors,
    grpc_infer_bytes,
    http_infer_body,
)
from recserve.server.echo import EchoServer, grpc_echo_call
from recserve.server.local_engine import LocalEngine
from recserve.server.metrics import numeric_stats
from recserve.server.proc_stats import (
    children,
    cpu_by_process,
    cpu_roles,
    role_cpu,
    rss,
)
from recserve.server.repository import ENGINES, default_frontends, rec_engine_config
from recserve.server.settings import ServingConfig
from recserve.types import Batch, validate_batch

SOAK_HEADROOM_S = 0.1
"""The soak's client threads cover this much latency per query at the soak's rate."""

READY_LINE = re.compile(r"HTTP on (\S+):(\d+), gRPC on (\S+):(\d+)")


@dataclass
class BenchOptions:
    models: tuple[str, ...] = ("wnd", "dlrm-rmc2")
    preset: str = "paper"
    batch: int = 256
    iters: int = 200
    warmup: int = 20
    latency_model: str = "wnd"
    """Model of the saturation and soak runs."""
    concurrency: int = 8
    """Closed-loop callers of the soak's thread pools (``4 *`` this) and the server's queue
    bound (``64 *`` this)."""
    saturation_levels: tuple[int, ...] = (8, 32, 64)
    """Concurrent closed-loop callers tried at saturation, on each side alike; each side's
    saturation QPS is its best level (a closed loop with too few callers measures latency,
    not capacity: QPS = callers / latency)."""
    saturation_s: float = 15.0
    """Seconds per side at each level (in rounds that interleave the sides)."""
    soak_s: float = 600.0
    soak_load: float = 0.8
    soak_warmup_s: float = 60.0
    device: str = "auto"
    workers: int = 1
    engine: str = "local"
    """The engine behind the server and in-process alike: ``local`` (worker threads calling the
    model) or ``rec`` (the DeepRecSys engine: on a GPU, its runner process)."""
    frontends: int | None = None
    """Front-end processes of the server (None: ``min(4, cpu_count // 4)``, 0 on small
    machines); the in-process engine is the same either way."""
    intra_op_threads: int = 1
    """Torch threads per engine worker, in-process and in the server alike (and of both
    processes' other threads: validation, clients)."""
    busy_poll_us: int = field(default_factory=default_busy_poll_us)
    """Busy polling of the front ends and the rec engine (``recserve serve --busy-poll-us``),
    in-process and in the server alike."""
    busy_poll_max_outstanding: int = 1
    """... while at most this many answers are outstanding (``--busy-poll-max-outstanding``)."""
    max_inflight_batches: int | None = None
    """Engine calls in flight (the rec engine's GPU runner slots); None: the engine's default."""
    max_queue_delay_ms: float = 0.0
    """How long the oldest queued request may wait for others to join its batch."""
    seed: int = 0
    out: Path = Path("benchmarks/results")
    name: str = "bench_server"


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "n": len(ms),
    }


def timed(
    call: Callable[[Batch], Any], queries: list[Batch], iters: int, warmup: int
) -> list[float]:
    for i in range(warmup):
        call(queries[i % len(queries)])
    samples = []
    for i in range(iters):
        start = time.perf_counter()
        call(queries[i % len(queries)])
        samples.append(time.perf_counter() - start)
    return samples


def closed_loop(
    make_call: Callable[[], Callable[[Batch], Any]],
    queries: list[Batch],
    threads: int,
    seconds: float,
) -> dict[str, Any]:
    """``threads`` callers, each issuing queries back to back for ``seconds``; QPS and errors."""
    stop = time.perf_counter() + seconds
    counts, errors = [0] * threads, [0] * threads

    def loop(k: int) -> None:
        call = make_call()
        i = k
        while time.perf_counter() < stop:
            try:
                call(queries[i % len(queries)])
                counts[k] += 1
            except InferError:
                errors[k] += 1
            i += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(loop, range(threads)))
    elapsed = time.perf_counter() - start
    return {
        "qps": sum(counts) / elapsed,
        "queries": sum(counts),
        "errors": sum(errors),
        "seconds": elapsed,
        "threads": threads,
    }


def closed_loop_processes(
    proto: str,
    url: str,
    model: str,
    config: ModelConfig,
    queries: list[Batch],
    callers: int,
    seconds: float,
    processes: int | None = None,
    window_open: threading.Event | None = None,
) -> dict[str, Any]:
    """Like :func:`closed_loop` over the network: ``callers`` clients spread over ``processes``
    client processes (default: one each, at most half the machine's cores), each caller a thread
    with its own connection, so the clients' encoding does not share one GIL and limit the load
    they offer. Processes start, connect and send one query before the timed window opens;
    ``window_open`` is set when it does (for a profiler that must see the load)."""
    if processes is None:
        processes = max(1, min(callers, (os.cpu_count() or 2) // 2))
    processes = min(processes, callers)
    shares = [callers // processes + (k < callers % processes) for k in range(processes)]
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    first = 0
    for k in range(processes):
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_client_process,
            args=(proto, url, model, config, queries, first, shares[k], child),
            daemon=True,
        )
        first += shares[k]
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        for conn in pipes:
            if not conn.poll(120) or conn.recv() != "ready":
                raise RuntimeError("a client process failed to start")
        start = time.time() + 0.2
        for conn in pipes:
            conn.send((start, seconds))
        if window_open is not None:
            time.sleep(max(0.0, start - time.time()))
            window_open.set()
        results = [conn.recv() for conn in pipes]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
    done = sum(r[0] for r in results)
    return {
        "qps": done / seconds,
        "queries": done,
        "errors": sum(r[1] for r in results),
        "seconds": seconds,
        "threads": callers,
        "client_processes": processes,
        "client_cpu_s": [r[2] for r in results],
    }


def _client_process(
    proto: str,
    url: str,
    model: str,
    config: ModelConfig,
    queries: list[Batch],
    first: int,
    threads: int,
    conn: Any,
) -> None:
    torch.set_num_threads(1)
    clients = [HTTPClient(url) if proto == "http" else GRPCClient(url) for _ in range(threads)]
    # Each query is encoded once, as Triton's perf_analyzer prepares its inputs once: the
    # clients share the server's cores, and encoding again per call only takes them away.
    bodies = [http_infer_body(q, config) for q in queries] if proto == "http" else []
    wires = [grpc_infer_bytes(model, q, config) for q in queries] if proto == "grpc" else []

    def send(client: HTTPClient | GRPCClient, i: int) -> None:
        if isinstance(client, HTTPClient):
            client.infer_encoded(model, bodies[i % len(bodies)])
        else:
            client.infer_encoded(wires[i % len(wires)])

    for k, client in enumerate(clients):
        send(client, first + k)
    conn.send("ready")
    start, seconds = conn.recv()
    stop = start + seconds
    counts = [[0, 0] for _ in clients]
    cpu_start = time.process_time()

    def loop(k: int) -> None:
        client, i = clients[k], first + k
        while time.time() < start:
            time.sleep(0.001)
        while time.time() < stop:
            try:
                send(client, i)
                counts[k][0] += 1
            except InferError:
                counts[k][1] += 1
            i += threads
        client.close()

    workers = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    cpu_s = time.process_time() - cpu_start
    conn.send((sum(c[0] for c in counts), sum(c[1] for c in counts), cpu_s))


def resolve_frontends(opts: BenchOptions) -> int:
    """As asked, else what ``recserve serve`` starts by default for this engine and device."""
    if opts.frontends is not None:
        return opts.frontends
    return default_frontends(opts.engine, opts.device)


def inflight_batches(opts: BenchOptions) -> int:
    """Engine calls the batcher keeps in flight: as given, else the runner's slots for ``rec``,
    else the server's default."""
    if opts.max_inflight_batches is not None:
        return opts.max_inflight_batches
    if opts.engine == "rec":
        return EngineConfig().gpu_max_inflight
    return ServingConfig().max_inflight_batches


def in_process_engine(model: torch.nn.Module, opts: BenchOptions) -> InferenceEngine:
    """The engine the server runs, built the same way in this process."""
    if opts.engine == "local":
        return LocalEngine(model, workers=opts.workers, intra_op_threads=opts.intra_op_threads)
    serving = ServingConfig(
        device=opts.device,
        workers=opts.workers,
        intra_op_threads=opts.intra_op_threads,
        max_items=max(4096, opts.batch),
        max_inflight_batches=inflight_batches(opts),
        max_queue_delay_ms=opts.max_queue_delay_ms,
        busy_poll_us=opts.busy_poll_us,
        busy_poll_max_outstanding=opts.busy_poll_max_outstanding,
    )
    if opts.engine == "rec":  # the engine itself, here (the server runs it in a process of its own)
        return RecEngine(model.cpu(), rec_engine_config(serving))
    return ENGINES[opts.engine](model, serving)


class ServerProcess:
    """``python -m recserve.server`` on ephemeral loopback ports."""

    def __init__(self, repository: Path, opts: BenchOptions) -> None:
        cmd = [
            sys.executable, "-m", "recserve.server", "--repository", str(repository),
            "--http-port", "0", "--grpc-port", "0", "--device", opts.device,
            "--workers", str(opts.workers), "--max-body-mb", "512",
            "--max-items", str(max(4096, opts.batch)), "--max-queue", str(64 * opts.concurrency),
            "--log-level", "WARNING", "--intra-op-threads", str(opts.intra_op_threads),
            "--frontends", str(resolve_frontends(opts)),
            "--torch-threads", str(opts.intra_op_threads),
            "--engine", opts.engine, "--max-inflight-batches", str(inflight_batches(opts)),
            "--busy-poll-us", str(opts.busy_poll_us),
            "--busy-poll-max-outstanding", str(opts.busy_poll_max_outstanding),
            "--max-queue-delay-ms", str(opts.max_queue_delay_ms),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 600
        for line in self.proc.stdout:
            match = READY_LINE.search(line)
            if match:
                self.http_url = f"{match[1]}:{match[2]}"
                self.grpc_url = f"{match[3]}:{match[4]}"
                break
            if time.monotonic() > deadline:
                break
        else:
            raise RuntimeError(f"server exited with {self.proc.wait()} before it was ready")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    def rss_bytes(self) -> int:
        """Resident memory of the server process and its children (front ends)."""
        return sum(rss(pid) for pid in [self.proc.pid, *children(self.proc.pid)])

    def stop(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(120)
        return {"returncode": rc, "shutdown_s": time.perf_counter() - start}


def soak(
    server: ServerProcess,
    config: ModelConfig,
    model: str,
    queries: list[Batch],
    qps: float,
    seconds: float,
    warmup_s: float,
    threads: int,
    seed: int,
    processes: int = 4,
) -> dict[str, Any]:
    """Open-loop Poisson arrivals at ``qps`` (HTTP and gRPC alternating), latency from each
    query's scheduled arrival, the server's memory sampled every second. Arrivals come from
    ``processes`` client processes at ``qps / processes`` each (together a Poisson stream at
    ``qps``), so the clients' own GIL does not hold the offered load back."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    # enough client threads that a query never waits for one (open loop): at least the
    # queries in flight when each takes SOAK_HEADROOM_S
    per_process = max(1, threads // processes, math.ceil(qps / processes * SOAK_HEADROOM_S))
    for k in range(processes):
        parent, child = ctx.Pipe()
        args = (server.http_url, server.grpc_url, model, config, queries, qps / processes,
                per_process, seed + k, k, child)  # fmt: skip
        proc = ctx.Process(target=_soak_process, args=args, daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        for conn in pipes:
            if not conn.poll(120) or conn.recv() != "ready":
                raise RuntimeError("a soak client process failed to start")
        begin = time.time() + 0.2
        for conn in pipes:
            conn.send((begin, seconds))
        while time.time() < begin:
            time.sleep(0.001)
        start = time.perf_counter()
        rss: list[tuple[float, int]] = []
        while (now := time.perf_counter()) < start + seconds:
            rss.append((now - start, server.rss_bytes()))
            time.sleep(max(0.0, start + len(rss) - time.perf_counter()))
        results = [conn.recv() for conn in pipes]
        elapsed = time.perf_counter() - start
        rss.append((elapsed, server.rss_bytes()))
    finally:
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.terminate()
    latencies = [x for r in results for x in r["latencies"]]
    failures = [x for r in results for x in r["failures"]]
    after_warmup = next(r for t, r in rss if t >= min(warmup_s, seconds / 2))
    growth = (rss[-1][1] - after_warmup) / after_warmup
    return {
        "target_qps": qps,
        "achieved_qps": len(latencies) / elapsed,
        "seconds": seconds,
        "warmup_s": min(warmup_s, seconds / 2),
        "queries": sum(r["issued"] for r in results),
        "client_processes": processes,
        "client_threads": processes * per_process,
        "failures": len(failures),
        "failure_examples": failures[:5],
        "latency": percentiles(latencies) if latencies else {},
        "rss_after_warmup_bytes": after_warmup,
        "rss_end_bytes": rss[-1][1],
        "rss_growth_frac": growth,
        "rss_samples": [[round(t, 1), r] for t, r in rss],
    }


def _soak_process(
    http_url: str,
    grpc_url: str,
    model: str,
    config: ModelConfig,
    queries: list[Batch],
    qps: float,
    threads: int,
    seed: int,
    k: int,
    conn: Any,
) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    local = threading.local()
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def issue(i: int, arrival: float) -> None:
        if not hasattr(local, "clients"):
            local.clients = (HTTPClient(http_url), GRPCClient(grpc_url))
        try:
            local.clients[i % 2].infer(model, config, queries[i % len(queries)])
            with lock:
                latencies.append(time.perf_counter() - arrival)
        except (InferError, OSError) as e:
            with lock:
                failures.append(type(e).__name__ + ": " + str(e)[:100])

    conn.send("ready")
    begin, seconds = conn.recv()
    while time.time() < begin:
        time.sleep(0.001)
    start = time.perf_counter()
    arrival, i = start, k
    with ThreadPoolExecutor(threads) as pool:
        while arrival < start + seconds:
            now = time.perf_counter()
            if arrival > now:
                time.sleep(min(arrival - now, 0.05))
                continue
            pool.submit(issue, i, arrival)
            i += 1
            arrival += rng.exponential(1.0 / qps)
    conn.send({"latencies": latencies, "failures": failures, "issued": i - k})


def run_bench(opts: BenchOptions) -> tuple[Path, dict[str, Any]]:
    """Run the three measurements; write and return the result (``summary`` first)."""
    device = resolve_device(opts.device)
    load_before, speed_before = os.getloadavg(), machine_speed()
    torch.set_num_threads(opts.intra_op_threads)
    with tempfile.TemporaryDirectory(prefix="recserve-bench-") as tmp:
        repo = Path(tmp)
        queries: dict[str, list[Batch]] = {}
        engines: dict[str, InferenceEngine] = {}
        for k, name in enumerate(opts.models):
            save_model(build_model(name, opts.preset, seed=opts.seed + k), repo / name)
            # the DeepRecSys engine places the model itself (its runner process loads it)
            model = load_model(repo / name, device=device if opts.engine == "local" else "cpu")
            factory = QueryFactory(model.config, seed=opts.seed + k)
            queries[name] = [factory.make(opts.batch) for _ in range(4)]
            engines[name] = in_process_engine(model, opts)
        server = ServerProcess(repo, opts)
        try:
            with EchoServer(512 << 20) as echo:  # as the server ("--max-body-mb 512")
                latency = {
                    n: measure_latency(engines[n], server, n, queries[n], opts, echo)
                    for n in opts.models
                }
            saturation = measure_saturation(engines[opts.latency_model], server, opts.latency_model,
                                            queries[opts.latency_model], opts)  # fmt: skip
            config = engines[opts.latency_model].config
            for engine in engines.values():
                engine.close()
            soak_qps = opts.soak_load * min(saturation["http"]["qps"], saturation["grpc"]["qps"])
            soak_result = soak(server, config, opts.latency_model, queries[opts.latency_model],
                               soak_qps, opts.soak_s, opts.soak_warmup_s, 4 * opts.concurrency,
                               opts.seed)  # fmt: skip
        finally:
            for engine in engines.values():
                engine.close()
            shutdown = server.stop()
    notes = [
        "latency and saturation interleave in-process and server runs in rounds, so load from "
        "other processes falls on both alike",
    ]
    if opts.soak_s < 600:
        notes.append(f"short soak: {opts.soak_s:g} s (the target names 10 minutes)")
    if device.type == "cpu":
        notes.append("CPU only: client, server and engine share the machine's cores")
    body = {
        "options": {**asdict(opts), "out": str(opts.out), "device": str(device),
                    "frontends": resolve_frontends(opts)},
        "latency": latency,
        "saturation": saturation,
        "soak": soak_result,
        "shutdown": shutdown,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "speed_before": speed_before, "speed_after": machine_speed()},
        "notes": notes,
    }  # fmt: skip
    summary = summarize(latency, saturation, soak_result)
    path = write_result(opts.out, opts.name, summary, body, device=device_label(device))
    return path, {"summary": summary, **body}


def measure_latency(engine: InferenceEngine, server: ServerProcess, name: str, queries: list[Batch],
                    opts: BenchOptions, echo: EchoServer, rounds: int = 5) -> dict[str, Any]:  # fmt: skip
    """Sequential queries: in-process, HTTP and gRPC (and each with its inputs in shared
    memory), and the echo server's floor for each protocol, interleaved in ``rounds``."""
    config = engine.config
    http, grpc_client = HTTPClient(server.http_url), GRPCClient(server.grpc_url)
    # HTTP with the inputs in system shared memory (the client writes each query there)
    room = max(sum(d.nbytes + 64 for *_, d in batch_tensors(q, config)) for q in queries)
    http_shm = HTTPClient(server.http_url, shared_memory_bytes=room)
    grpc_shm = GRPCClient(server.grpc_url, shared_memory_bytes=room)
    # the same requests, encoded by the same client code, to a bare echo server on the
    # front ends' protocol stacks: the round trip no server on them can beat
    echo_http = HTTPClient(echo.http_url)
    echo_grpc, echo_channel = grpc_echo_call(echo.grpc_url)
    calls: dict[str, Callable[[Batch], Any]] = {
        "inprocess": lambda b: engine.submit(b).result(),
        "http": lambda b: http.infer(name, config, b),
        "grpc": lambda b: grpc_client.infer(name, config, b),
        "http_shm": lambda b: http_shm.infer(name, config, b),
        "grpc_shm": lambda b: grpc_shm.infer(name, config, b),
        "http_floor": lambda b: echo_http.post("/echo", *http_infer_body(b, config)),
        "grpc_floor": lambda b: echo_grpc(grpc_infer_bytes(name, b, config)),
    }
    remote = ("http", "grpc", "http_shm", "grpc_shm")
    expected = engine.submit(queries[0]).result().numpy()
    diffs = {p: float(np.abs(calls[p](queries[0]) - expected).max()) for p in remote}
    samples: dict[str, list[float]] = {p: [] for p in calls}
    per_round = max(1, opts.iters // rounds)
    for r in range(rounds):
        for proto, call in calls.items():
            samples[proto] += timed(call, queries, per_round, opts.warmup if r == 0 else 2)
    for client in (http, grpc_client, http_shm, grpc_shm, echo_http, echo_channel):
        client.close()
    checks = timed(lambda b: validate_batch(b, config), queries, per_round, 2)
    result: dict[str, Any] = {p: percentiles(v) for p, v in samples.items()}
    base = result["inprocess"]["p50_ms"]
    for proto in remote:
        result[proto]["overhead_ms"] = result[proto]["p50_ms"] - base
        result[proto]["overhead_frac"] = result[proto]["overhead_ms"] / base
        result[proto]["max_abs_diff_vs_inprocess"] = diffs[proto]
    for proto in ("http_floor", "grpc_floor"):  # a round trip that does no model work at all
        result[proto]["overhead_frac"] = result[proto]["p50_ms"] / base
    q = queries[0]
    result["ids_per_query"] = int(q.sparse.values.numel())
    result["request_bytes"] = int(
        q.dense.numel() * 4 + (q.sparse.values.numel() + q.sparse.offsets.numel()) * 8
    )
    result["validate_p50_ms"] = percentiles(checks)["p50_ms"]
    return result


def measure_saturation(engine: InferenceEngine, server: ServerProcess, name: str,
                       queries: list[Batch], opts: BenchOptions, rounds: int = 2) -> dict[str, Any]:  # fmt: skip
    """Closed-loop QPS at each of ``opts.saturation_levels`` concurrent callers: in-process,
    HTTP, gRPC, interleaved in ``rounds`` at each level. Each side's saturation QPS is its best
    level. The in-process engine is driven two ways, and the better one counts: a blocking
    caller thread per query in flight, and one thread keeping as many in flight
    (:func:`~recserve.loadgen.closed.closed_loop_inflight`), which spares the engine's
    process a thread wake-up per answer."""
    config = engine.config
    urls = {"http": server.http_url, "grpc": server.grpc_url}
    seconds = opts.saturation_s / rounds
    levels: list[dict[str, Any]] = []
    here = os.getpid()
    drivers: dict[str, Callable[[int], dict[str, Any]]] = {
        "inprocess_threads": lambda n: closed_loop(
            lambda: lambda b: engine.submit(b).result(), queries, n, seconds
        ),
        "inprocess_inflight": lambda n: closed_loop_inflight(engine.submit, queries, n, seconds),
    }
    for callers in opts.saturation_levels:
        sides = (*drivers, "http", "grpc")
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in sides}
        cpu: dict[str, list[dict[str, dict[str, float]]]] = {p: [] for p in sides}
        for _ in range(rounds):
            for side, drive in drivers.items():
                before = cpu_by_process(here, skip=server.proc.pid)
                counts = gpu_counts(engine.stats()) if isinstance(engine, RecEngine) else None
                run = drive(callers)
                if counts is not None:
                    run["engine"] = _delta(counts, gpu_counts(engine.stats()))
                roles = cpu_roles(before, cpu_by_process(here, skip=server.proc.pid),
                                  run["seconds"], run["queries"])  # fmt: skip
                roles["callers_and_engine"] = roles.pop("root")  # this process: callers too
                runs[side].append(run)
                cpu[side].append(roles)
            for proto, url in urls.items():  # clients in processes: the load is not GIL-bound
                before = cpu_by_process(server.proc.pid)
                counts = server_gpu_counts(server, name)
                run = closed_loop_processes(proto, url, name, config, queries, callers, seconds)
                run["engine"] = _delta(counts, server_gpu_counts(server, name))
                roles = cpu_roles(before, cpu_by_process(server.proc.pid), run["seconds"],
                                  run["queries"])  # fmt: skip
                roles["server"] = roles.pop("root")
                roles["clients"] = role_cpu(run["client_cpu_s"], run["seconds"], run["queries"])
                runs[proto].append(run)
                cpu[proto].append(roles)
        level: dict[str, Any] = {"callers": callers}
        for proto, parts in runs.items():
            elapsed = sum(p["seconds"] for p in parts)
            done = sum(p["queries"] for p in parts)
            level[proto] = {"qps": done / elapsed, "queries": done, "seconds": elapsed,
                            "errors": sum(p["errors"] for p in parts),
                            "cpu": _merge_cpu(cpu[proto], elapsed, done)}  # fmt: skip
            if all("engine" in p for p in parts):  # the engine's batches: joins, and how
                total = {k: sum(p["engine"][k] for p in parts) for k in _GPU_COUNTS}
                level[proto]["engine"] = _per_batch(total)
        driver = max(drivers, key=lambda side: level[side]["qps"])
        level["inprocess"] = {**level[driver], "driver": driver.removeprefix("inprocess_")}
        levels.append(level)
    result: dict[str, Any] = {"model": name, "levels": levels}
    for proto in ("inprocess", "http", "grpc"):
        best = max(levels, key=lambda lv: lv[proto]["qps"])
        result[proto] = {**best[proto], "callers": best["callers"]}
    for proto in ("http", "grpc"):
        result[proto]["vs_inprocess"] = result[proto]["qps"] / result["inprocess"]["qps"]
    return result


_GPU_COUNTS = (
    "completed",
    "gpu_batches",
    "gpu_queries",
    *(f"gpu_batches_by_input_{r}" for r in INPUT_ROUTES),
    "gpu_runner_host_s",
    "gpu_runner_device_wait_s",
)


def gpu_counts(stats: Mapping[str, Any]) -> dict[str, float]:
    """An engine's counters of answered queries and GPU batches (batches, queries, batches by
    how the runner read their inputs) from its ``stats()``."""
    flat = dict(numeric_stats(stats))
    return {k: flat.get(k, 0.0) for k in _GPU_COUNTS}


def server_gpu_counts(server: ServerProcess, model: str) -> dict[str, float]:
    """The same counters of the server's engine for ``model``, scraped from ``/metrics``."""
    url = server.http_url if "://" in server.http_url else f"http://{server.http_url}"
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    except OSError:
        return dict.fromkeys(_GPU_COUNTS, 0.0)
    label = re.escape(f'{{model="{model}"}}')
    out = {}
    for k in _GPU_COUNTS:
        match = re.search(rf"^recserve_engine_{k}{label} (\S+)$", text, re.M)
        out[k] = float(match[1]) if match else 0.0
    return out


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return _per_batch({k: after[k] - before[k] for k in before})


def _per_batch(counts: dict[str, float]) -> dict[str, float]:
    """``counts`` with what they imply per GPU batch: queries, and the runner's host time and
    wait for the device in milliseconds."""
    batches = max(counts["gpu_batches"], 1.0)
    return {
        **counts,
        "queries_per_batch": counts["gpu_queries"] / batches,
        "runner_host_ms_per_batch": counts["gpu_runner_host_s"] / batches * 1e3,
        "runner_device_wait_ms_per_batch": counts["gpu_runner_device_wait_s"] / batches * 1e3,
    }


def _merge_cpu(
    parts: list[dict[str, dict[str, float]]], seconds: float, queries: int
) -> dict[str, dict[str, float]]:
    """Rounds' :func:`cpu_roles` joined into one over their total time and queries."""
    out: dict[str, dict[str, float]] = {}
    for part in parts:
        for role, r in part.items():
            o = out.setdefault(role, {"cpu_s": 0.0, "processes": r["processes"], "busiest": 0.0})
            o["cpu_s"] += r["cpu_s"]
            o["busiest"] = max(o["busiest"], r["busiest"])
    for o in out.values():
        o["busy"] = o["cpu_s"] / seconds
        o["us_per_query"] = o["cpu_s"] / max(queries, 1) * 1e6
    return out


def summarize(
    latency: dict[str, Any], saturation: dict[str, Any], soak_result: dict[str, Any]
) -> dict[str, Any]:
    def get(model: str, proto: str, key: str) -> float | None:
        return latency.get(model, {}).get(proto, {}).get(key)

    return {
        "http_p50_overhead_ms_wnd256": get("wnd", "http", "overhead_ms"),
        "grpc_p50_overhead_ms_wnd256": get("wnd", "grpc", "overhead_ms"),
        "http_overhead_frac_rmc2_256": get("dlrm-rmc2", "http", "overhead_frac"),
        "grpc_overhead_frac_rmc2_256": get("dlrm-rmc2", "grpc", "overhead_frac"),
        "server_vs_inprocess_qps_frac": min(
            saturation["http"]["vs_inprocess"], saturation["grpc"]["vs_inprocess"]
        ),
        "soak_memory_growth_frac": soak_result["rss_growth_frac"],
        # not target keys: the same over HTTP with the inputs in system shared memory
        "http_shm_p50_overhead_ms_wnd256": get("wnd", "http_shm", "overhead_ms"),
        "http_shm_overhead_frac_rmc2_256": get("dlrm-rmc2", "http_shm", "overhead_frac"),
        "grpc_shm_p50_overhead_ms_wnd256": get("wnd", "grpc_shm", "overhead_ms"),
        "grpc_shm_overhead_frac_rmc2_256": get("dlrm-rmc2", "grpc_shm", "overhead_frac"),
        # not target keys: the protocol's floor, the same request to a bare echo server
        "http_floor_p50_ms_wnd256": get("wnd", "http_floor", "p50_ms"),
        "grpc_floor_p50_ms_wnd256": get("wnd", "grpc_floor", "p50_ms"),
        "http_floor_frac_rmc2_256": get("dlrm-rmc2", "http_floor", "overhead_frac"),
        "grpc_floor_frac_rmc2_256": get("dlrm-rmc2", "grpc_floor", "overhead_frac"),
    }
