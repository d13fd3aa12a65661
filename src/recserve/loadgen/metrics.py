"""Latency percentiles, tail-latency targets and latency-bounded throughput."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyTarget:
    """A tail-latency target: percentile ``percentile`` of query latency at most ``seconds``."""

    seconds: float
    percentile: float = 95.0

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"latency target must be positive, got {self.seconds}")
        if not 0 < self.percentile < 100:
            raise ValueError(f"percentile must be in (0, 100), got {self.percentile}")

    @classmethod
    def parse(cls, text: str, percentile: float = 95.0) -> LatencyTarget:
        """``"10ms"``, ``"2.5 ms"``, ``"0.01s"``, ``"500us"`` (a bare number means ms)."""
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us)?\s*", text)
        if not m:
            raise ValueError(f"latency {text!r}: expected a number with ms, s or us")
        scale = {"s": 1.0, "ms": 1e-3, "us": 1e-6, None: 1e-3}[m.group(2)]
        return cls(float(m.group(1)) * scale, percentile)

    @property
    def allowed_misses(self) -> float:
        """Fraction of queries that may be slower than the target."""
        return 1.0 - self.percentile / 100.0

    def __str__(self) -> str:
        return f"p{self.percentile:g} <= {self.seconds * 1e3:g} ms"


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of one run's query latencies, in seconds."""

    count: int
    mean: float
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, latencies: Sequence[float] | np.ndarray) -> LatencySummary:
        lat = np.asarray(latencies, dtype=np.float64)
        if lat.size == 0:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan)
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        return cls(
            int(lat.size), float(lat.mean()), float(p50), float(p95), float(p99), float(lat.max())
        )

    def percentile(self, p: float) -> float:
        if p == 50:
            return self.p50
        if p == 95:
            return self.p95
        if p == 99:
            return self.p99
        raise ValueError(f"only p50, p95 and p99 are summarised, not p{p:g}")

    def to_ms(self) -> dict[str, float]:
        return {k: round(getattr(self, k) * 1e3, 4) for k in ("mean", "p50", "p95", "p99", "max")}


def tail_latency(latencies: np.ndarray, percentile: float, missing: int = 0) -> float:
    """The ``percentile`` latency counting ``missing`` queries (refused, failed, unanswered) as
    infinitely slow: a run that drops queries cannot meet a target by dropping them."""
    lat = np.asarray(latencies, dtype=np.float64)
    if missing:
        lat = np.concatenate([lat, np.full(missing, np.inf)])
    if lat.size == 0:
        return float("inf")
    return float(np.percentile(lat, percentile, method="higher"))


def latency_bounded_qps(
    offered: Sequence[float], tails: Sequence[float], target_seconds: float
) -> float:
    """The highest offered QPS of a sweep whose tail latency met the target (0 if none did).

    Points above the first failing load are not trusted: a pass after a fail is noise."""
    best = 0.0
    for qps, tail in sorted(zip(offered, tails, strict=True)):
        if tail > target_seconds:
            break
        best = qps
    return best


@dataclass
class RunResult:
    """One open-loop run at an offered load: what was sent, what came back, and how fast."""

    offered_qps: float
    sent: int
    """Queries the generator tried to submit (refused ones included)."""
    latencies: np.ndarray
    """Seconds from arrival to last item, of every answered query, in arrival order."""
    rejected: int = 0
    """Refused at once (``Overloaded``)."""
    failed: int = 0
    """Accepted, then answered with an error (or never answered before the run gave up)."""
    duration: float = 0.0
    """Seconds from the first arrival to the last answer."""
    aborted: bool = False
    """The run stopped early because the target could no longer be met."""

    @property
    def lost(self) -> int:
        return self.rejected + self.failed

    @property
    def achieved_qps(self) -> float:
        return self.latencies.size / self.duration if self.duration > 0 else 0.0

    def tail(self, percentile: float) -> float:
        """Latency at ``percentile`` with lost queries counted as infinitely slow."""
        return tail_latency(self.latencies, percentile, self.lost)

    def answered_tail(self, percentile: float) -> float:
        """Latency at ``percentile`` of the answered queries only (inf if none answered)."""
        return tail_latency(self.latencies, percentile)

    def meets(self, target: LatencyTarget) -> bool:
        return not self.aborted and self.tail(target.percentile) <= target.seconds

    def summary(self) -> LatencySummary:
        return LatencySummary.of(self.latencies)

    def to_dict(self) -> dict[str, object]:
        return {
            "offered_qps": round(self.offered_qps, 3),
            "achieved_qps": round(self.achieved_qps, 3),
            "sent": self.sent,
            "answered": int(self.latencies.size),
            "rejected": self.rejected,
            "failed": self.failed,
            "aborted": self.aborted,
            "latency_ms": self.summary().to_ms(),
        }
