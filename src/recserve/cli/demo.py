"""``recserve demo``: every model, synthetic queries, one readable table.

Without a GPU it runs the ``small`` preset on the CPU (well under a minute); with a GPU it runs
the ``paper`` shapes there.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import MODEL_NAMES, PRESETS, build_model
from recserve.runtime import resolve_device, time_queries
from recserve.types import validate_batch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run every model on synthetic queries and summarise")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument(
        "--preset", choices=PRESETS, default=None, help="default: paper on a GPU, small on the CPU"
    )
    p.add_argument("--batch", type=int, default=None, help="default: 1024 on a GPU, 128 on the CPU")
    p.add_argument("--iters", type=int, default=None, help="timed queries per model")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("paper" if gpu else "small")
    batch = args.batch or (1024 if gpu else 128)
    iters = args.iters or (50 if gpu else 10)
    console = Console()
    where = torch.cuda.get_device_name(device) if gpu else "CPU"
    console.print(
        f"recserve demo: {len(args.models)} models, {preset} preset, batch {batch}, on {where}"
    )
    table = Table(title="Synthetic queries (zipf 1.05 ids), one query at a time")
    for col in ("model", "tables", "embeddings", "p50 ms", "p95 ms", "items/s", "mean score"):
        table.add_column(col, justify="left" if col == "model" else "right")
    start = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("models", total=len(args.models) * iters)
        for name in args.models:
            progress.update(task, description=f"{name}: building")
            model = build_model(name, preset, device=device, seed=0)
            queries = QueryFactory(model.config, "zipf:1.05", seed=0)
            batches = [queries.make(batch) for _ in range(min(iters, 4))]
            for b in batches:
                validate_batch(b, model.config)
            progress.update(task, description=f"{name}: running")
            stats = time_queries(
                model,
                [batches[i % len(batches)] for i in range(iters)],
                device,
                warmup=2,
                on_step=lambda: progress.advance(task),
            )
            with torch.inference_mode():
                score = float(model(batches[0].to(device)).mean())
            table.add_row(
                name,
                str(len(model.config.tables)),
                f"{model.config.embedding_bytes / 1e6:,.1f} MB",
                f"{stats.p50:.2f}",
                f"{stats.p95:.2f}",
                f"{stats.items_per_s:,.0f}",
                f"{score:.4f}",
            )
            del model
            if gpu:
                torch.cuda.empty_cache()
    console.print(table)
    console.print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
