"""DeepRecSched vs static schedules on every model (``recserve bench serve``), as a script.

On the GPU machine, from the repository root (about 8 minutes, a reduced sweep: see REDUCED
in recserve/cli/bench_serve.py and the ``reduced`` list in the JSON):

    PYTHONPATH=src python benchmarks/bench_serve.py

On a CPU-only machine, a small end-to-end check (two small models, one worker, the batch
runner on the CPU as a stand-in for the GPU):

    PYTHONPATH=src python benchmarks/bench_serve.py --quick

Writes benchmarks/results/<device>/bench_serve[_quick].json (``summary`` first) and .png.
"""

from __future__ import annotations

import sys

from recserve.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "serve", *sys.argv[1:]]))
