"""KServe server overhead vs the in-process engine (``recserve bench server``), as a script.

On the GPU machine, from the repository root (paper-sized wnd and dlrm-rmc2, 10-minute soak):

    PYTHONPATH=src python benchmarks/bench_server.py

On a CPU-only machine, a reduced run (small preset, short saturation runs, 30 s soak):

    PYTHONPATH=src python benchmarks/bench_server.py --quick [--soak-s 120]

Writes benchmarks/results/<device>/bench_server[_quick].json (``summary`` first).
"""

from __future__ import annotations

import sys

from recserve.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "server", *sys.argv[1:]]))
