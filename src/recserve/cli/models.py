"""``recserve models``: the registered models and their shapes."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from recserve.models.registry import MODEL_NAMES, PRESETS, get_config, parameter_counts


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models with their tables, rows, dims and sizes")
    p.add_argument("--preset", choices=PRESETS, default="paper")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every table's rows")
    p.add_argument("--interaction", choices=("cat", "dot"), default="cat", help="DLRM interaction")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def describe(name: str, preset: str, scale: float, interaction: str) -> dict:
    cfg = get_config(name, preset, scale, interaction=interaction)
    counts = parameter_counts(cfg)
    rows = sorted({t.num_rows for t in cfg.tables}, reverse=True)
    groups: dict[int, int] = {}
    for t in cfg.tables:
        groups[t.num_rows] = groups.get(t.num_rows, 0) + 1
    return {
        "name": name,
        "family": cfg.family,
        "tables": len(cfg.tables),
        "rows": rows,
        "table_rows": {str(r): n for r, n in groups.items()},
        "dims": sorted({t.dim for t in cfg.tables}),
        "pooling": sorted({t.lookups for t in cfg.tables if t.pooled}),
        "sequences": {s.name: s.max_len for s in cfg.sequences},
        "num_dense": cfg.num_dense,
        "bottom_mlp": list(cfg.bottom_mlp),
        "top_mlp": list(cfg.top_mlp),
        "tasks": cfg.num_tasks,
        "parameters": counts["embedding_parameters"] + counts["dense_parameters"],
        "dense_parameters": counts["dense_parameters"],
        "embedding_bytes": counts["embedding_bytes"],
        "bytes": counts["embedding_bytes"] + counts["dense_bytes"],
    }


def _count(n: int) -> str:
    for div, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{suffix}"
    return f"{n:,}"


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} P{unit}"


def run(args: argparse.Namespace) -> int:
    rows = [describe(n, args.preset, args.scale, args.interaction) for n in MODEL_NAMES]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"recserve models ({args.preset} preset, scale {args.scale:g})")
    for col in ("model", "tables × rows", "dim", "L", "bottom | top MLP", "params", "bytes"):
        table.add_column(col, justify="right" if col in ("params", "bytes") else "left")
    for r in rows:
        shape = " + ".join(f"{n}×{_count(int(rows_))}" for rows_, n in r["table_rows"].items())
        mlps = "-".join(map(str, r["bottom_mlp"])) or "-"
        mlps += " | " + "-".join(map(str, r["top_mlp"]))
        pooling = ",".join(map(str, r["pooling"]))
        if r["sequences"]:
            pooling += "+seq" + ",".join(map(str, r["sequences"].values()))
        table.add_row(
            r["name"],
            shape,
            ",".join(map(str, r["dims"])),
            pooling,
            mlps,
            _human(r["parameters"], ""),
            _human(r["bytes"]),
        )
    Console().print(table)
    return 0
