"""``recserve bench tiers``: host tables read in place, dedup, the HBM cache, the CPU peer (issue 4).

Measures the host-to-device copy ceiling on one registered host arena (default 16 GiB), then per
id distribution and batch x pooling times the in-place and dedup paths, cache+host (a cache of
10% of the rows, pre-warmed, LFU and LRU against the static top-K oracle) and the CPU-mediated
peer (HugeCTR HPS-like), each checked against a float64 reference first. Writes ``tiers.json``
(starting with its ``summary``) and ``tiers.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    pairs = [x.split("x") for x in text.split(",") if x]
    return tuple((int(b), int(p)) for b, p in pairs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/<device>"
    )
    parser.add_argument("--host-gib", type=float, default=16.0, help="host arena (all tables)")
    parser.add_argument("--tables", type=int, default=8, help="tables sharing the arena")
    parser.add_argument("--row-bytes", type=int, default=256, help="row size of the main grid")
    parser.add_argument("--sweep-row-bytes", type=_ints, default=(64, 128, 512))
    parser.add_argument(
        "--sweep-cases",
        type=_shapes,
        default=((2048, 80), (16384, 20)),
        help="batch x pooling cases of the row-size sweep, e.g. 2048x80,16384x20",
    )
    parser.add_argument("--batches", type=_ints, default=(2048, 16384))
    parser.add_argument("--poolings", type=_ints, default=(1, 20, 80))
    parser.add_argument(
        "--dists", default="uniform,zipf:1.05,zipf:1.2", help="comma-separated id distributions"
    )
    parser.add_argument("--cache-frac", type=float, default=0.10, help="cache rows / all rows")
    parser.add_argument("--sets", type=int, default=3, help="input sets cycled while timing")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--hit-batches", type=int, default=12, help="batches of the hit-rate stream"
    )
    parser.add_argument(
        "--hit-shape", type=_ints, default=(16384, 20), help="batch,pooling of the hit-rate stream"
    )
    parser.add_argument(
        "--refresh-every",
        type=int,
        default=4,
        help="cache refresh period in batches: of the hit-rate stream, and the period over which "
        "one refresh's time is amortised in the *_incl_refresh speedups (0: never)",
    )
    parser.add_argument(
        "--prewarm-factor",
        type=float,
        default=1.0,
        help="pre-warm counts come from a sample of this many lookups per table row",
    )
    parser.add_argument(
        "--policies",
        default="lfu,lru",
        help="cache policies timed per case (comma-separated; empty: no cache+host variants)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU peer threads")
    parser.add_argument("--budget-s", type=float, default=390.0, help="stop starting cases after")
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument(
        "--host-alloc",
        default="register",
        help="register, register-4k, hostalloc or vmm (see benchmarks/probe_host_memory.py)",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--commit", default="", help="commit to record (default: git rev-parse)")
    parser.add_argument("--seed", type=int, default=0)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``tiers`` under ``recserve bench``."""
    parser = subparsers.add_parser(
        "tiers",
        help="benchmark host-memory tables: in place, dedup, cache+host, CPU-mediated",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when every correctness check on the device passed."""
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from recserve.storage.bench_tiers import TiersOptions, run_bench

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    slug = "-".join("".join(c.lower() if c.isalnum() else " " for c in name).split())
    out = args.out or Path("benchmarks") / "results" / slug
    opts = TiersOptions(
        out=out,
        host_gib=args.host_gib,
        tables=args.tables,
        row_bytes=args.row_bytes,
        sweep_row_bytes=args.sweep_row_bytes,
        sweep_cases=args.sweep_cases,
        dists=tuple(d for d in args.dists.split(",") if d),
        batches=args.batches,
        poolings=args.poolings,
        cache_frac=args.cache_frac,
        sets=args.sets,
        reps=args.reps,
        hit_batches=args.hit_batches,
        hit_shape=tuple(args.hit_shape),
        refresh_every=args.refresh_every,
        policies=tuple(p for p in args.policies.split(",") if p),
        prewarm_factor=args.prewarm_factor,
        threads=args.threads,
        device=args.device,
        commit=args.commit,
        seed=args.seed,
        budget_s=args.budget_s,
        tune=not args.no_tune,
        host_alloc=args.host_alloc,
    )
    result = run_bench(opts)
    from recserve.storage.bench_report import case_table

    print("\n".join(case_table(result)))
    summary = result["summary"]
    for key, value in summary.items():
        if key == "targets":
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else value
        print(f"{key:<48} {shown}")
    for key, t in summary["targets"].items():
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        print(f"target {key:<41} {value} (>= {t['target']}) {'met' if t['met'] else 'NOT met'}")
    print(f"wrote {out / 'tiers.json'}")
    bad = [v for c in result["cases"] for v in c["variants"].values() if not v["ok"]]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_tiers", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
