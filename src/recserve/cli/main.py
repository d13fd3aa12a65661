"""The ``recserve`` console script: one thin module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

# Subcommands: module under recserve.cli, each with add_parser(subparsers) and run(args).
_COMMANDS = ("models", "run", "demo", "tune", "serve", "plan", "train", "import_")
# `recserve bench <what>`: modules that add a sub-subcommand to the bench group.
_BENCHES = ("bench_kernels", "bench_tiers", "bench_serve", "bench_server", "bench_e2e")


def _present(module: str) -> bool:
    return importlib.util.find_spec(f"recserve.cli.{module}") is not None


def _register(sub: argparse._SubParsersAction, module: str, command: str) -> None:
    """Add one subcommand; if an optional dependency of it is missing, add a stand-in that
    says which, so the other subcommands keep working."""
    try:
        importlib.import_module(f"recserve.cli.{module}").add_parser(sub)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] == "recserve":
            raise
        missing = err.name

        def unavailable(args: argparse.Namespace) -> int:
            print(
                f"recserve {command}: needs the Python package {missing!r}, which is not "
                "installed (pip install 'recserve[server,kernels]')",
                file=sys.stderr,
            )
            return 2

        p = sub.add_parser(command, help=f"(unavailable: {missing} is not installed)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=unavailable)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recserve",
        description="Serve recommendation models (DLRM, Wide&Deep, NCF, DIN, DIEN) at the "
        "highest throughput a tail-latency target allows.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        if _present(name):
            _register(sub, name, name.rstrip("_"))
    benches = [b for b in _BENCHES if _present(b)]
    if benches:
        bench = sub.add_parser("bench", help="benchmarks against ceilings and peers")
        bench_sub = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
        for name in benches:
            _register(bench_sub, name, name.removeprefix("bench_"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"recserve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
