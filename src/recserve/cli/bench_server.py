"""``recserve bench server``: the KServe front end's cost over the in-process engine.

p50 overhead of 256-item wnd and dlrm-rmc2 queries over HTTP and gRPC, saturation QPS against
the in-process engine, and a soak at 80% of capacity reporting the server's memory growth.
Writes ``<out>/<device>/bench_server[_quick].json`` with the ``summary`` first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from recserve.models.registry import PRESETS
from recserve.server.bench import BenchOptions, run_bench
from recserve.server.repository import resolve_engine

QUICK = {"preset": "small", "iters": 100, "warmup": 10, "concurrency": 4, "saturation_s": 4.0,
         "saturation_levels": (4, 16), "soak_s": 30.0, "soak_warmup_s": 10.0}  # fmt: skip
"""``--quick``: what runs on a 2-core CPU machine in about a minute and a half."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    d = BenchOptions()
    p = subparsers.add_parser(
        "server",
        help="KServe server overhead vs in-process, saturation QPS, soak memory",
        description=__doc__,
    )
    p.add_argument(
        "--quick", action="store_true", help=f"reduced run for a CPU machine: {json.dumps(QUICK)}"
    )
    p.add_argument("--models", nargs="+", default=list(d.models), help="latency models")
    p.add_argument(
        "--preset", choices=PRESETS, default=None, help="default: paper (small with --quick)"
    )
    p.add_argument("--batch", type=int, default=d.batch, help="items per query")
    p.add_argument("--iters", type=int, default=None, help=f"timed queries (default {d.iters})")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help=f"soak client threads (4x this) and server queue bound (64x this) "
        f"(default {d.concurrency})",
    )
    p.add_argument(
        "--saturation-levels",
        type=int,
        nargs="+",
        default=None,
        help="concurrent closed-loop callers tried at saturation, each side's best level counts "
        f"(default {' '.join(map(str, d.saturation_levels))})",
    )
    p.add_argument(
        "--saturation-s",
        type=float,
        default=None,
        help=f"seconds per saturation run (default {d.saturation_s:g})",
    )
    p.add_argument("--soak-s", type=float, default=None, help=f"soak length (default {d.soak_s:g})")
    p.add_argument(
        "--soak-warmup-s",
        type=float,
        default=None,
        help=f"soak warm-up before the reference memory reading (default {d.soak_warmup_s:g})",
    )
    p.add_argument(
        "--soak-load",
        type=float,
        default=d.soak_load,
        help="soak arrival rate as a fraction of saturation QPS",
    )
    p.add_argument("--device", default=d.device, help="cpu, cuda or auto")
    p.add_argument("--workers", type=int, default=d.workers, help="engine worker threads")
    p.add_argument(
        "--engine",
        choices=("auto", "local", "rec"),
        default="auto",
        help="engine behind the server and in-process alike: local (worker threads) or rec "
        "(the DeepRecSys engine; on a GPU, its runner process); auto (default): rec on a GPU, "
        "local on the CPU",
    )
    p.add_argument(
        "--frontends",
        type=int,
        default=None,
        help="server front-end processes (default: as recserve serve, one per two cores up to 8 "
        "with the rec engine on a GPU, else 0)",
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=d.intra_op_threads,
        help="torch threads per engine worker, in-process and in the server alike",
    )
    p.add_argument(
        "--busy-poll-us",
        type=int,
        default=d.busy_poll_us,
        help="busy polling of the front ends and the rec engine, in-process and in the server "
        "alike (recserve serve --busy-poll-us; default %(default)s; 0: off)",
    )
    p.add_argument(
        "--max-inflight-batches",
        type=int,
        default=d.max_inflight_batches,
        help="engine calls in flight (the rec engine's GPU runner slots), in-process and in the "
        "server alike (default: the engine's)",
    )
    p.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=d.max_queue_delay_ms,
        help="longest wait of a queued request for others to join its batch, in-process and in "
        "the server alike (default %(default)s)",
    )
    p.add_argument(
        "--busy-poll-max-outstanding",
        type=int,
        default=d.busy_poll_max_outstanding,
        help="poll only while at most this many answers are outstanding (default %(default)s; "
        "0: however many)",
    )
    p.add_argument("--out", type=Path, default=d.out, help="results folder")
    p.set_defaults(func=run)
    return p


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    fields: dict[str, Any] = dict(QUICK) if args.quick else {}
    for key in ("preset", "iters", "concurrency", "saturation_s", "soak_s", "soak_warmup_s"):
        value = getattr(args, key)
        if value is not None:
            fields[key] = value
    if args.saturation_levels is not None:
        if min(args.saturation_levels) < 1:
            raise SystemExit("--saturation-levels: each level must be >= 1")
        fields["saturation_levels"] = tuple(args.saturation_levels)
    return BenchOptions(
        models=tuple(args.models),
        batch=args.batch,
        soak_load=args.soak_load,
        device=args.device,
        workers=args.workers,
        engine=resolve_engine(args.engine, args.device),
        frontends=args.frontends,
        intra_op_threads=args.intra_op_threads,
        busy_poll_us=args.busy_poll_us,
        busy_poll_max_outstanding=args.busy_poll_max_outstanding,
        max_inflight_batches=args.max_inflight_batches,
        max_queue_delay_ms=args.max_queue_delay_ms,
        out=args.out,
        name="bench_server_quick" if args.quick else "bench_server",
        **fields,
    )


def run(args: argparse.Namespace) -> int:
    path, result = run_bench(options_from_args(args))
    print_report(result)
    json.dump(result["summary"], sys.stdout, indent=2)
    print(f"\nwrote {path}")
    return 0


SIDES = ("inprocess", "http", "grpc")
ROLES = ("clients", "server", "frontends", "callers_and_engine", "engine", "gpu_runner",
         "cpu_workers")  # fmt: skip


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    """The run at a glance: latency per model, QPS per caller level, CPU per query by process
    role at each side's best level, and the soak."""
    console = console or Console()
    latency = Table(title="p50 latency (ms) of one query at a time")
    for col in ("model", "in-process", "HTTP", "gRPC", "HTTP overhead", "gRPC overhead",
                "HTTP + shared memory overhead", "gRPC + shared memory overhead",
                "HTTP floor", "gRPC floor"):  # fmt: skip
        latency.add_column(col, justify="left" if col == "model" else "right")
    for model, r in result["latency"].items():
        cells = [f"{r[p]['p50_ms']:.2f}" for p in SIDES]
        cells += [
            f"{r[p]['overhead_ms']:+.2f} ({r[p]['overhead_frac']:+.0%})" if p in r else ""
            for p in (*SIDES[1:], "http_shm", "grpc_shm")
        ]
        cells += [f"{r[p]['p50_ms']:.2f}" if p in r else "" for p in ("http_floor", "grpc_floor")]
        latency.add_row(model, *cells)
    latency.caption = (
        "floor: the same requests, encoded by the same clients, to a bare echo server on the "
        "front ends' protocol stacks (aiohttp, grpc.aio)"
    )
    console.print(latency)
    sat = result["saturation"]
    qps = Table(title=f"{sat['model']}: closed-loop QPS by queries in flight")
    drivers = ("inprocess_threads", "inprocess_inflight")
    columns = ["in-process, a thread each", "in-process, one thread"]
    if not all(d in lv for lv in sat["levels"] for d in drivers):  # files before the second
        drivers, columns = ("inprocess",), ["in-process"]
    for col in ("in flight", *columns, "HTTP", "gRPC"):
        qps.add_column(col, justify="right")
    for level in sat["levels"]:
        sides = (*drivers, *SIDES[1:])
        qps.add_row(str(level["callers"]), *[f"{level[p]['qps']:.0f}" for p in sides])
    ratios = " / ".join(f"{sat[p]['vs_inprocess']:.2f}" for p in SIDES[1:])
    qps.caption = (
        f"server / in-process (the better driver) at each side's best level: {ratios} (HTTP / gRPC)"
    )
    console.print(qps)
    best_cpu = {
        p: next(lv for lv in sat["levels"] if lv["callers"] == sat[p]["callers"])[p].get("cpu", {})
        for p in SIDES
    }
    cpu = Table(title="CPU per query (µs) and cores busy, by process role, at each best level")
    cpu.add_column("role")
    for label in ("in-process", "HTTP", "gRPC"):
        cpu.add_column(f"{label} µs", justify="right")
        cpu.add_column("cores", justify="right")
    for role in ROLES:
        if not any(role in best_cpu[p] for p in SIDES):
            continue  # not in this run (or a file from before CPU was recorded)
        cells = []
        for p in SIDES:
            r = best_cpu[p].get(role)
            cells += ["", ""] if r is None else [f"{r['us_per_query']:.0f}", f"{r['busy']:.2f}"]
        cpu.add_row(role.replace("_", " "), *cells)
    if cpu.row_count:
        console.print(cpu)
    joins = []
    for p, label in zip(SIDES, ("in-process", "HTTP", "gRPC"), strict=True):
        level = next(lv for lv in sat["levels"] if lv["callers"] == sat[p]["callers"])[p]
        e = level.get("engine")
        if e and e["gpu_batches"]:
            device = e.get("gpu_batches_by_input_device_join", 0.0) / e["gpu_batches"]
            times = ""
            if "runner_host_ms_per_batch" in e:  # files from before it was recorded have none
                times = (
                    f", runner {e['runner_host_ms_per_batch']:.2f} ms host + "
                    f"{e['runner_device_wait_ms_per_batch']:.2f} ms waiting per batch"
                )
            joins.append(
                f"{label} {e['queries_per_batch']:.1f} queries/batch, {device:.0%} joined on the "
                f"device{times}"
            )
    if joins:  # files from before the engine's counts were recorded have none
        console.print("GPU batches at each best level: " + "; ".join(joins))
    soak = result["soak"]
    console.print(
        f"soak: {soak['seconds']:.0f} s at {soak['achieved_qps']:.0f} of "
        f"{soak['target_qps']:.0f} QPS, {soak['failures']} failures, memory "
        f"{soak['rss_growth_frac']:+.2%} after warm-up"
    )
    machine = result.get("machine", {})
    if "speed_before" in machine:  # files from before it was recorded have none
        a, b = machine["speed_before"], machine["speed_after"]
        console.print(
            f"host speed before / after: one-core copy {a['copy_gbps_one_core']:.1f} / "
            f"{b['copy_gbps_one_core']:.1f} GB/s, interpreter {a['python_ns_per_step']:.0f} / "
            f"{b['python_ns_per_step']:.0f} ns per loop step"
        )
