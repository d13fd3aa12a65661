"""Benchmark cases of the pooled-lookup kernels and the ids they read (drawn on the GPU).

A :class:`TableSet` is the tables (allocated once, shared by many cases); a :class:`Case` adds
batch, pooling and id distribution. The sweep follows issue 3: batch x pooling x dim x dtype x
ids, the MICRO'24 shape and each DeepRecInfra model's tables (WORKLOADS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recserve.config import TableConfig, row_bytes
from recserve.kernels.layout import stored_row_bytes

TOP_K = 60_000
"""Top-K rows whose coverage is reported (the MICRO'24 study's hot-set size)."""


@dataclass(frozen=True)
class TableSet:
    """Tables of one shape family: ``num_tables`` x ``num_rows`` x ``dim`` (or explicit)."""

    name: str
    rows: tuple[int, ...]
    dims: tuple[int, ...]
    dtype: str

    @property
    def num_tables(self) -> int:
        return len(self.rows)

    def configs(self) -> tuple[TableConfig, ...]:
        return tuple(
            TableConfig(f"t{i}", r, d, dtype=self.dtype)  # type: ignore[arg-type]
            for i, (r, d) in enumerate(zip(self.rows, self.dims, strict=True))
        )

    @property
    def nbytes(self) -> int:
        return sum(
            r * stored_row_bytes(d, self.dtype) for r, d in zip(self.rows, self.dims, strict=True)
        )


@dataclass(frozen=True)
class Case:
    """One timed lookup: tables, batch B, ids per bag L (per table), id distribution."""

    tables: TableSet
    batch: int
    pooling: tuple[int, ...]
    ids: str
    group: str = "sweep"
    weighted: bool = False
    tags: tuple[str, ...] = field(default=())

    @property
    def lookups(self) -> int:
        return self.batch * sum(self.pooling)

    @property
    def name(self) -> str:
        pool = self.pooling[0] if len(set(self.pooling)) == 1 else "mixed"
        return f"{self.tables.name}/{self.tables.dtype}/B{self.batch}/L{pool}/{self.ids}"

    def must_move_bytes(self, id_bytes: int = 8) -> int:
        """Every looked-up row (logical row bytes), the ids (``id_bytes`` each), the offsets
        (int64), the output."""
        rows = sum(
            self.batch * p * row_bytes(d, self.tables.dtype)
            for p, d in zip(self.pooling, self.tables.dims, strict=True)
        )
        ids = id_bytes * self.lookups + 8 * (self.tables.num_tables * self.batch + 1)
        return rows + ids + self.batch * sum(self.tables.dims) * 4

    def stored_row_bytes(self) -> int:
        """Row size for the ceiling: the widest table's padded row."""
        return max(stored_row_bytes(d, self.tables.dtype) for d in self.tables.dims)


def uniform_tables(num_tables: int, dim: int, dtype: str, total_bytes: int) -> TableSet:
    """``num_tables`` equal tables of ``dim`` holding about ``total_bytes`` together."""
    rows = max(1024, total_bytes // (num_tables * stored_row_bytes(dim, dtype)))
    return TableSet(
        f"{num_tables}x{_human(rows)}x{dim}", (rows,) * num_tables, (dim,) * num_tables, dtype
    )


MODEL_TABLES: dict[str, tuple[tuple[tuple[int, int, int], ...], int]] = {
    # model: ((count, rows, dim), ...), pooling L — WORKLOADS.md, paper preset
    "dlrm-rmc1": (((8, 4_000_000, 32),), 80),
    "dlrm-rmc2": (((32, 500_000, 64),), 120),
    "dlrm-rmc3": (((10, 2_000_000, 32),), 20),
    "wnd": (((27, 1_000_000, 32),), 1),
    "mt-wnd": (((41, 500_000, 32), (2, 5_000_000, 32)), 1),
    "ncf": (((2, 140_000, 64), (2, 28_000, 64)), 1),
    "din": (((1, 1_000_000, 32), (1, 100_000, 32), (2, 10_000_000, 32)), 3),
    "dien": (((41, 500_000, 32), (2, 5_000_000, 32)), 1),
    "micro24": (((12, 500_000, 128),), 150),
}


def model_tables(model: str, dtype: str = "fp32") -> tuple[TableSet, int]:
    spec, pooling = MODEL_TABLES[model]
    rows: list[int] = []
    dims: list[int] = []
    for count, r, d in spec:
        rows += [r] * count
        dims += [d] * count
    return TableSet(model, tuple(rows), tuple(dims), dtype), pooling


class IdStream:
    """Draws ids for one table on the GPU: ``uniform``, ``zipf:<alpha>`` (over a random
    permutation of rows, so hot rows are scattered) or ``one-item`` (one random row)."""

    def __init__(
        self, num_rows: int, dist: str, device: torch.device, generator: torch.Generator
    ) -> None:
        self.num_rows = num_rows
        self.dist = dist
        self.device = device
        self.gen = generator
        self._cdf: torch.Tensor | None = None
        self._perm: torch.Tensor | None = None
        self._one = int(torch.randint(0, num_rows, (1,), generator=generator, device=device))
        if dist.startswith("zipf:"):
            alpha = float(dist.split(":", 1)[1])
            ranks = torch.arange(1, num_rows + 1, dtype=torch.float64, device=device)
            cdf = torch.cumsum(ranks.pow_(-alpha), 0)
            self._cdf = (cdf / cdf[-1]).float()
            self._perm = torch.randperm(num_rows, generator=generator, device=device)
        elif dist not in ("uniform", "one-item"):
            raise ValueError(f"unknown id distribution {dist!r}")

    def sample(self, n: int) -> torch.Tensor:
        if self.dist == "uniform":
            return torch.randint(0, self.num_rows, (n,), generator=self.gen, device=self.device)
        if self.dist == "one-item":
            return torch.full((n,), self._one, dtype=torch.int64, device=self.device)
        assert self._cdf is not None and self._perm is not None
        u = torch.rand(n, generator=self.gen, device=self.device)
        rank = torch.searchsorted(self._cdf, u).clamp_(max=self.num_rows - 1)
        return self._perm[rank]


@dataclass
class Inputs:
    """One input set of a case in KeyedJagged layout (feature-major)."""

    values: torch.Tensor
    offsets: torch.Tensor
    key_offsets: list[int]


def id_dtype(tables: TableSet, requested: str = "int32") -> torch.dtype:
    """The ids' dtype for a table set: ``int32`` (as FBGEMM's inference TBE reads them) when
    every row id fits, else ``int64``; ``requested="int64"`` always gives int64."""
    if requested not in ("int32", "int64"):
        raise ValueError(f"ids dtype must be int32 or int64, got {requested!r}")
    if requested == "int32" and max(tables.rows) < 2**31:
        return torch.int32
    return torch.int64


def make_inputs(
    case: Case, streams: list[IdStream], device: torch.device, dtype: torch.dtype = torch.int64
) -> Inputs:
    """One input set: ids in ``dtype``, offsets in int64 (so the kernel's index arithmetic,
    and the code it compiles to, is the same for either id width)."""
    b = case.batch
    parts = [s.sample(b * p).to(dtype) for s, p in zip(streams, case.pooling, strict=True)]
    lengths = torch.cat(
        [torch.full((b,), p, dtype=torch.int64, device=device) for p in case.pooling]
    )
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    key_offsets = [0]
    for p in case.pooling:
        key_offsets.append(key_offsets[-1] + b * p)
    return Inputs(torch.cat(parts), offsets, key_offsets)


def top_k_coverage(ids: torch.Tensor, k: int = TOP_K) -> float:
    """Share of lookups that hit the ``k`` most frequent ids (on the GPU)."""
    if ids.numel() == 0:
        return 0.0
    _, counts = torch.unique(ids, return_counts=True)
    top = torch.topk(counts, min(k, counts.numel())).values
    return float(top.sum()) / ids.numel()


def _human(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000:
        return f"{n // 1000}k"
    return str(n)
