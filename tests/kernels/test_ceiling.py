"""The random-row-read ceiling kernel against its reference."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import rel_err

from recserve.kernels.ceiling import hashed_ids, random_rows
from recserve.kernels.reference import random_rows_reference

pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize("width", [12, 32])
@pytest.mark.parametrize("hashed", [False, True])
def test_random_rows(width: int, hashed: bool, gen: torch.Generator) -> None:
    table = torch.randn(64, width, generator=gen)
    ids = None if hashed else torch.randint(0, 64, (128,), generator=gen)
    out = random_rows(table, width, ids, 128, per_prog=32, rows=8, seed=5)
    used = hashed_ids(128, 64, 5) if hashed else ids
    assert rel_err(out[:, :width], random_rows_reference(table, used, 32)) < 1e-5


def test_hashed_ids_are_spread() -> None:
    ids = hashed_ids(1 << 14, 1 << 10)
    assert ids.min() >= 0 and ids.max() < 1 << 10
    assert torch.unique(ids).numel() > 900
