"""``recserve plan``: place a model's tables in HBM, host+cache or host for a GPU memory budget."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from recserve.config import load_model_config
from recserve.models.registry import MODEL_NAMES, PRESETS, get_config
from recserve.storage.planner import TierSpeeds, parse_bytes, plan_placements, speeds_from_bench


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="place tables in HBM, host+cache or host for a GPU memory budget",
        description="Decide per table: HBM, host DRAM behind the shared HBM cache, or host "
        "DRAM; print the bytes, expected hit rates and estimated time behind each choice.",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", choices=MODEL_NAMES, help="a registered model")
    g.add_argument("--config", help="a model config file (.yaml/.json)")
    p.add_argument("--preset", choices=PRESETS, default="paper")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every table's rows")
    p.add_argument("--gpu-mem", required=True, help="HBM budget for embeddings, e.g. 40GiB or 8e9")
    p.add_argument(
        "--ids",
        default="uniform",
        help="access distribution of every table: uniform, zipf:<alpha>, one-item",
    )
    p.add_argument(
        "--table-ids",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="per-table distribution (repeatable), overrides --ids",
    )
    p.add_argument("--counts", help="per-row access counts: a .npz with one array per table name")
    p.add_argument("--batch", type=int, default=2048, help="items per batch for time estimates")
    p.add_argument("--speeds", help="a bench-tiers result JSON: use its measured cost rule")
    p.add_argument("--hbm-gbps", type=float, help="override the HBM lookup bandwidth")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.config:
        config = load_model_config(args.config)
    else:
        config = get_config(args.model, args.preset, args.scale)
    access: dict[str, object] = {t.name: args.ids for t in config.tables}
    for item in args.table_ids:
        name, sep, spec = item.partition("=")
        if not sep or name not in access:
            raise ValueError(f"--table-ids wants NAME=SPEC with a table of the model, got {item!r}")
        access[name] = spec
    if args.counts:
        path = Path(args.counts)
        if not path.is_file():
            raise FileNotFoundError(f"counts file {path} does not exist")
        with np.load(path) as counts:
            for name in counts.files:
                if name not in access:
                    raise ValueError(f"{path}: {name!r} is not a table of {config.name}")
                access[name] = counts[name]
    speeds = speeds_from_bench(args.speeds) if args.speeds else TierSpeeds()
    if args.hbm_gbps:
        speeds = TierSpeeds(args.hbm_gbps, speeds.host)
    plan = plan_placements(
        config.tables,
        parse_bytes(args.gpu_mem),
        access=access,  # type: ignore[arg-type]
        batch_size=args.batch,
        speeds=speeds,
    )
    if args.json:
        print(json.dumps({"model": config.name, **plan.to_dict()}, indent=2))
    else:
        print(f"{config.name} (scale {config.scale:g}): {len(config.tables)} tables")
        print(plan.format_table())
    return 0
