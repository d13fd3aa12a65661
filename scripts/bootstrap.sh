#!/bin/sh
# Create .venv with recserve installed editable, its extras and test tools.
# Torch: reuse one that is already importable (a GPU machine's CUDA build), else install the
# CPU build pinned to 2.13.0 (a bare `torch` requirement would pull a multi-GB CUDA build).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    if "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m venv --system-site-packages "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "installing the CPU build of torch 2.13.0"
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install --quiet -e ".[dev,server]"
"$VENV/bin/python" -c "import recserve, torch; print('recserve', recserve.__version__, 'with torch', torch.__version__)"
