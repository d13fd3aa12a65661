"""``recserve run``: synthetic queries through one model, latency percentiles and throughput."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from recserve.config import load_model_config
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import MODEL_NAMES, PRESETS, build_model
from recserve.runtime import resolve_device, time_queries


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run synthetic queries through a model and time them")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", choices=MODEL_NAMES, help="a registered model")
    g.add_argument("--config", help="a model config file (.yaml/.json)")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="model size (default: paper on a GPU, small on the CPU)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply every table's rows")
    p.add_argument("--interaction", choices=("cat", "dot"), default="cat")
    p.add_argument("--batch", type=int, default=256, help="items per query")
    p.add_argument("--iters", type=int, default=50, help="timed queries")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--ids", default="zipf:1.05", help="uniform, zipf:<alpha>, one-item, trace:<file>"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch <= 0 or args.iters <= 0:
        raise ValueError("--batch and --iters must be positive")
    device = resolve_device(args.device)
    preset = args.preset or ("paper" if device.type == "cuda" else "small")
    if args.config:
        model = build_model(load_model_config(args.config), device=device, seed=args.seed)
    else:
        model = build_model(
            args.model,
            preset,
            args.scale,
            device=device,
            seed=args.seed,
            interaction=args.interaction,
        )
    queries = QueryFactory(model.config, args.ids, seed=args.seed)
    batches = [queries.make(args.batch) for _ in range(min(args.iters, 16))]
    batches = [batches[i % len(batches)] for i in range(args.iters)]
    stats = time_queries(model, batches, device, warmup=args.warmup)
    result = {
        "model": model.config.name,
        "preset": preset,
        "device": str(device),
        "ids": args.ids,
        **stats.as_dict(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        Console().print(
            f"[bold]{model.config.name}[/] ({preset}, {device}, batch {args.batch}, ids {args.ids}): "
            f"p50 {stats.p50:.3f} ms, p95 {stats.p95:.3f} ms, p99 {stats.p99:.3f} ms, "
            f"{stats.items_per_s:,.0f} items/s"
        )
    return 0
