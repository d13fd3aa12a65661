"""Shared test setup: Triton kernels run in the interpreter on machines without CUDA.

One pytest process runs Triton either interpreted (``TRITON_INTERPRET=1``: kernels on CPU
tensors, the ``interpreter`` tests) or compiled (the ``gpu`` tests); the tests of the other
mode are skipped with the reason. ``make test`` on a GPU machine runs both, one after the
other (``scripts/test.sh``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from recserve.kernels.runtime import interpreter_enabled

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    interpreted = interpreter_enabled()
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA")
    elif interpreted:
        skip_gpu = pytest.mark.skip(reason="needs compiled kernels: TRITON_INTERPRET=0")
    else:
        skip_gpu = None
    skip_interpreter = pytest.mark.skip(reason="needs TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords and skip_gpu is not None:
            item.add_marker(skip_gpu)
        elif "interpreter" in item.keywords and not interpreted:
            item.add_marker(skip_interpreter)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
