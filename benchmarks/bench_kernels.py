"""Pooled-lookup kernels vs PyTorch embedding_bag and FBGEMM TBE (issue 3).

Same as ``recserve bench kernels``; run on the GPU machine from the repository root:

    PYTHONPATH=src python benchmarks/bench_kernels.py --mode full --out $OUT

Focused runs take some cases of the plan and tune chosen buckets again, e.g. the Zipf cases of
one table set with their skewed buckets re-tuned:

    PYTHONPATH=src python benchmarks/bench_kernels.py --out $OUT --tune-candidates 0 \\
        --no-ablation --cases '4x1048kx128/fp32/*/L80/zipf:*' --retune '*-h?'

``--cases`` (shell patterns on case names, ``tables/dtype/B<batch>/L<pooling>/<ids>``) and
``--retune`` (shell patterns on bucket keys) may be repeated. A focused run also times each
case with the config it started from (``recserve_before``), checks the configs it tuned
against the reference, prints a table of its cases and writes ``kernels-retuned.json`` (only
the buckets tuned in the run, in the format of ``src/recserve/kernels/configs/*.json``).

See ``python benchmarks/bench_kernels.py --help`` and benchmarks/NOTES-kernels.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from recserve.cli.bench_kernels import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument(
        "--cases",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only the plan's cases whose name matches (shell pattern; repeatable)",
    )
    parser.add_argument(
        "--retune",
        action="append",
        default=[],
        metavar="PATTERN",
        help="tune these buckets again where the selected cases hit them (shell pattern on "
        "bucket keys, e.g. '*-h?'; repeatable)",
    )
    args = parser.parse_args(argv)
    if not args.cases and not args.retune:
        return run(args)
    return run_focused(args)


def run_focused(args: argparse.Namespace) -> int:
    """The benchmark with ``--cases``/``--retune``: 0 when every device check passed."""
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from recserve.kernels.bench.report import config_name
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
        device=args.device,
        commit=args.commit,
        seed=args.seed,
        checks=not args.no_checks,
        ablation=not args.no_ablation,
        cases=tuple(args.cases),
        retune=tuple(args.retune),
    )
    result = run_bench(opts)
    for row in result["tuning"]:
        was = config_name(row["before"]["config"]) if row["before"] else "heuristic"
        times = ", ".join(f"{name} {us:.1f}us" for name, us in row["case_us"].items())
        gains = " ".join(f"{k}={v:.2f}" for k, v in row["gains"].items())
        print(f"tuned {row['bucket']}: {config_name(row['config'])} (was {was}) | {times}")
        print(f"    lever gains alone: {gains}")
    summary = result["summary"]
    for key in ("min_speedup_vs_fbgemm", "geomean_speedup_vs_fbgemm", "min_speedup_vs_torch"):
        value = summary.get(key)
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    failed = [c["name"] for c in result["checks"] if not c["ok"]]
    print(f"device checks: {len(result['checks']) - len(failed)} ok, {len(failed)} failed")
    if failed:
        print(f"FAILED: {failed[:5]}")
    print(f"wrote {opts.out / 'kernels.json'} and {opts.out / 'kernels-retuned.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
