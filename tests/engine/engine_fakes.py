"""Models for engine tests; importable by spawned workers (pytest puts this folder on sys.path)."""

from __future__ import annotations

import time

import torch
from torch import nn

from recserve.types import Batch


class Slow(nn.Module):
    """Runs ``inner`` after sleeping ``delay`` seconds per call."""

    def __init__(self, inner: nn.Module, delay: float) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.delay = delay

    def forward(self, batch: Batch) -> torch.Tensor:
        time.sleep(self.delay)
        return self.inner(batch)


class FailOnSize(nn.Module):
    """Runs ``inner``, except that a (sub-)batch of exactly ``size`` items raises."""

    def __init__(self, inner: nn.Module, size: int) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.size = size

    def forward(self, batch: Batch) -> torch.Tensor:
        if batch.batch_size == self.size:
            raise ValueError(f"refusing {self.size} items")
        return self.inner(batch)
