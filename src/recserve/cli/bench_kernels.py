"""``recserve bench kernels``: the pooled-lookup kernel benchmark (issue 3).

Measures the ceilings (HBM copy, random-row reads per row size), checks every kernel variant
against its reference on the GPU, times recserve against ``torch.nn.functional.embedding_bag``
and FBGEMM's TBE over the sweep, measures each lever, and writes ``kernels.json`` (with its
``summary``), ``kernels-roofline.png`` and ``kernels-tuned.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=("full", "quick", "probe", "smoke"),
        default="full",
        help="full: issue 3's sweep; quick: a small sweep; probe: every tile candidate on "
        "representative shapes; smoke: tiny cases (runs on CPU with --device cpu)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: benchmarks/results/<device>)",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="stop starting new table sets after this"
    )
    parser.add_argument(
        "--table-gb", type=float, default=2.0, help="bytes of each sweep table set, in GiB"
    )
    parser.add_argument("--no-fbgemm", action="store_true", help="do not time FBGEMM's TBE")
    parser.add_argument("--no-tune", action="store_true", help="use shipped/heuristic configs only")
    parser.add_argument(
        "--tune-candidates", type=int, default=40, help="tile candidates per bucket (0: all)"
    )
    parser.add_argument(
        "--no-tune-levers",
        action="store_true",
        help="tune tiles only (not maxnreg, num_stages, cache hints, program order)",
    )
    parser.add_argument(
        "--tuned", type=Path, default=None, help="tuned configs to start from (JSON)"
    )
    parser.add_argument(
        "--no-checks", action="store_true", help="skip the on-device correctness checks"
    )
    parser.add_argument("--no-ablation", action="store_true", help="skip the per-lever ablation")
    parser.add_argument(
        "--workers", type=int, default=min(12, os.cpu_count() or 1), help="compile processes"
    )
    parser.add_argument(
        "--commit", default="", help="commit to record (default: git rev-parse HEAD)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ids",
        choices=("int32", "int64"),
        default="int32",
        help="dtype of the ids recserve and PyTorch read (int32 where every table's rows "
        "fit, as FBGEMM's inference TBE reads them; FBGEMM's training TBE always gets "
        "int64); offsets stay int64",
    )
    parser.add_argument(
        "--cases",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only the plan's cases whose name matches (shell pattern on "
        "tables/dtype/B<batch>/L<pooling>/<ids>; repeatable)",
    )
    parser.add_argument(
        "--retune",
        action="append",
        default=[],
        metavar="PATTERN",
        help="tune these buckets again where the selected cases hit them (shell pattern on "
        "bucket keys, e.g. '*-h?'; repeatable); writes kernels-retuned.json",
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``kernels`` under ``recserve bench``; the parser's ``func`` is :func:`run`."""
    parser = subparsers.add_parser(
        "kernels",
        help="benchmark the pooled-lookup kernels against PyTorch and FBGEMM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments; 0 when every device check passed."""
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from recserve.kernels.bench.run import BenchOptions, default_out_dir
    from recserve.kernels.bench.run import run as run_bench

    opts = BenchOptions(
        out=args.out or default_out_dir(),
        mode=args.mode,
        fbgemm=not args.no_fbgemm,
        budget_s=args.budget_s,
        table_bytes=int(args.table_gb * (1 << 30)),
        tune=not args.no_tune,
        tune_candidates=args.tune_candidates,
        tune_levers=not args.no_tune_levers,
        tuner_path=args.tuned,
        workers=args.workers,
        ids=args.ids,
        device=args.device,
        commit=args.commit,
        seed=args.seed,
        checks=not args.no_checks,
        ablation=not args.no_ablation,
        cases=tuple(args.cases),
        retune=tuple(args.retune),
    )
    result = run_bench(opts)
    if args.cases or args.retune:
        _print_tuning(result)
    summary = result["summary"]
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:.3f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    failed = [c["name"] for c in result["checks"] if not c["ok"]]
    if failed:
        print(f"{len(failed)} device checks FAILED: {failed[:5]}")
    print(f"wrote {opts.out / 'kernels.json'}")
    return 1 if failed else 0


def _print_tuning(result: dict[str, Any]) -> None:
    """What a focused run re-tuned: each bucket's new config, the one it replaced, its cases."""
    from recserve.kernels.bench.report import config_name

    for row in result["tuning"]:
        was = config_name(row["before"]["config"]) if row.get("before") else "heuristic"
        times = ", ".join(f"{name} {us:.1f}us" for name, us in row.get("case_us", {}).items())
        gains = " ".join(f"{k}={v:.2f}" for k, v in row["gains"].items())
        print(f"tuned {row['bucket']}: {config_name(row['config'])} (was {was}) | {times}")
        print(f"    lever gains alone: {gains}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_kernels", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
