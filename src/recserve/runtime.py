"""Device selection and a plain timed loop over a model (what ``recserve run`` and ``demo`` use)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recserve.types import Batch


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when there is one, else CPU; anything else must be available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available on this machine")
    return dev


@dataclass
class LatencyStats:
    """Latencies of queries run one after another (closed loop)."""

    batch_size: int
    latencies_ms: np.ndarray

    @property
    def p50(self) -> float:
        return float(np.percentile(self.latencies_ms, 50))

    @property
    def p95(self) -> float:
        return float(np.percentile(self.latencies_ms, 95))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies_ms, 99))

    @property
    def items_per_s(self) -> float:
        return self.batch_size * 1e3 / float(np.mean(self.latencies_ms))

    def as_dict(self) -> dict[str, float]:
        return {
            "batch": self.batch_size,
            "p50_ms": self.p50,
            "p95_ms": self.p95,
            "p99_ms": self.p99,
            "items_per_s": self.items_per_s,
        }


@torch.inference_mode()
def time_queries(
    model: Callable[[Batch], torch.Tensor],
    batches: Sequence[Batch],
    device: torch.device,
    warmup: int = 3,
    on_step: Callable[[], None] | None = None,
    copy_inputs: bool = True,
) -> LatencyStats:
    """Run each host batch through ``model`` on ``device`` (copy in, forward, copy out) and
    time it from the host's point of view. The batches are cycled through for warm-up.

    ``copy_inputs=False`` hands ``model`` the host batch itself (for runners such as
    :class:`~recserve.pipeline.GPUPipeline` that stage their own copies)."""
    if not batches:
        raise ValueError("no batches to time")

    def prepare(batch: Batch) -> Batch:
        return batch.to(device, non_blocking=True) if copy_inputs else batch

    for i in range(warmup):
        model(prepare(batches[i % len(batches)])).cpu()
    latencies = []
    for batch in batches:
        start = time.perf_counter()
        model(prepare(batch)).cpu()
        latencies.append((time.perf_counter() - start) * 1e3)
        if on_step is not None:
            on_step()
    return LatencyStats(batches[0].batch_size, np.asarray(latencies))
