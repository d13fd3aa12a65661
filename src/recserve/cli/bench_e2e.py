"""``recserve bench e2e``: the GPU pipeline against PyTorch eager on every model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from rich.console import Console
from rich.table import Table

from recserve.bench.common import device_label, device_slug, write_result
from recserve.bench.e2e import BATCHES, bench_model, plot, summarise
from recserve.models import MODEL_NAMES


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    p.add_argument("--preset", default="paper")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--ids", default="zipf:1.05")
    p.add_argument("--out", default="benchmarks/results", help="results folder")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="KEY=SECONDS",
        help="extra summary figures measured elsewhere (e.g. demo_cpu_seconds=95)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("e2e", help="end to end vs PyTorch eager, every model (GPU)")
    _arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise ValueError("bench e2e needs a CUDA device")
    device = torch.device("cuda")
    console = Console()
    rows = []
    for name in args.models:
        rows += bench_model(
            name, args.batches, args.iters, args.preset, device, args.ids, log=console.print
        )
    summary = summarise(rows)
    for item in args.extra:
        key, _, value = item.partition("=")
        summary[key] = float(value)
    label = device_label(device)
    path = write_result(args.out, "e2e", summary, {"preset": args.preset, "rows": rows}, label)
    plot(rows, str(path.with_suffix(".png")))
    table = Table(title=f"end to end, {label}: items/s and speedup over PyTorch eager")
    for col in ("model", *map(str, args.batches)):
        table.add_column(col, justify="right")
    for name in args.models:
        cells = [
            f"{r['recserve_items_per_s']:,.0f} x{r['speedup']:.2f}"
            for r in rows
            if r["model"] == name
        ]
        table.add_row(name, *cells)
    console.print(table)
    console.print(summary)
    console.print(f"wrote {path} ({device_slug(label)})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    _arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
