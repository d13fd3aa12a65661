"""Open-loop arrival times: exponential gaps (a Poisson process) or gamma gaps with burstiness.

A gap stream is described by its rate (queries per second) and its burstiness, the coefficient
of variation (CV = std / mean) of the gaps. CV 1 is the Poisson process; gamma gaps with shape
``1 / CV**2`` keep the same mean with more (CV > 1) or less (CV < 1) variance. DeepRecSys drew
integer-millisecond Poisson-distributed gaps, which is far less bursty; this module does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrivalProcess:
    """Inter-arrival gaps at ``qps`` queries per second, with a burstiness (gap CV)."""

    qps: float
    """Mean arrival rate in queries per second."""
    burstiness: float = 1.0
    """Coefficient of variation of the gaps: 1 is Poisson (exponential gaps); gamma otherwise."""

    def __post_init__(self) -> None:
        if not self.qps > 0:
            raise ValueError(f"qps must be positive, got {self.qps}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be positive, got {self.burstiness}")

    def gaps(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` inter-arrival gaps in seconds (float64)."""
        mean = 1.0 / self.qps
        if self.burstiness == 1.0:
            return rng.exponential(mean, n)
        shape = 1.0 / self.burstiness**2
        return rng.gamma(shape, mean / shape, n)

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Arrival times in seconds from 0 of ``n`` queries (the first gap is included)."""
        return np.cumsum(self.gaps(n, rng))
