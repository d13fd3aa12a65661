"""What one hand-off between processes or threads costs on this machine (round trips, µs).

The server's path for one request crosses several of them (client -> front end -> server
process -> engine thread -> GPU runner process, and back); this probe gives the floor each
costs, blocking (the waiter sleeps in the kernel) and spinning (the waiter polls), so the
latency overhead in ``bench_server.json`` can be read against it.

    python benchmarks/probe_wakeup.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing as mp
import os
import queue
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from recserve.bench.common import write_result


def _echo(sock: socket.socket, spin: bool) -> None:
    sock.setblocking(not spin)
    while True:
        try:
            data = sock.recv(64)
        except BlockingIOError:
            continue
        if not data or data == b"q":
            return
        sock.sendall(data)


def process_round_trip(n: int, spin: bool, idle_s: float = 0.0) -> list[float]:
    """Ping-pong one byte with a child process over a unix socket pair; with ``idle_s``, both
    sides sleep that long before each round trip (a sequential query's hand-offs find idle
    cores: waking one costs more than a back-to-back round trip shows)."""
    ours, theirs = socket.socketpair()
    child = mp.get_context("fork").Process(target=_echo, args=(theirs, spin), daemon=True)
    child.start()
    ours.setblocking(not spin)
    samples = []
    for _ in range(n):
        if idle_s:
            time.sleep(idle_s)
        start = time.perf_counter()
        ours.sendall(b"x")
        while True:
            try:
                ours.recv(64)
                break
            except BlockingIOError:
                continue
        samples.append(time.perf_counter() - start)
    ours.setblocking(True)
    ours.sendall(b"q")
    child.join(5)
    return samples


def thread_round_trip(n: int) -> list[float]:
    """Ping-pong through two queues with a second thread of this process."""
    ping: queue.SimpleQueue[int] = queue.SimpleQueue()
    pong: queue.SimpleQueue[int] = queue.SimpleQueue()

    def echo() -> None:
        while (x := ping.get()) >= 0:
            pong.put(x)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    samples = []
    for i in range(n):
        start = time.perf_counter()
        ping.put(i)
        pong.get()
        samples.append(time.perf_counter() - start)
    ping.put(-1)
    t.join()
    return samples


def event_loop_round_trip(n: int) -> list[float]:
    """A thread hands work to an asyncio loop (``call_soon_threadsafe``), which answers
    through a ``concurrent.futures.Future``: how the server's loop and the engine meet."""
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    samples = []
    for _ in range(n):
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        start = time.perf_counter()
        loop.call_soon_threadsafe(fut.set_result, 1)
        fut.result()
        samples.append(time.perf_counter() - start)
    loop.call_soon_threadsafe(loop.stop)
    t.join()
    loop.close()
    return samples


def stats(samples: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in samples)
    return {
        "p50_us": statistics.median(us),
        "p90_us": us[int(0.9 * len(us))],
        "mean_us": statistics.fmean(us),
        "n": len(us),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5000, help="round trips per case")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    cases: dict[str, Any] = {
        "process_blocking": stats(process_round_trip(args.n, spin=False)),
        "process_spinning": stats(process_round_trip(args.n, spin=True)),
        "thread_queue": stats(thread_round_trip(args.n)),
        "thread_to_event_loop": stats(event_loop_round_trip(args.n)),
    }
    for idle_ms in (0.5, 2.0, 10.0):  # fewer: each waits
        rounds = max(50, min(args.n, int(2.0 / (idle_ms / 1e3))))
        cases[f"process_blocking_after_{idle_ms:g}ms_idle"] = stats(
            process_round_trip(rounds, spin=False, idle_s=idle_ms / 1e3)
        )
    for name, c in cases.items():
        print(f"{name:22s} p50 {c['p50_us']:7.1f} us   p90 {c['p90_us']:7.1f} us")
    summary = {f"{k}_p50_us": v["p50_us"] for k, v in cases.items()}
    body = {"cases": cases, "machine": {"cpu_count": os.cpu_count()}}
    path = write_result(args.out, "probe_wakeup", summary, body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
