"""Helpers shared by the storage tests (Triton kernels run interpreted on the CPU)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from recserve.config import TableConfig
from recserve.types import KeyedJagged


def random_batch(
    tables: tuple[TableConfig, ...],
    batch: int,
    max_len: int,
    seed: int,
    weighted: bool = False,
    hot: int = 0,
) -> KeyedJagged:
    """Jagged ids for ``tables`` (empty bags included); ``hot`` > 0 draws ids from the first
    ``hot`` rows half of the time (repeats, for dedup and cache paths)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (len(tables) * batch,), generator=g)
    ids = []
    for i, t in enumerate(tables):
        n = int(lengths[i * batch : (i + 1) * batch].sum())
        v = torch.randint(0, t.num_rows, (n,), generator=g)
        if hot:
            h = torch.randint(0, min(hot, t.num_rows), (n,), generator=g)
            v = torch.where(torch.rand(n, generator=g) < 0.5, h, v)
        if n:
            v[0] = t.num_rows - 1  # the last row
        ids.append(v)
    values = torch.cat(ids)
    psw = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJagged.from_lengths([t.name for t in tables], values, lengths, psw)


@pytest.fixture
def batch_of() -> Callable[..., KeyedJagged]:
    return random_batch


@pytest.fixture
def seed() -> int:
    """Fresh inputs on every run (printed by pytest on failure through the test id)."""
    return int.from_bytes(os.urandom(2), "little")
