"""``recserve tune``: DeepRecSched's search for the schedule with the most QPS under a target."""

from __future__ import annotations

import argparse
import json

import torch
from rich.console import Console
from rich.table import Table

from recserve.engine import EngineConfig, RecEngine
from recserve.engine.config import SchedConfig, default_cpu_workers
from recserve.engine.deeprecsched import (
    GPU_CAPS,
    ProbePlan,
    default_grids,
    engine_measure,
    saturation_qps,
)
from recserve.engine.tuner import Grids, LoadSearch, TuneResult, hill_climb
from recserve.loadgen.driver import QueryPool
from recserve.loadgen.metrics import LatencyTarget
from recserve.loadgen.sizes import QuerySizes
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import MODEL_NAMES, PRESETS, build_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="hill-climb the sub-batch size b and GPU threshold T under a tail-latency target",
        description="DeepRecSched: climb b (CPU sub-batch size), then T (GPU offload threshold), "
        "the GPU coalescing cap and the coalescing delay (with --workers 0: only the cap and "
        "the delay), finding each configuration's sustainable load by "
        "adjusting the offered QPS; print the chosen schedule, its latency-bounded QPS and the "
        "curve climbed.",
    )
    p.add_argument("--model", choices=MODEL_NAMES, required=True)
    p.add_argument(
        "--preset", choices=PRESETS, default=None, help="default: paper on a GPU, small on the CPU"
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply every table's rows")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--p95", help="p95 latency target, e.g. 10ms")
    target.add_argument("--p99", help="p99 latency target, e.g. 60ms")
    p.add_argument(
        "--sizes",
        default="production",
        help="lognormal[:MU,SIGMA], production, mlperf, fixed:N, file:PATH",
    )
    p.add_argument(
        "--ids", default="zipf:1.05", help="uniform, zipf:<alpha>, one-item, trace:<file>"
    )
    p.add_argument(
        "--workers", type=int, default=default_cpu_workers(), help="CPU worker processes"
    )
    p.add_argument(
        "--device", default="auto", help="GPU runner: auto, cuda, cpu (a stand-in) or none"
    )
    p.add_argument("--probe-seconds", type=float, default=0.5, help="arrivals per load probe (s)")
    p.add_argument("--min-queries", type=int, default=200, help="fewest queries per load probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    target = LatencyTarget.parse(args.p95, 95) if args.p95 else LatencyTarget.parse(args.p99, 99)
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    preset = args.preset or ("paper" if cuda else "small")
    model = build_model(args.model, preset, args.scale, seed=args.seed)
    factory = QueryFactory(model.config, args.ids, seed=args.seed)
    pool = QueryPool(factory, QuerySizes.parse(args.sizes), seed=args.seed)
    console = Console(stderr=args.json)
    config = EngineConfig(cpu_workers=args.workers, device=args.device, queue_capacity=512)
    with RecEngine(model, config) as engine:
        has_gpu = engine.device is not None
        base = SchedConfig()
        if args.workers == 0:  # GPU only: every query goes to the runner; tune its joining
            base = SchedConfig(sub_batch_size=None, gpu_threshold=0)
            grids = Grids(
                sub_batch_size=(),
                gpu_max_batch=GPU_CAPS,
                gpu_max_delay=(0.0, 0.5e-3, 1e-3, 2e-3),
            )
        else:
            grids = default_grids(config.max_query_items, gpu=has_gpu)
        plan = ProbePlan(seconds=args.probe_seconds, min_queries=args.min_queries, seed=args.seed)
        whole = base.with_(sub_batch_size=None)
        start = 0.5 * saturation_qps(engine, pool, whole, seconds=0.5)
        console.print(
            f"tuning {args.model} ({preset}) for {target} with {args.workers} CPU workers"
            f"{' + GPU runner on ' + str(engine.device) if has_gpu else ''}; start at {start:.0f} QPS"
        )
        measure = engine_measure(engine, pool, plan, target)
        result = hill_climb(measure, target, base, grids, start, LoadSearch(rel_tol=0.05))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_result(console, result)
    return 0


def print_result(console: Console, result: TuneResult) -> None:
    table = Table(title=f"DeepRecSched hill climb ({result.target})")
    for col in ("configuration", "latency-bounded QPS", "probes", "queries"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for c in result.climbed:
        mark = " <- chosen" if c is result.best else ""
        table.add_row(c.config.label() + mark, f"{c.qps:.1f}", str(len(c.probes)), str(c.queries))
    console.print(table)
    console.print(
        f"chosen: [bold]{result.best.config.label()}[/bold] at [bold]{result.best.qps:.1f} QPS[/bold] "
        f"({result.probes} probes, {result.queries} queries, {result.seconds:.1f} s)"
    )
