"""What the engine tracks per request: a query, its sub-batches, and their completions."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from recserve.types import Batch


@dataclass(eq=False)
class Query:
    """One accepted request of ``num_items`` items, answered when its last item is.

    ``batch`` is ``None`` in simulations (only sizes and times matter there). ``output`` is
    filled by completions, rows ``[start, stop)`` at a time.
    """

    id: int
    num_items: int
    arrival: float
    """Clock time at which the engine accepted the query (seconds)."""
    batch: Batch | None = None
    future: Future[torch.Tensor] | None = None
    output: torch.Tensor | None = None
    """``[B, num_tasks]`` float32, allocated when the first part answers."""
    remaining: int = -1
    """Items not answered yet."""
    finished: float | None = None
    """Clock time of the last answered item (or of the failure)."""
    error: BaseException | None = None
    on_finish: Callable[[Query], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.remaining < 0:
            self.remaining = self.num_items

    @property
    def done(self) -> bool:
        return self.finished is not None

    @property
    def latency(self) -> float:
        """Seconds from acceptance to the last answered item."""
        if self.finished is None:
            raise ValueError(f"query {self.id} has not finished")
        return self.finished - self.arrival


@dataclass(frozen=True)
class SubBatch:
    """Items ``[start, stop)`` of one query, run on one CPU worker."""

    query: Query
    start: int
    stop: int

    @property
    def num_items(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Completion:
    """Items ``[start, stop)`` of a query are answered with ``output [stop - start, tasks]``,
    or failed with ``error``."""

    query: Query
    start: int
    stop: int
    output: torch.Tensor | None = None
    error: BaseException | None = None
