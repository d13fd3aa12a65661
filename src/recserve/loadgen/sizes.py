"""Query sizes (items per query): DeepRecInfra's distributions and quantile files.

Specs, as accepted by :meth:`QuerySizes.parse`:

- ``lognormal`` or ``lognormal:MU,SIGMA`` — ``round(exp(N(mu, sigma)))``, default (5.1, 0.2),
  as in the DeepRecSys scripts (p99 ≈ 262, not heavy-tailed).
- ``production`` — the heavy-tail mix third parties use to replay DeepRecSys's production trace:
  8% uniform in 1–99, 65% lognormal(5.1, 0.2) clipped to 100–200, 22% uniform in 200–599 and
  5% uniform in 600–999 (median ≈ 178, p95 ≈ 600, p99 ≈ 919).
- ``mlperf`` — 100 to 700 in steps of 100, mostly 200 (mean ≈ 272).
- ``fixed:N`` — every query has N items.
- ``file:PATH`` — one size per line, read as quantiles and sampled uniformly (inverse CDF).

Every size is clipped to ``[1, max_items]`` (1024 by default, DeepRecSys's cap).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_MAX_ITEMS = 1024

_PRODUCTION_MIX = (0.08, 0.65, 0.22, 0.05)
_MLPERF_SIZES = np.arange(100, 800, 100)
_MLPERF_PROBS = np.array([0.10, 0.55, 0.12, 0.09, 0.07, 0.04, 0.03])


@dataclass(frozen=True)
class QuerySizes:
    """A parsed query-size distribution."""

    kind: str
    """``lognormal``, ``production``, ``mlperf``, ``fixed`` or ``file``."""
    mu: float = 5.1
    sigma: float = 0.2
    fixed: int = 0
    quantiles: tuple[int, ...] = ()
    """Sizes read from a quantile file (``file`` only)."""
    max_items: int = DEFAULT_MAX_ITEMS
    spec: str = ""

    @classmethod
    def parse(cls, spec: str, max_items: int = DEFAULT_MAX_ITEMS) -> QuerySizes:
        name, _, arg = spec.partition(":")
        if name == "lognormal":
            if not arg:
                return cls("lognormal", max_items=max_items, spec=spec)
            try:
                mu, sigma = (float(x) for x in arg.split(","))
            except ValueError:
                raise ValueError(f"lognormal takes 'lognormal:MU,SIGMA', got {spec!r}") from None
            return cls("lognormal", mu=mu, sigma=sigma, max_items=max_items, spec=spec)
        if name in ("production", "mlperf") and not arg:
            return cls(name, max_items=max_items, spec=spec)
        if name == "fixed" and arg.isdigit() and int(arg) > 0:
            return cls("fixed", fixed=int(arg), max_items=max_items, spec=spec)
        if name == "file" and arg:
            return cls("file", quantiles=tuple(read_quantiles(arg)), max_items=max_items, spec=spec)
        raise ValueError(
            f"unknown query size distribution {spec!r}: use lognormal[:MU,SIGMA], production, "
            "mlperf, fixed:N or file:PATH"
        )

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` query sizes as int64, each in ``[1, max_items]``."""
        if self.kind == "lognormal":
            sizes = np.rint(rng.lognormal(self.mu, self.sigma, n))
        elif self.kind == "production":
            sizes = self._production(n, rng)
        elif self.kind == "mlperf":
            sizes = rng.choice(_MLPERF_SIZES, size=n, p=_MLPERF_PROBS)
        elif self.kind == "fixed":
            sizes = np.full(n, self.fixed)
        else:
            table = np.asarray(self.quantiles)
            sizes = table[rng.integers(0, table.size, n)]
        return np.clip(sizes, 1, self.max_items).astype(np.int64)

    def _production(self, n: int, rng: np.random.Generator) -> np.ndarray:
        part = rng.choice(4, size=n, p=_PRODUCTION_MIX)
        body = np.clip(np.rint(rng.lognormal(self.mu, self.sigma, n)), 100, 200)
        return np.select(
            [part == 0, part == 1, part == 2],
            [rng.integers(1, 100, n), body, rng.integers(200, 600, n)],
            default=rng.integers(600, 1000, n),
        )

    def __str__(self) -> str:
        return self.spec or self.kind


def read_quantiles(path: str | Path) -> list[int]:
    """Sizes from a quantile file: one positive integer (or float, rounded) per line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"query size file {path} does not exist")
    sizes = [round(float(line)) for line in path.read_text().split() if line.strip()]
    if not sizes:
        raise ValueError(f"query size file {path}: no sizes")
    if min(sizes) < 1:
        raise ValueError(f"query size file {path}: sizes must be positive")
    return sorted(sizes)
