"""How long a thread that wakes from a blocking call waits for the interpreter lock while
another thread of its process keeps running Python, for each switch interval.

This is the GPU runner process's shape (:mod:`recserve.engine.gpu_process`): a launching
thread busy with each batch's host work, whose reads of the next request never block under
load, and a completing thread that waits for the device with the lock released
(``cudaEventSynchronize``) and then needs the lock to send the reply. CPython hands the lock
to a waiting thread only when the holder blocks for real or when the switch interval
(``sys.setswitchinterval``, 5 ms by default) forces it: a read that returns at once gives
the lock back to the thread that released it. Here the completer blocks in a pipe read that
another process wakes every ``--gap-ms``; the probe records how long after each wake-up the
completer runs, with the launcher doing ``--work-us`` of Python between reads.

    PYTHONPATH=src python benchmarks/probe_gil_handoff.py --out benchmarks/results

Writes ``<out>/<device>/probe_gil_handoff.json`` (``summary`` first).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from recserve.bench.common import write_result


def _wake(fd: int, n: int, gap_s: float) -> None:
    for _ in range(n):
        time.sleep(gap_s)
        os.write(fd, struct.pack("<q", time.monotonic_ns()))


def probe(interval_s: float, work_us: float, n: int, gap_s: float) -> dict[str, float]:
    """Delays (µs) from each wake-up to the completer running, past the first tenth."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    a, b = socket.socketpair()
    b.sendall(b"x" * 64)
    stop = threading.Event()

    def launcher() -> None:
        while not stop.is_set():
            a.recv(8, socket.MSG_PEEK)  # data is there: the call returns at once
            began = time.perf_counter()
            while time.perf_counter() - began < work_us * 1e-6:
                pass  # host work, holding the lock

    r, w = os.pipe()
    waker = mp.get_context("fork").Process(target=_wake, args=(w, n, gap_s))
    waker.start()
    thread = threading.Thread(target=launcher, daemon=True)
    thread.start()
    delays = []
    try:
        for _ in range(n):
            stamp = struct.unpack("<q", os.read(r, 8))[0]
            delays.append((time.monotonic_ns() - stamp) / 1e3)
    finally:
        stop.set()
        thread.join()
        waker.join()
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
        sys.setswitchinterval(before)
    d = np.array(delays[n // 10 :])
    return {"p50_us": float(np.median(d)), "p95_us": float(np.percentile(d, 95)),
            "max_us": float(d.max())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals-us", type=float, nargs="+", default=[5000, 500, 100])
    parser.add_argument("--work-us", type=float, nargs="+", default=[300, 1000])
    parser.add_argument("--gap-ms", type=float, default=2.0)
    parser.add_argument("-n", type=int, default=300, help="wake-ups per case")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for work in [0.0, *args.work_us]:
        for interval in args.intervals_us if work else [args.intervals_us[0]]:
            r = probe(interval * 1e-6, work, args.n, args.gap_ms * 1e-3)
            rows.append({"work_us": work, "switch_interval_us": interval, **r})
            print(f"launcher work {work:6.0f} us, switch interval {interval:6.0f} us: the "
                  f"completer runs {r['p50_us']:10.0f} us (p50), {r['p95_us']:10.0f} us (p95) "
                  "after its wake-up", flush=True)  # fmt: skip
    summary = {
        f"p50_us_work{r['work_us']:.0f}_interval{r['switch_interval_us']:.0f}": r["p50_us"]
        for r in rows
    }
    body = {"gap_ms": args.gap_ms, "n": args.n, "cpu_count": os.cpu_count(), "rows": rows}
    path = write_result(args.out, "probe_gil_handoff", summary, body)  # this host
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
