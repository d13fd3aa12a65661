#!/bin/sh
# The test suite. Without a GPU: one pytest run, Triton kernels interpreted on the CPU.
# With a GPU: the same run with the GPU hidden (what CI runs), then the GPU tests with the
# kernels compiled. One process cannot do both: Triton is interpreted or compiled per process.
set -eu
PY=${PY:-.venv/bin/python}
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "== CPU tests (GPU hidden, Triton interpreted)"
    CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 "$PY" -m pytest -q "$@"
    echo "== GPU tests (Triton compiled)"
    TRITON_INTERPRET=0 "$PY" -m pytest -q -m gpu "$@"
else
    "$PY" -m pytest -q "$@"
fi
