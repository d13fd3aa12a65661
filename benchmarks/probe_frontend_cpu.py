"""Where the server's CPU goes at saturation, process by process, with py-spy.

``bench server`` reports CPU per query by process role. This probe says what each role does
with it: it starts the server as ``bench server`` does (rec engine, N front ends), keeps a
closed loop of callers on one protocol, and records one front end, the engine process and
the GPU runner with py-spy (``--threads``, idle samples left out) for a few seconds. For each
it prints the most-sampled lines (self) and functions on the stack (inclusive), and the CPU
per query of every role over the same window.

    PYTHONPATH=src python benchmarks/probe_frontend_cpu.py --proto grpc --frontends 8 \\
        --callers 64 --device cuda --seconds 6 > fe-grpc.txt

Needs ``py-spy`` on the PATH. ``--device cpu --preset small`` checks the script on any machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from recserve.bench.pyspy import top_frames
from recserve.loadgen.synthetic import QueryFactory
from recserve.models import build_model, load_model, save_model
from recserve.procname import process_name
from recserve.server.bench import BenchOptions, ServerProcess, closed_loop_processes
from recserve.server.proc_stats import children, cpu_by_process, cpu_roles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proto", choices=("http", "grpc"), default="grpc")
    p.add_argument("--model", default="wnd")
    p.add_argument("--preset", default="paper")
    p.add_argument("--device", default="cuda")
    p.add_argument("--frontends", type=int, default=8)
    p.add_argument("--callers", type=int, default=64)
    p.add_argument("--seconds", type=int, default=6)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--native", action="store_true", help="py-spy --native: C and Cython frames too")
    p.add_argument("--out", default=tempfile.gettempdir(), help="folder for the raw profiles")
    args = p.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not on the PATH")
    torch.set_num_threads(1)
    opts = BenchOptions(
        models=(args.model,), preset=args.preset, device=args.device, engine="rec",
        frontends=args.frontends,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="recserve-probe-") as tmp:
        repo = Path(tmp)
        save_model(build_model(args.model, args.preset, seed=0), repo / args.model)
        model = load_model(repo / args.model, device="cpu")
        queries = [QueryFactory(model.config, seed=1).make(256) for _ in range(4)]
        server = ServerProcess(repo, opts)
        try:
            url = server.http_url if args.proto == "http" else server.grpc_url
            # Warm up at the full caller count: front ends grow their staging regions, and the
            # runner registers each new one, on first use.
            closed_loop_processes(
                args.proto, url, args.model, model.config, queries, args.callers, 3.0
            )
            below = [server.proc.pid]
            pids: list[int] = []
            while below:
                pid = below.pop()
                pids.append(pid)
                below += children(pid)
            names = {pid: process_name(pid) for pid in pids}
            picks = {}
            for role, prefix in (("front end", "recserve-fe"), ("engine", "recserve-engine"),
                                 ("GPU runner", "recserve-gpu")):  # fmt: skip
                found = sorted(pid for pid, name in names.items() if name.startswith(prefix))
                if found:
                    picks[role] = found[0]
            profiles = {
                role: f"{args.out}/probe-{args.proto}-{pid}.raw" for role, pid in picks.items()
            }
            result: dict[str, object] = {}
            window_open = threading.Event()

            def load() -> None:
                result.update(
                    closed_loop_processes(
                        args.proto, url, args.model, model.config, queries, args.callers,
                        args.seconds + 2.0, window_open=window_open,
                    )
                )  # fmt: skip

            loader = threading.Thread(target=load)
            loader.start()
            # Client processes take seconds to start; profile only once their load is on.
            if not window_open.wait(180):
                raise SystemExit("the callers did not start within 180 s")
            time.sleep(0.5)
            before = cpu_by_process(server.proc.pid)
            began = time.perf_counter()
            spies = []
            for role, path in profiles.items():
                cmd = ["py-spy", "record", "-p", str(picks[role]), "-d", str(args.seconds),
                       "-r", "250", "--format", "raw", "-o", path, "--threads",
                       *(["--native"] if args.native else ["--nonblocking"])]  # fmt: skip
                out = subprocess.DEVNULL
                spies.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
            for spy in spies:
                spy.wait()
            seconds = time.perf_counter() - began
            after = cpu_by_process(server.proc.pid)
            loader.join()
        finally:
            server.stop()
    qps = float(result.get("queries", 0)) / max(float(result.get("seconds", 1.0)), 1e-9)
    queries_in_window = int(qps * seconds)
    print(f"{args.proto}, {args.frontends} front ends, {args.callers} callers: {qps:.0f} QPS")
    for role, r in sorted(cpu_roles(before, after, seconds, queries_in_window).items()):
        print(f"  {role:11s} {r['us_per_query']:7.0f} us/query  {r['busy']:5.2f} cores  "
              f"busiest {r['busiest']:.2f}")  # fmt: skip
    for role, path in profiles.items():
        print(f"== {role} (pid {picks[role]})")
        if os.path.exists(path):
            print("\n".join(top_frames(path, args.top, skip_outer=10, indent="  ")))
        else:
            print("  no profile written")


if __name__ == "__main__":
    main()
