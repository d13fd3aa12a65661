"""Timing device work: CUDA events around many calls, median over repeats.

Two ways, for two questions. :func:`eager_us` times calls as Python issues them (launch costs
included, as a caller without graphs pays them). :func:`graph_us` captures the calls into a
CUDA graph and times replays (the serving path's cost: recserve's GPU runner replays graphs).
Neither flushes the L2 between calls: consecutive batches share hot rows in serving, so a flush
would understate what caching gives. Callers rotate among several input sets instead, so that
repeated calls do not re-read the same rows from L2.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


class _HostEvent:
    """Stand-in for a CUDA event on machines without one (CPU smoke runs): a host clock."""

    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _HostEvent) -> float:
        return (end.t - self.t) * 1e3


StreamSetup = Callable[[Any], Callable[[], None]]
"""Prepares a stream for timing (gets it, returns the cleanup)."""


def _events() -> tuple[Any, Any]:
    if not torch.cuda.is_available():
        return _HostEvent(), _HostEvent()
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def eager_us(
    calls: Sequence[Callable[[], object]],
    *,
    reps: int = 7,
    min_ms: float = 2.0,
    warmup: int = 2,
) -> float:
    """Median microseconds per call, cycling through ``calls`` (one per input set)."""
    for _ in range(warmup):
        for fn in calls:
            fn()
    _sync()
    start, end = _events()
    start.record()
    for fn in calls:
        fn()
    end.record()
    _sync()
    per_call_ms = max(start.elapsed_time(end) / len(calls), 1e-3)
    rounds = max(1, int(min_ms / (per_call_ms * len(calls))) + 1)
    samples = []
    for _ in range(reps):
        start.record()
        for _ in range(rounds):
            for fn in calls:
                fn()
        end.record()
        _sync()
        samples.append(start.elapsed_time(end) * 1e3 / (rounds * len(calls)))
    return statistics.median(samples)


def graph_us(
    calls: Sequence[Callable[[], object]],
    *,
    reps: int = 7,
    min_ms: float = 2.0,
    warmup: int = 2,
    max_calls: int = 512,
    stream_setup: StreamSetup | None = None,
) -> float:
    """Median microseconds per call, replaying a CUDA graph of the calls (round-robin).

    ``stream_setup(stream)`` runs on the capture stream first (e.g. to set an L2 access-policy
    window, which captured kernels take as a node attribute) and returns its cleanup.
    Raises ``RuntimeError`` if the calls cannot be captured (e.g. they synchronise) or
    there is no CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA device")
    stream = torch.cuda.Stream()
    cleanup = stream_setup(stream) if stream_setup is not None else None
    try:
        return _graph_us(calls, stream, reps, min_ms, warmup, max_calls)
    finally:
        if cleanup is not None:
            cleanup()


def _graph_us(
    calls: Sequence[Callable[[], object]],
    stream: torch.cuda.Stream,
    reps: int,
    min_ms: float,
    warmup: int,
    max_calls: int,
) -> float:
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            for fn in calls:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    per_call_us = eager_us(calls, reps=1, min_ms=0.5, warmup=0)
    n = max(len(calls), min(max_calls, int(min_ms * 1e3 / max(per_call_us, 1.0)) + 1))
    n = -(-n // len(calls)) * len(calls)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            for i in range(n):
                calls[i % len(calls)]()
    except Exception as exc:
        raise RuntimeError(f"graph capture failed: {exc}") from exc
    graph.replay()
    _sync()
    start, end = _events()
    samples = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        _sync()
        samples.append(start.elapsed_time(end) * 1e3 / n)
    del graph
    return statistics.median(samples)


def time_us(
    calls: Sequence[Callable[[], object]],
    *,
    graph: bool = True,
    stream_setup: StreamSetup | None = None,
    **kw: float,
) -> float:
    """:func:`graph_us` when ``graph`` and capture works, else :func:`eager_us` (with
    ``stream_setup`` applied to the current stream)."""
    if graph:
        try:
            return graph_us(calls, stream_setup=stream_setup, **kw)  # type: ignore[arg-type]
        except RuntimeError:
            _sync()
    cleanup = None
    if stream_setup is not None and torch.cuda.is_available():
        cleanup = stream_setup(torch.cuda.current_stream())
    try:
        return eager_us(calls, **kw)  # type: ignore[arg-type]
    finally:
        if cleanup is not None:
            cleanup()
