"""Tables in device memory (HBM), looked up by the table-batched Triton kernel.

:class:`TritonBackend` implements :class:`~recserve.embedding.backend.EmbeddingBackend`: all
tables of one row dtype live in one packed buffer and are pooled by one kernel launch, written
straight into the ``[B, ΣD]`` output (no concatenation). The lookup path does no host sync: the
launch configuration comes from host-side sizes (a shape bucket) and a dict of tuned configs.

Hot-row reordering (:meth:`TritonBackend.reorder_hot_rows`) profiles access counts, permutes
each table so its hot rows come first, gathers every table's hot rows into one contiguous
prefix of the buffer and remaps ids (in the kernel, or upstream with :meth:`remap_ids`); an L2
access-policy window over that prefix (:mod:`recserve.storage.l2`) is switched on only where
tuning measured a gain. Both are off by default: on an H200 they measured slower
(benchmarks/NOTES-kernels.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from recserve.config import TableConfig
from recserve.embedding.backend import EmbeddingBackend, TorchBackend, check_table_weight
from recserve.kernels.layout import (
    StoredRows,
    hot_region_bytes,
    plan_tables,
    stored_row_bytes,
    to_stored,
    unpack_table,
    write_table,
)
from recserve.kernels.pooled import META_FIELDS, PackedRows, PooledConfig, pooled_lookup
from recserve.kernels.reference import pooled_packed, stored_to_float
from recserve.kernels.runtime import device_name, triton_runs_on
from recserve.kernels.timing import time_us
from recserve.kernels.tuning import KernelTuner, ShapeBucket, TunedEntry, tile_candidates

DEFAULT_HOT_BYTES = 32 << 20
"""Hot-region size when the device's persisting-L2 limit is unknown (about an H100's)."""

SKEW_LEVELS = (0.7, 0.2)
"""Distinct rows below these shares of what uniform ids would touch: skew level 1 (Zipf-like,
many lookups hit L2) and 2 (a few rows take most lookups: one-item, steep Zipf)."""

L2_GAIN_THRESHOLD = 1.02
"""An L2 window is switched on automatically only when it measured more than 2% faster."""

_ROWS_CONFIG = PooledConfig(bags=64, rows=1, num_warps=4)
"""Gathering rows (behaviour sequences) is pooling 1: many one-id bags per program."""


@dataclass
class _Group:
    """Tables of one row dtype: one packed buffer, one launch."""

    dtype: str
    tables: list[int]
    packed: PackedRows
    single: list[PackedRows]
    """Per table, the same rows seen as a one-table group writing columns from 0 (rows())."""

    def set_packed(self, packed: PackedRows) -> None:
        self.packed = packed
        self.single = []
        for local in range(len(self.tables)):
            meta = packed.meta_host[local : local + 1].clone()
            for name in ("feature", "col", "mean"):
                meta[0, META_FIELDS.index(name)] = 0
            self.single.append(
                dataclasses.replace(
                    packed, meta=meta.to(packed.meta.device), meta_host=meta, num_tables=1
                )
            )


class TritonBackend(EmbeddingBackend):
    """Tables on one device (CUDA; CPU under ``TRITON_INTERPRET=1``, or the torch twin of the
    kernel elsewhere), every table of a dtype pooled in one launch.

    ``output_dtype`` (fp32 or fp16) is the pooled output's type; ``tuner`` holds tuned configs
    (default: those shipped for this device); ``init`` fills rows with DLRM's initialisation.
    """

    graph_safe = True  # key_offsets only pick the tuned config

    def __init__(
        self,
        tables: tuple[TableConfig, ...],
        device: torch.device | str = "cuda",
        *,
        output_dtype: torch.dtype = torch.float32,
        tuner: KernelTuner | None = None,
        init: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(tables)
        if output_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"output_dtype must be float32 or float16, got {output_dtype}")
        self.device = torch.device(device)
        self.output_dtype = output_dtype
        self.use_triton = triton_runs_on(self.device)
        self.tuner = (
            tuner if tuner is not None else KernelTuner.for_device(device_name(self.device))
        )
        self.cols = [0]
        for t in self.tables:
            self.cols.append(self.cols[-1] + t.dim)
        self._groups: list[_Group] = []
        self._where: dict[int, tuple[int, int]] = {}
        for i, t in enumerate(self.tables):
            group = next((g for g in self._groups if g.dtype == t.dtype), None)
            if group is None:
                group = _Group(t.dtype, [], None, [])  # type: ignore[arg-type]
                self._groups.append(group)
            self._where[i] = (self._groups.index(group), len(group.tables))
            group.tables.append(i)
        self._orders: list[torch.Tensor | None] = [None] * len(self.tables)
        for g in self._groups:
            g.set_packed(self._plan(g, None))
        self.l2_window_on = False
        self.skew = 0
        """How skewed the ids are, 0-2 (set by :meth:`profile`); part of the tuning bucket."""
        self.ids_remapped = False
        """Pooled ids arrive already in the reordered numbering (:meth:`remap_ids` applied
        upstream, e.g. where requests are validated), so the kernel skips its remap load."""
        if init:
            self.reset_parameters(generator)

    # ------------------------------------------------------------------ rows in and out

    @classmethod
    def from_backend(
        cls, backend: TorchBackend, device: torch.device | str | None = None, **kw: Any
    ) -> TritonBackend:
        """The same tables and rows as a :class:`TorchBackend` (int8 codes copied exactly)."""
        dev = device if device is not None else backend.weights[0].device
        out = cls(backend.tables, dev, init=False, **kw)
        for i, t in enumerate(backend.tables):
            sb = backend.scale_bias(i) if t.dtype == "int8" else None
            out.load_stored(i, StoredRows(backend.weights[i].detach(), sb))
        return out

    @classmethod
    def from_weights(
        cls,
        tables: tuple[TableConfig, ...],
        weights: Sequence[torch.Tensor],
        device: torch.device | str = "cuda",
        **kw: Any,
    ) -> TritonBackend:
        """Tables filled from float ``[rows, D]`` tensors (converted to each table's dtype)."""
        out = cls(tables, device, init=False, **kw)
        for i, w in enumerate(weights):
            out.load_table(i, w)
        return out

    @torch.no_grad()
    def load_table(self, table: int, weight: torch.Tensor) -> None:
        """Set a table's rows from a float ``[rows, D]`` tensor (quantising int8 tables)."""
        t = self.tables[table]
        check_table_weight(t, weight)
        self.load_stored(table, to_stored(weight.to(self.device), t.dtype))

    @torch.no_grad()
    def load_stored(self, table: int, stored: StoredRows, first_row: int = 0) -> None:
        """Set rows ``[first_row, first_row + n)`` from rows already in the table's dtype."""
        g, local = self._where[table]
        write_table(self._groups[g].packed, local, stored, self._orders[table], first_row)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """DLRM's initialisation: rows uniform in ±sqrt(1 / rows), drawn in chunks."""
        for i, t in enumerate(self.tables):
            bound = math.sqrt(1.0 / t.num_rows)
            chunk = t.num_rows if self._orders[i] is not None else max(1, (1 << 24) // t.dim)
            for start in range(0, t.num_rows, chunk):
                stop = min(start + chunk, t.num_rows)
                gen_device = generator.device if generator is not None else self.device
                rows = torch.rand(stop - start, t.dim, generator=generator, device=gen_device)
                rows = rows.to(self.device).mul_(2 * bound).sub_(bound)
                self.load_stored(i, to_stored(rows, t.dtype), start)

    def stored(self, table: int) -> StoredRows:
        """A table's rows in their storage dtype, original order."""
        g, local = self._where[table]
        return unpack_table(self._groups[g].packed, local)

    def dense_weight(self, table: int) -> torch.Tensor:
        return stored_to_float(self.stored(table), torch.float32)

    def packed(self, table: int = 0) -> PackedRows:
        """The packed rows holding table ``table`` (for benchmarks and tests)."""
        return self._groups[self._where[table][0]].packed

    # ------------------------------------------------------------------ lookups

    def pooled(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        batch_size: int,
        weights: torch.Tensor | None = None,
        key_offsets: list[int] | None = None,
    ) -> torch.Tensor:
        out = torch.empty(
            batch_size, self.output_dim, dtype=self.output_dtype, device=values.device
        )
        remap = False if self.ids_remapped else None
        for g in self._groups:
            if self.use_triton:
                cfg = self.tuner.config(self._bucket(g, values, batch_size, weights, key_offsets))
                pooled_lookup(g.packed, values, offsets, batch_size, out, cfg, weights, remap)
            else:
                pooled_packed(g.packed, values, offsets, batch_size, out, weights, remap)
        return out

    def rows(self, table: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` (always in the original numbering, also with ``ids_remapped``)."""
        g, local = self._where[table]
        one = self._groups[g].single[local]
        flat = ids.reshape(-1)
        n = flat.numel()
        out = torch.empty(n, self.tables[table].dim, dtype=torch.float32, device=flat.device)
        offsets = torch.arange(n + 1, device=flat.device)
        if self.use_triton:
            return pooled_lookup(one, flat, offsets, n, out, _ROWS_CONFIG)
        return pooled_packed(one, flat, offsets, n, out)

    def configs_for(
        self,
        values: torch.Tensor,
        batch_size: int,
        weights: torch.Tensor | None = None,
        key_offsets: list[int] | None = None,
    ) -> list[tuple[ShapeBucket, PooledConfig]]:
        """The bucket and config each dtype group's launch would use for these inputs."""
        out = []
        for g in self._groups:
            bucket = self._bucket(g, values, batch_size, weights, key_offsets)
            out.append((bucket, self.tuner.config(bucket)))
        return out

    def _bucket(
        self,
        group: _Group,
        values: torch.Tensor,
        batch_size: int,
        weights: torch.Tensor | None,
        key_offsets: list[int] | None,
    ) -> ShapeBucket:
        if key_offsets is not None:
            lookups = sum(key_offsets[t + 1] - key_offsets[t] for t in group.tables)
        else:  # values may run past our tables: an estimate is enough to pick a bucket
            lookups = values.numel() * len(group.tables) // len(self.tables)
        return ShapeBucket.of(
            group.dtype,
            group.packed.block_d,
            lookups,
            len(group.tables) * batch_size,
            weighted=weights is not None,
            reordered=group.packed.split_hot,
            skew=self.skew,
        )

    # ------------------------------------------------------------------ hot rows and L2

    def profile(
        self, values: torch.Tensor, offsets: torch.Tensor, batch_size: int
    ) -> dict[str, float | int]:
        """Measure how skewed a sample of ids is and remember it for config choice.

        Compares the distinct rows of each table's ids with what uniform ids would give
        (``R * (1 - exp(-n / R))``); :data:`SKEW_LEVELS` turn the ratio into ``skew`` 0-2
        (skewed ids hit L2 and L1, and want other tiles). Profiling only: syncs the host.
        """
        b = batch_size
        starts = offsets[::b].tolist()
        seen = expected = 0.0
        for i, t in enumerate(self.tables):
            ids = values[starts[i] : starts[i + 1]]
            if ids.numel() == 0:
                continue
            seen += torch.unique(ids).numel()
            expected += t.num_rows * -math.expm1(-ids.numel() / t.num_rows)
        ratio = seen / expected if expected else 1.0
        self.skew = sum(ratio < level for level in SKEW_LEVELS)
        return {"unique_vs_uniform": ratio, "skew": self.skew}

    def remap_ids(self, values: torch.Tensor, key_offsets: Sequence[int]) -> torch.Tensor:
        """Ids translated into the reordered numbering (what :attr:`ids_remapped` expects),
        table by table (``key_offsets [T + 1]`` are where each table's ids start)."""
        out = values.clone()
        for g in self._groups:
            if g.packed.remap is None:
                continue
            for local, i in enumerate(g.tables):
                lo, hi = key_offsets[i], key_offsets[i + 1]
                base = int(g.packed.meta_host[local, META_FIELDS.index("remap_base")])
                remap = g.packed.remap.to(values.device)
                out[lo:hi] = remap[base + values[lo:hi].long()].to(values.dtype)
        return out

    def access_counts(
        self, values: torch.Tensor, offsets: torch.Tensor, batch_size: int
    ) -> list[torch.Tensor]:
        """Lookups of each row of each table in a sample of ids (profiling: syncs the host)."""
        b = batch_size
        starts = offsets[::b].tolist()
        return [
            torch.bincount(values[starts[i] : starts[i + 1]].long(), minlength=t.num_rows).to(
                self.device
            )
            for i, t in enumerate(self.tables)
        ]

    @torch.no_grad()
    def reorder_hot_rows(
        self, counts: Sequence[torch.Tensor], hot_bytes: int | None = None
    ) -> dict[str, Any]:
        """Permute rows so the hottest ones (by ``counts``, one tensor per table) form one
        contiguous prefix of ``hot_bytes`` (default: the device's persisting-L2 limit).

        Rows are chosen across tables by lookups per byte; results are unchanged (the kernel
        remaps ids). Returns the hot rows per table, the prefix bytes and its share of lookups.
        """
        budget = hot_bytes if hot_bytes is not None else _default_hot_bytes(self.device)
        n_hot = _choose_hot(self.tables, counts, budget)
        originals = [self.stored(i) for i in range(len(self.tables))]
        for i, c in enumerate(counts):
            self._orders[i] = torch.argsort(c.to(self.device), descending=True, stable=True)
        for g in self._groups:
            g.set_packed(self._plan(g, [n_hot[i] for i in g.tables]))
            for i in g.tables:
                self.load_stored(i, originals[i])
        total = sum(float(c.sum()) for c in counts)
        covered = sum(
            float(c.to(self.device)[self._orders[i][: n_hot[i]]].sum())
            for i, c in enumerate(counts)
        )
        return {
            "n_hot": n_hot,
            "hot_bytes": sum(hot_region_bytes(g.packed) for g in self._groups),
            "hot_share": covered / total if total else 0.0,
        }

    def enable_l2_window(self, stream: torch.cuda.Stream | None = None) -> float:
        """Pin the hot prefix (of the dtype group with most hot bytes) in L2 on ``stream``."""
        from recserve.storage.l2 import set_l2_window

        group = max(self._groups, key=lambda g: hot_region_bytes(g.packed))
        nbytes = hot_region_bytes(group.packed)
        if nbytes == 0:
            raise RuntimeError("no hot rows: call reorder_hot_rows first")
        ratio = set_l2_window(group.packed.rows.data_ptr(), nbytes, stream)
        self.l2_window_on = True
        return ratio

    def disable_l2_window(self, stream: torch.cuda.Stream | None = None) -> None:
        from recserve.storage.l2 import clear_l2_window

        clear_l2_window(stream)
        self.l2_window_on = False

    # ------------------------------------------------------------------ tuning

    def autotune(
        self,
        batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        batch_size: int,
        weights: torch.Tensor | None = None,
        *,
        l2: bool = True,
        candidates: int = 0,
    ) -> list[TunedEntry]:
        """Tune every dtype group's config on sample ``batches`` of ``(values, offsets)``
        (profiling their skew first); ``candidates`` limits the tile search (0: all).

        With hot rows and ``l2``, also times the chosen config with and without the L2 window
        and leaves the window on (on the current stream) only if it measured more than 2%
        faster. Syncs (tuning only, never on the lookup path).
        """
        values0, offsets0 = batches[0]
        self.profile(values0, offsets0, batch_size)
        remap = False if self.ids_remapped else None
        entries = []
        for g in self._groups:
            bucket = self._bucket(g, values0, batch_size, weights, None)
            out = torch.empty(
                batch_size, self.output_dim, dtype=self.output_dtype, device=self.device
            )

            def calls(
                cfg: PooledConfig, g: _Group = g, out: torch.Tensor = out
            ) -> list[Callable[[], object]]:
                return [
                    lambda v=v, o=o: pooled_lookup(
                        g.packed, v, o, batch_size, out, cfg, weights, remap
                    )
                    for v, o in batches
                ]

            def timer(cfg: PooledConfig, calls: Callable[..., Any] = calls) -> float:
                return time_us(calls(cfg), reps=5)

            self.tuner.tune_tiles(bucket, timer, tile_candidates(bucket, candidates))
            entry = self.tuner.tune_levers(bucket, timer)
            if l2 and g.packed.split_hot and self.device.type == "cuda":
                off_us = timer(entry.config)

                def window(stream: Any) -> Callable[[], None]:
                    self.enable_l2_window(stream)
                    return lambda: self.disable_l2_window(stream)

                on_us = time_us(calls(entry.config), reps=5, stream_setup=window)
                gain = off_us / on_us
                entry.gains = {**(entry.gains or {}), "l2_window": gain}
                entry.l2_window = gain > L2_GAIN_THRESHOLD
                if entry.l2_window:
                    self.enable_l2_window()
            entries.append(entry)
        return entries

    def _plan(self, group: _Group, n_hot: list[int] | None) -> PackedRows:
        ts = [self.tables[i] for i in group.tables]
        return plan_tables(
            [t.dim for t in ts],
            [t.num_rows for t in ts],
            group.dtype,
            cols=[self.cols[i] for i in group.tables],
            features=group.tables,
            poolings=[t.pooling for t in ts],
            n_hot=n_hot,
            device=self.device,
        )


def _default_hot_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_HOT_BYTES
    try:
        from recserve.storage.l2 import L2Unavailable, l2_limits

        limit = l2_limits(device.index).max_persisting_bytes
    except (ImportError, L2Unavailable):
        return DEFAULT_HOT_BYTES
    return limit or DEFAULT_HOT_BYTES


def _choose_hot(
    tables: Sequence[TableConfig], counts: Sequence[torch.Tensor], budget: int
) -> list[int]:
    """Hot rows per table: the rows with the most lookups per byte across all tables, until
    ``budget`` bytes; rows never looked up are never hot."""
    cands_score, cands_table = [], []
    for i, (t, c) in enumerate(zip(tables, counts, strict=True)):
        rb = stored_row_bytes(t.dim, t.dtype)
        k = min(t.num_rows, max(1, budget // rb))
        top = torch.topk(c.double().cpu(), k).values
        top = top[top > 0]
        cands_score.append(top / rb)
        cands_table.append(torch.full((top.numel(),), i, dtype=torch.int64))
    n_hot = [0] * len(tables)
    if not cands_score:
        return n_hot
    score, table = torch.cat(cands_score), torch.cat(cands_table)
    order = torch.argsort(score, descending=True, stable=True)
    sizes = torch.tensor([stored_row_bytes(t.dim, t.dtype) for t in tables])[table[order]]
    take = order[torch.cumsum(sizes, 0) <= budget]
    for i, n in zip(*torch.unique(table[take], return_counts=True), strict=True):
        n_hot[int(i)] = int(n)
    return n_hot
