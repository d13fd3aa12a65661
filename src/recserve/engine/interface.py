"""The contract between the serving engine and whatever submits requests to it (server, loadgen).

An engine accepts validated :class:`~recserve.types.Batch` requests and answers each with a
future holding ``[B, num_tasks]`` float32 probabilities on the CPU. It never loses a request:
it either accepts it (and later resolves or fails its future) or refuses it at once with
:class:`Overloaded` (queue full) or :class:`EngineClosed` (shutting down).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable

import torch

from recserve.config import ModelConfig
from recserve.types import Batch


class Overloaded(RuntimeError):
    """The request queue is full; the caller should retry later (HTTP 429/503, gRPC
    RESOURCE_EXHAUSTED)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503, gRPC UNAVAILABLE)."""


@runtime_checkable
class InferenceEngine(Protocol):
    """What a server or load generator needs from an engine."""

    config: ModelConfig

    def submit(self, batch: Batch) -> Future[torch.Tensor]:
        """Queue one request; raise :class:`Overloaded` or :class:`EngineClosed` if refused."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters and gauges (queue depth, requests, batches, items), for metrics."""
        ...

    def close(self, drain: bool = True) -> None:
        """Stop taking requests; with ``drain`` answer every accepted one first."""
        ...
