"""The measured cost rule that picks how a batch's host rows are read: in place or dedup.

Host rows reach the GPU at a rate set as much by address translation of host pages as by PCIe:
on an H200 (a virtual machine, 16 GiB of host tables) in-place reads ran at ~55 M rows/s in
random order whatever the row size, and a sorted gather of unique rows paid ~22 ns per distinct
64 KiB page it touched before reaching 85-88% of the 55 GB/s copy ceiling; mapping the memory
with 2 MiB pages (huge pages, ``cudaHostAlloc``, CUDA's VMM API) changed nothing
(``benchmarks/probe_host_memory.py``). The rule models exactly those terms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PathCost:
    """The cost rule that picks ``inplace`` or ``dedup`` per batch, with measured constants.

    Predicted microseconds for ``n`` host lookups of ``bytes`` row bytes, of which a share
    ``miss`` is not cached and a share ``unique`` are distinct uncached rows (``u = n * unique``),
    over host tables spanning ``span`` bytes::

        inplace = inplace_us + n * miss * inplace_ns_per_row / 1e3
                  + u * inplace_ns_per_unique / 1e3
        dedup   = dedup_us + n * dedup_ns_per_id / 1e3 + pages(u) * dedup_ns_per_page / 1e3
                  + unique * bytes * dedup_ns_per_kb / 1e6
        pages(u) = P * (1 - exp(-u / P)),  P = span / page_bytes

    ``pages`` is the expected number of distinct pages the sorted gather touches; repeats of
    hot rows are cheap in place (cached on the GPU), distinct rows are not.

    Defaults: the fit to ``benchmarks/results/nvidia-h200/tiers.json`` (an H200, 16 GiB of host
    tables); :func:`fit_path_cost` refits them from timings taken on the device at hand.
    """

    inplace_us: float = 25.0
    inplace_ns_per_row: float = 1.2
    inplace_ns_per_unique: float = 18.0
    dedup_us: float = 290.0
    dedup_ns_per_id: float = 0.5
    dedup_ns_per_page: float = 22.0
    dedup_ns_per_kb: float = 9.6
    page_bytes: int = 1 << 16

    def pages(self, unique_rows: float, span: float) -> float:
        p = max(span / self.page_bytes, 1.0)
        return p * -math.expm1(-unique_rows / p)

    def inplace_time_us(self, n: int, miss: float = 1.0, unique: float = 1.0) -> float:
        return (
            self.inplace_us
            + n * miss * self.inplace_ns_per_row / 1e3
            + n * unique * self.inplace_ns_per_unique / 1e3
        )

    def dedup_time_us(
        self, n: int, host_bytes: float, unique: float = 1.0, span: float = 0.0
    ) -> float:
        return (
            self.dedup_us
            + n * self.dedup_ns_per_id / 1e3
            + self.pages(n * unique, span) * self.dedup_ns_per_page / 1e3
            + unique * host_bytes * self.dedup_ns_per_kb / 1e6
        )

    def choose(
        self, n: int, host_bytes: float, miss: float = 1.0, unique: float = 1.0, span: float = 0.0
    ) -> str:
        if n == 0:
            return "inplace"
        inplace = self.inplace_time_us(n, miss, unique)
        dedup = self.dedup_time_us(n, host_bytes, unique, span)
        return "dedup" if dedup < inplace else "inplace"


def _nonneg_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares on relative errors (rows weighted by ``1 / y``, so small batches count as
    much as large ones) with non-negative coefficients: features that would go negative are
    dropped and the rest refitted (enough for a handful of features)."""
    w = 1.0 / np.maximum(y, 1e-9)
    a, y = a * w[:, None], y * w
    keep = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while keep:
        sol, *_ = np.linalg.lstsq(a[:, keep], y, rcond=None)
        if (sol >= 0).all():
            coef[keep] = sol
            break
        keep = [k for k, v in zip(keep, sol, strict=True) if v >= 0]
    return coef


def fit_path_cost(samples: Sequence[dict[str, float]], prior: PathCost = PathCost()) -> PathCost:
    """Fit :class:`PathCost` to timings: each sample has ``path``, ``n``, ``bytes`` (host row
    bytes of the lookups), ``miss``, ``unique`` (shares), ``span`` (bytes of the host tables)
    and ``us``. A path with too few samples keeps the prior's constants."""
    fitted: dict[str, Any] = dict(prior.__dict__)
    inplace = [s for s in samples if s["path"] == "inplace"]
    if len(inplace) >= 3:
        a = np.array([[1.0, s["n"] * s["miss"] / 1e3, s["n"] * s["unique"] / 1e3] for s in inplace])
        c = _nonneg_lstsq(a, np.array([s["us"] for s in inplace]))
        fitted.update(inplace_us=c[0], inplace_ns_per_row=c[1], inplace_ns_per_unique=c[2])
    dedup = [s for s in samples if s["path"] == "dedup"]
    if len(dedup) >= 4:
        rows = []
        for s in dedup:
            pages = prior.pages(s["n"] * s["unique"], s["span"])
            rows.append([1.0, s["n"] / 1e3, pages / 1e3, s["unique"] * s["bytes"] / 1e6])
        c = _nonneg_lstsq(np.array(rows), np.array([s["us"] for s in dedup]))
        fitted.update(
            dedup_us=c[0], dedup_ns_per_id=c[1], dedup_ns_per_page=c[2], dedup_ns_per_kb=c[3]
        )
    values: dict[str, Any] = {k: float(v) for k, v in fitted.items()}
    values["page_bytes"] = int(fitted["page_bytes"])
    return PathCost(**values)
