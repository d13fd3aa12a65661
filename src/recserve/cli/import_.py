"""``recserve import``: a facebookresearch/dlrm or TorchRec checkpoint → a recserve model folder."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from recserve.importers import FORMATS, import_checkpoint, max_difference
from recserve.models import save_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="import a facebookresearch/dlrm or TorchRec DLRM checkpoint",
        description="Read a checkpoint (.safetensors, or .pt/.pth through PyTorch's restricted "
        "weights-only unpickler), check that recserve's predictions match the source model's, "
        "and write a recserve model folder (config.json + model.safetensors).",
    )
    p.add_argument("checkpoint", help="the checkpoint file")
    p.add_argument("out", help="the model folder to write")
    p.add_argument("--format", choices=FORMATS, default="auto", help="source layout")
    p.add_argument(
        "--interaction",
        choices=("dot", "cat"),
        default=None,
        help="dlrm: the interaction, when the top MLP's width fits both",
    )
    p.add_argument(
        "--features",
        default=None,
        help="TorchRec: FEATURE:TABLE,... in SparseArch order (for tables read by several features)",
    )
    p.add_argument("--tables", default=None, help="TorchRec: table names in order, comma-separated")
    p.add_argument("--name", default=None, help="model name (default: the file's stem)")
    p.add_argument(
        "--atol",
        type=float,
        default=1e-5,
        help="largest accepted difference between recserve's and the source model's probabilities",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _features(text: str | None) -> list[tuple[str, str]] | None:
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        feature, sep, table = item.partition(":")
        if not sep or not feature or not table:
            raise ValueError(f"--features: expected FEATURE:TABLE, got {item!r}")
        pairs.append((feature, table))
    return pairs


def run(args: argparse.Namespace) -> int:
    result = import_checkpoint(
        args.checkpoint,
        format=args.format,
        interaction=args.interaction,
        features=_features(args.features),
        tables=args.tables.split(",") if args.tables else None,
        name=args.name,
    )
    diff = max_difference(result)
    config = result.model.config
    summary = {
        "checkpoint": args.checkpoint,
        "format": result.source_format,
        "model": config.name,
        "tables": len(config.tables),
        "interaction": config.interaction,
        "max_abs_diff": diff,
        "notes": result.notes,
        "folder": None,
    }
    if diff > args.atol:
        raise ValueError(
            f"recserve's predictions differ from the source model's by {diff:.3g} "
            f"(more than --atol {args.atol:g}); nothing written"
        )
    summary["folder"] = str(save_model(result.model, args.out))
    if args.json:
        print(json.dumps(summary))
        return 0
    console = Console()
    console.print(
        f"[bold]{config.name}[/] from {result.source_format} checkpoint {args.checkpoint}: "
        f"{len(config.tables)} tables, {config.interaction} interaction, "
        f"bottom {'-'.join(map(str, config.bottom_mlp))}, top {'-'.join(map(str, config.top_mlp))}"
    )
    for note in result.notes:
        console.print(f"  {note}")
    console.print(f"  predictions match the source model's: max |Δp| = {diff:.2e}")
    console.print(f"  written to {summary['folder']}")
    return 0
