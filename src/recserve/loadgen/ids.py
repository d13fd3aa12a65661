"""Id streams per table: uniform, Zipf over a random permutation of rows, one-item, trace.

The index distribution decides the embedding stage's speed, so every benchmark names its
distribution (``uniform``, ``zipf:1.05``, ``one-item``, ``trace:<path>``) and reports the top-K
coverage of the ids it drew (:func:`top_k_coverage`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class IdDistribution:
    """A parsed id distribution spec."""

    kind: str
    """``uniform``, ``zipf``, ``one-item`` or ``trace``."""
    alpha: float = 0.0
    """Zipf exponent (``zipf`` only)."""
    path: str = ""
    """Trace file, one id per line (``trace`` only)."""

    @classmethod
    def parse(cls, spec: str) -> IdDistribution:
        name, _, arg = spec.partition(":")
        if name == "uniform" and not arg:
            return cls("uniform")
        if name in ("one-item", "one_item") and not arg:
            return cls("one-item")
        if name == "zipf":
            try:
                alpha = float(arg)
            except ValueError:
                raise ValueError(
                    f"zipf needs an exponent, e.g. 'zipf:1.05', got {spec!r}"
                ) from None
            if alpha <= 0:
                raise ValueError(f"zipf exponent must be positive, got {alpha}")
            return cls("zipf", alpha=alpha)
        if name == "trace" and arg:
            return cls("trace", path=arg)
        raise ValueError(
            f"unknown id distribution {spec!r}: use uniform, zipf:<alpha>, one-item or trace:<file>"
        )

    def __str__(self) -> str:
        if self.kind == "zipf":
            return f"zipf:{self.alpha:g}"
        if self.kind == "trace":
            return f"trace:{self.path}"
        return self.kind


class IdSampler:
    """Draws ids in ``[0, num_rows)`` from a distribution, reproducibly from a seed.

    Zipf ranks are mapped through a fixed random permutation of the rows, so hot rows are
    scattered over the table as in production (not a contiguous prefix). Sampling uses the
    inverse CDF of the truncated Zipf law, evaluated on a grid of ranks for large tables.
    """

    _GRID = 1 << 20

    def __init__(self, num_rows: int, dist: IdDistribution | str, seed: int = 0) -> None:
        self.num_rows = num_rows
        self.dist = IdDistribution.parse(dist) if isinstance(dist, str) else dist
        self.rng = np.random.default_rng(seed)
        self._perm_seed = seed + 7919
        self._perm: np.ndarray | None = None
        self._cdf: np.ndarray | None = None
        self._ranks: np.ndarray | None = None
        self._trace: np.ndarray | None = None
        if self.dist.kind == "zipf":
            self._build_zipf()
        elif self.dist.kind == "trace":
            self._trace = load_trace(self.dist.path)
            if self._trace.size == 0:
                raise ValueError(f"trace {self.dist.path}: no ids")
            self._trace = self._trace % num_rows

    def _build_zipf(self) -> None:
        n = self.num_rows
        if n <= self._GRID:
            ranks = np.arange(1, n + 1, dtype=np.float64)
        else:  # geometric grid of ranks: exact at the head, interpolated in the tail
            ranks = np.unique(np.geomspace(1, n, self._GRID).round())
        weights = ranks ** (-self.dist.alpha)
        if n > self._GRID:  # each grid point stands for the ranks up to the next one
            widths = np.diff(np.append(ranks, n + 1))
            weights = weights * widths
        cdf = np.cumsum(weights)
        self._cdf = cdf / cdf[-1]
        self._ranks = ranks.astype(np.int64) - 1

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng(self._perm_seed).permutation(self.num_rows)
        return self._perm

    def hot_rows(self, k: int) -> np.ndarray:
        """The ``k`` most likely rows (Zipf); for other kinds, the first ``k`` rows drawn."""
        if self.dist.kind == "zipf":
            return self._permutation()[: min(k, self.num_rows)]
        if self.dist.kind == "one-item":
            return np.zeros(1, dtype=np.int64)
        return self.sample(k)

    def sample(self, n: int) -> np.ndarray:
        """``n`` ids as int64."""
        kind = self.dist.kind
        if kind == "uniform":
            return self.rng.integers(0, self.num_rows, n, dtype=np.int64)
        if kind == "one-item":
            return np.zeros(n, dtype=np.int64)
        if kind == "trace":
            assert self._trace is not None
            start = int(self.rng.integers(0, self._trace.size))
            idx = (start + np.arange(n)) % self._trace.size
            return self._trace[idx]
        assert self._cdf is not None and self._ranks is not None
        pos = np.searchsorted(self._cdf, self.rng.random(n), side="left")
        rank = self._ranks[np.minimum(pos, self._ranks.size - 1)]
        if self.num_rows > self._GRID:  # spread inside the grid cell
            nxt = np.append(self._ranks[1:], self.num_rows)[np.minimum(pos, self._ranks.size - 1)]
            span = np.maximum(nxt - rank, 1)
            rank = rank + (self.rng.random(n) * span).astype(np.int64)
        return self._permutation()[np.minimum(rank, self.num_rows - 1)]

    def sample_torch(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self.sample(n))


def load_trace(path: str | Path) -> np.ndarray:
    """Ids from a text file (one per line) or a ``.npy`` array."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file {path} does not exist")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.int64).ravel()
    return np.loadtxt(path, dtype=np.int64, ndmin=1)


def top_k_coverage(ids: np.ndarray | torch.Tensor, k: int) -> float:
    """Fraction of lookups that hit the ``k`` most frequent ids of this stream."""
    arr = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if arr.size == 0:
        return 0.0
    _, counts = np.unique(arr, return_counts=True)
    top = np.sort(counts)[::-1][:k]
    return float(top.sum() / arr.size)
