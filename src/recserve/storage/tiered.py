"""Tables in HBM, in host DRAM, or in host DRAM behind a shared HBM cache, behind one backend.

:class:`TieredBackend` implements :class:`~recserve.embedding.backend.EmbeddingBackend` for
tables placed ``hbm``, ``host`` or ``host+cache``. Host tables live in one registered
:class:`~recserve.storage.host.HostArena` (128-byte aligned rows); ``host+cache`` tables share
one :class:`~recserve.storage.cache.HbmRowCache`. Every table of a row dtype is pooled in one
launch of :func:`recserve.kernels.host.tiered_pooled`, which reads each id's row from HBM, the
cache or host memory. Per batch, a cost rule (:class:`PathCost`) picks one of two ways to read
the host rows:

- ``inplace``: the pooling kernel reads host rows over PCIe where it needs them (lowest fixed
  cost; a row looked up twice crosses PCIe twice);
- ``dedup``: the batch's host ids are deduplicated on the GPU (sort + scan), each unique row is
  gathered once into an HBM staging buffer, then pooled from there (a fixed cost of a few
  launches; each unique row crosses PCIe once, in large sorted bursts). Rows of cached tables
  are staged from the cache when it holds them (from the host otherwise), and the cache policy
  records each distinct row once with its count (:func:`recserve.kernels.gather.gather_unique`).

The lookup path never synchronises with the host: sizes come from host-side shapes, and the
cost rule's estimates of unique and cached shares are read back asynchronously from earlier
batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import triton

from recserve.config import TORCH_DTYPES, TableConfig
from recserve.embedding.backend import EmbeddingBackend, check_table_weight, quantize_rowwise
from recserve.kernels.gather import (
    dedup_ids,
    gather_rows,
    gather_rows_reference,
    gather_unique,
    gather_unique_reference,
    globalize,
    globalize_reference,
)
from recserve.kernels.host import (
    SENTINEL32,
    SENTINEL64,
    SOURCE_HBM,
    SOURCE_HOST,
    STAT_LANES,
    TIER_FIELDS,
    TierConfig,
    TierGroup,
    tiered_pooled,
    tiered_pooled_reference,
)
from recserve.kernels.runtime import triton_runs_on
from recserve.storage.cache import CacheConfig, HbmRowCache, resolve_capacity
from recserve.storage.cost import PathCost
from recserve.storage.host import HostArena, HostRowLayout, HostTables, host_row_layout

TIERED_PLACEMENTS = ("hbm", "host", "host+cache")
PATHS = ("auto", "inplace", "dedup")
_ROWS_CONFIG = TierConfig(bags=64, rows=1, num_warps=4)
"""Gathering rows (behaviour sequences) is pooling 1: many one-id bags per program."""


@dataclass
class TieredOptions:
    """Knobs of a :class:`TieredBackend` (the defaults suit large host tables)."""

    cache: CacheConfig | None = field(default_factory=CacheConfig)
    """The shared HBM cache of ``host+cache`` tables (None: no cache; they read host only)."""
    path: str = "auto"
    """``auto`` (the cost rule), ``inplace`` or ``dedup``: how host rows are read."""
    cost: PathCost = field(default_factory=PathCost)
    inplace: TierConfig = field(default_factory=lambda: TierConfig(bags=1, rows=64, num_warps=8))
    """Launch configuration of the pooling kernel for bags of ``short_bag`` ids or more."""
    inplace_short: TierConfig = field(default_factory=lambda: TierConfig(bags=64, rows=1))
    """... and for shorter bags (pooling 1: many one-id bags per program)."""
    short_bag: float = 4.0
    gather_rows: int = 32
    """Unique rows per program of the gather kernel."""
    gather_warps: int = 4
    probe_every: int = 64
    """While in-place is chosen, run dedup every this many batches to re-measure uniqueness."""
    host_alloc: str = "register"
    """How host memory is page-locked and mapped (:data:`recserve.storage.host.ALLOC_METHODS`)."""

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {list(PATHS)}, got {self.path!r}")


class _Readback:
    """Small device values copied to pinned host memory without waiting: ``poll()`` returns the
    latest copy that has landed (None until one has)."""

    def __init__(self, size: int) -> None:
        self.host = torch.zeros(size, dtype=torch.float64, pin_memory=True)
        self.event: torch.cuda.Event | None = None
        self.pending = False

    def ready(self) -> bool:
        """Whether :meth:`push` would take a value now (compute it only then)."""
        return not self.pending and not torch.cuda.is_current_stream_capturing()

    def push(self, values: torch.Tensor) -> None:
        if not self.ready():
            return
        self.host.copy_(values.double(), non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        self.pending = True

    def poll(self) -> np.ndarray | None:
        if self.pending and self.event is not None and self.event.query():
            self.pending = False
            return self.host.numpy().copy()
        return None


def state_dict_keys(table: int, dtype: str) -> tuple[str, str | None]:
    """TorchBackend's state-dict names of a table's rows (and int8 scale/bias)."""
    return f"weights.{table}", (f"scale_bias_{table}" if dtype == "int8" else None)


class TieredBackend(EmbeddingBackend):
    """Tables in HBM, host DRAM, or host DRAM behind the shared HBM cache (per ``placements``,
    default each table's own ``placement``, which must be resolved: see
    :func:`recserve.storage.planner.plan_placements`).

    ``device`` is the GPU (or CPU, for tests: host memory is then an ordinary buffer and Triton
    runs interpreted when ``TRITON_INTERPRET=1``, else the pure-torch reference runs).
    ``init`` fills rows with DLRM's initialisation; ``arena`` lends an existing host arena.
    """

    def __init__(
        self,
        tables: tuple[TableConfig, ...],
        device: torch.device | str = "cuda",
        *,
        placements: Sequence[str] | None = None,
        options: TieredOptions | None = None,
        init: bool = True,
        generator: torch.Generator | None = None,
        register: bool | None = None,
        arena: HostArena | None = None,
    ) -> None:
        super().__init__(tables)
        self.device = torch.device(device)
        self.options = options or TieredOptions()
        self.use_triton = triton_runs_on(self.device)
        places = list(placements) if placements is not None else [t.placement for t in tables]
        if len(places) != len(tables):
            raise ValueError(f"{len(places)} placements for {len(tables)} tables")
        for t, p in zip(tables, places, strict=True):
            if p not in TIERED_PLACEMENTS:
                raise ValueError(
                    f"table {t.name!r}: placement {p!r} is not served here (use one of "
                    f"{list(TIERED_PLACEMENTS)}; 'auto' is resolved by recserve.storage.planner)"
                )
        if self.options.cache is None:
            places = ["host" if p == "host+cache" else p for p in places]
        self.placements = tuple(places)
        self.cols = [0]
        for t in self.tables:
            self.cols.append(self.cols[-1] + t.dim)

        # Host tables: cached ones first, so the cache's id space is a prefix of the host ids.
        cached = [i for i, p in enumerate(places) if p == "host+cache"]
        self.host_order = cached + [i for i, p in enumerate(places) if p == "host"]
        self.gid_base = {i: 0 for i in self.host_order}
        pos = 0
        for i in self.host_order:
            self.gid_base[i] = pos
            pos += tables[i].num_rows
        self.num_host_ids = pos
        self.num_cached_ids = sum(tables[i].num_rows for i in cached)
        self.host: HostTables | None = None
        self.layouts: dict[int, HostRowLayout] = {}
        if self.host_order:
            self.host = HostTables(
                [tables[i] for i in self.host_order],
                arena=arena,
                register=register,
                method=self.options.host_alloc,
            )
            self.layouts = {i: self.host.layouts[k] for k, i in enumerate(self.host_order)}
        self.gid_dtype = torch.int32 if self.num_host_ids < SENTINEL32 else torch.int64
        self.sentinel = SENTINEL32 if self.gid_dtype == torch.int32 else SENTINEL64

        # HBM tables: one byte buffer, rows 16-byte aligned.
        pos = 0
        for i, p in enumerate(places):
            if p == "hbm":
                t = tables[i]
                self.layouts[i] = host_row_layout(t.dim, t.dtype, t.num_rows, pos, align=16)
                pos += self.layouts[i].nbytes
        self.hbm = torch.zeros(_round_up(max(pos, 16), 16), dtype=torch.uint8, device=self.device)

        host_layouts = [self.layouts[i] for i in self.host_order]
        self.stage_bytes = max((lay.copy_bytes for lay in host_layouts), default=16)
        self.stage = torch.zeros(0, dtype=torch.uint8, device=self.device)
        bounds = [self.gid_base[i] for i in self.host_order] + [self.num_host_ids]
        self.row_bounds = torch.tensor(bounds, dtype=torch.int64, device=self.device)
        self.row_meta = torch.tensor(
            [[lay.base // 4, lay.stride // 4, lay.copy_bytes // 4] for lay in host_layouts]
            or [[0, 0, 0]],
            dtype=torch.int64,
            device=self.device,
        )

        self.cache: HbmRowCache | None = None
        if cached and self.options.cache is not None:
            slot_bytes = max(self.layouts[i].copy_bytes for i in cached)
            cfg = self.options.cache
            capacity = resolve_capacity(cfg, slot_bytes, self.num_cached_ids, self.device)
            self.cache = HbmRowCache(
                self.num_cached_ids,
                slot_bytes,
                capacity,
                self.device,
                self._load_slots,
                policy=cfg.policy,
                num_tables=len(tables),
                refresh_every=cfg.refresh_every,
                record=cfg.record,
            )

        self._meta_all = self._meta(range(len(tables)), single=False)
        self._meta_all_dev = self._meta_all.to(self.device)
        self._groups: list[tuple[str, TierGroup]] = []
        for dtype in dict.fromkeys(t.dtype for t in tables):
            members = [i for i, t in enumerate(tables) if t.dtype == dtype]
            self._groups.append((dtype, self._group(members, single=False)))
        self._single = [self._group([i], single=True) for i in range(len(tables))]
        self._unique_share = _Readback(2) if self.device.type == "cuda" else None
        self._tally = torch.zeros(STAT_LANES, 2, dtype=torch.int64, device=self.device)
        self._stat_table = torch.tensor(self.host_order or [0], dtype=torch.int64).to(self.device)
        self._hit_share = _Readback(2) if self.device.type == "cuda" else None
        self.est_unique = 1.0
        self.est_miss = 1.0
        self._last_counts: np.ndarray | None = None
        self._since_probe = 0
        self.path_counts = {"inplace": 0, "dedup": 0}
        if init:
            self.reset_parameters(generator)

    # ------------------------------------------------------------------ layout

    def _meta(self, members: Sequence[int], single: bool) -> torch.Tensor:
        rows = []
        for i in members:
            t = self.tables[i]
            lay = self.layouts[i]
            elem = TORCH_DTYPES[t.dtype].itemsize
            width = _round_up(t.dim * elem, 16) // elem
            fields = {
                "source": SOURCE_HBM if self.placements[i] == "hbm" else SOURCE_HOST,
                "base": lay.base // elem,
                "stride": lay.stride // elem,
                "width": width,
                "dim": t.dim,
                "col": 0 if single else self.cols[i],
                "mean": 0 if single else int(t.pooling == "mean"),
                "feature": 0 if single else i,
                "gid_base": self.gid_base.get(i, -1),
                "cached": int(self.placements[i] == "host+cache"),
                "scale_off": lay.scale_off,
                "table": i,
            }
            rows.append([fields[name] for name in TIER_FIELDS])
        return torch.tensor(rows, dtype=torch.int64)

    def _group(self, members: Sequence[int], single: bool) -> TierGroup:
        meta = self._meta(members, single)
        dtype = self.tables[members[0]].dtype
        elem = TORCH_DTYPES[dtype].itemsize
        widths = meta[:, TIER_FIELDS.index("width")]
        return TierGroup(
            meta=meta.to(self.device),
            meta_host=meta,
            block_d=max(triton.next_power_of_2(int(widths.max())), 16 // elem),
            vec=16 // elem,
            quant=dtype == "int8",
            any_cached=any(self.placements[i] == "host+cache" for i in members),
        )

    def _hbm_rows(self, table: int) -> torch.Tensor:
        lay = self.layouts[table]
        return self.hbm[lay.base : lay.base + lay.nbytes].view(lay.num_rows, lay.stride)

    def _host_index(self, table: int) -> int:
        return self.host_order.index(table)

    # ------------------------------------------------------------------ rows in and out

    @torch.no_grad()
    def load_table(self, table: int, weight: torch.Tensor) -> None:
        """Set a table's rows from float rows ``[rows, D]``, a chunk at a time (no full copy)."""
        t = self.tables[table]
        check_table_weight(t, weight)
        if self.placements[table] == "hbm":
            step = max(1, (64 << 20) // (t.dim * 4))
            for s in range(0, t.num_rows, step):
                self._write_hbm(table, s, weight[s : s + step])
        else:
            assert self.host is not None
            self.host.load_table(self._host_index(table), weight)
            self._forget_cached(table)

    def load_stored(
        self, table: int, first_row: int, rows: torch.Tensor, scale_bias: torch.Tensor | None
    ) -> None:
        """Set rows from values already in the table's dtype (int8: codes and scale/bias)."""
        if self.placements[table] == "hbm":
            self._write_hbm_stored(table, first_row, rows, scale_bias)
        else:
            assert self.host is not None
            self.host.write_rows(self._host_index(table), first_row, rows, scale_bias)
            self._forget_cached(table)

    def _write_hbm(self, table: int, first_row: int, weight: torch.Tensor) -> None:
        t = self.tables[table]
        if t.dtype == "int8":
            q, sb = quantize_rowwise(weight.float())
            self._write_hbm_stored(table, first_row, q, sb)
        else:
            self._write_hbm_stored(table, first_row, weight.to(TORCH_DTYPES[t.dtype]), None)

    def _write_hbm_stored(
        self, table: int, first_row: int, rows: torch.Tensor, scale_bias: torch.Tensor | None
    ) -> None:
        t = self.tables[table]
        dtype = TORCH_DTYPES[t.dtype]
        view = self._hbm_rows(table)
        n = int(rows.shape[0])
        dest = view[first_row : first_row + n]
        dest[:, : t.dim * dtype.itemsize].view(dtype).copy_(rows)
        if t.dtype == "int8":
            if scale_bias is None:
                raise ValueError("int8 rows need their scale and bias")
            so = self.layouts[table].scale_off
            dest[:, so : so + 8].view(torch.float32).copy_(scale_bias)

    def _forget_cached(self, table: int) -> None:
        if self.cache is not None and self.placements[table] == "host+cache":
            g = self.gid_base[table]
            self.cache.drop(g, g + self.tables[table].num_rows)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """DLRM's initialisation: rows uniform in ±sqrt(1 / rows), drawn in chunks."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        for i, t in enumerate(self.tables):
            bound = math.sqrt(1.0 / t.num_rows)
            step = max(1, (64 << 20) // (t.dim * 4))
            for s in range(0, t.num_rows, step):
                n = min(step, t.num_rows - s)
                rows = torch.rand(n, t.dim, generator=generator, device=gen_device)
                rows = rows.mul_(2 * bound).sub_(bound)
                if self.placements[i] == "hbm":
                    self._write_hbm(i, s, rows.to(self.device))
                else:
                    assert self.host is not None
                    self.host.write_float_rows(self._host_index(i), s, rows)
            self._forget_cached(i)

    def stored(self, table: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A table's rows in its dtype ``[rows, D]`` (int8: and ``[rows, 2]`` scale/bias) —
        views of host or device memory."""
        t = self.tables[table]
        if self.placements[table] != "hbm":
            assert self.host is not None
            k = self._host_index(table)
            return self.host.codes(k), self.host.scale_bias(k)
        dtype = TORCH_DTYPES[t.dtype]
        view = self._hbm_rows(table)
        codes = view[:, : t.dim * dtype.itemsize].view(dtype)
        if t.dtype != "int8":
            return codes, None
        so = self.layouts[table].scale_off
        return codes, view[:, so : so + 8].view(torch.float32)

    def dense_weight(self, table: int) -> torch.Tensor:
        """Float32 rows ``[rows, D]`` (on the host for host tables: they may be large)."""
        codes, sb = self.stored(table)
        if sb is None:
            return codes.float()
        return codes.float() * sb[:, :1] + sb[:, 1:]

    def load_safetensors(self, path: str, prefix: str = "sparse.backend.") -> None:
        """Stream every table from a model's safetensors file (``save_model`` layout), a chunk
        at a time: loading never holds a second full copy of a table in memory."""
        from safetensors import safe_open

        host_keys = {}
        for i, t in enumerate(self.tables):
            key, sb_key = state_dict_keys(i, t.dtype)
            sb_name = prefix + sb_key if sb_key else None
            if self.placements[i] != "hbm":
                host_keys[self._host_index(i)] = (prefix + key, sb_name)
                continue
            with safe_open(path, framework="pt", device="cpu") as f:
                w = f.get_tensor(prefix + key)
                sb = f.get_tensor(sb_name) if sb_name else None
            if sb is not None:
                self._write_hbm_stored(i, 0, w.to(self.device), sb.to(self.device))
            else:
                self._write_hbm(i, 0, w.to(self.device))
        if self.host is not None:
            self.host.load_safetensors(path, host_keys)
            for i in self.host_order:
                self._forget_cached(i)

    def _save_to_state_dict(
        self, destination: dict[str, torch.Tensor], prefix: str, keep_vars: bool
    ) -> None:
        for i, t in enumerate(self.tables):
            key, sb_key = state_dict_keys(i, t.dtype)
            codes, sb = self.stored(i)
            destination[prefix + key] = codes
            if sb_key is not None and sb is not None:
                destination[prefix + sb_key] = sb

    def _load_from_state_dict(
        self,
        state_dict: dict[str, torch.Tensor],
        prefix: str,
        local_metadata: dict[str, object],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        expected = set()
        for i, t in enumerate(self.tables):
            key, sb_key = state_dict_keys(i, t.dtype)
            expected.update({prefix + key} | ({prefix + sb_key} if sb_key else set()))
            if prefix + key not in state_dict or (sb_key and prefix + sb_key not in state_dict):
                missing_keys.append(prefix + key)
                continue
            w = state_dict[prefix + key]
            if tuple(w.shape) != (t.num_rows, t.dim):
                error_msgs.append(
                    f"{prefix + key}: shape {list(w.shape)} != [{t.num_rows}, {t.dim}]"
                )
                continue
            sb = state_dict[prefix + sb_key] if sb_key else None
            if sb is not None or w.dtype == TORCH_DTYPES[t.dtype]:
                self.load_stored(i, 0, w, sb)
            else:
                self.load_table(i, w)
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected)

    def close(self) -> None:
        """Release host memory (unregister, unmap) and the device buffers."""
        if self.host is not None:
            self.host.release()
            self.host = None
        self.cache = None
        self.stage = torch.zeros(0, dtype=torch.uint8, device=self.device)
        self.hbm = torch.zeros(0, dtype=torch.uint8, device=self.device)

    # ------------------------------------------------------------------ lookups

    def _arena_arg(self, dtype: torch.dtype) -> object:
        if self.host is None:
            return self.hbm.view(dtype)
        return self.host.arena.kernel_arg(dtype)

    def _arena_tensor(self, dtype: torch.dtype) -> torch.Tensor:
        if self.host is None:
            return self.hbm.view(dtype)
        return self.host.arena.tensor(dtype)

    def _stage_for(self, n: int) -> torch.Tensor:
        need = max(n, 1) * self.stage_bytes
        if self.stage.numel() < need:
            self.stage = torch.empty(need, dtype=torch.uint8, device=self.device)
        return self.stage

    def _load_slots(self, gids: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy host rows ``gids`` into cache ``slots`` (the cache's loader)."""
        assert self.cache is not None
        self._gather(gids.to(self.gid_dtype), self.cache.slots, self.cache.slot_bytes, slots)

    def _gather(
        self, gids: torch.Tensor, out: torch.Tensor, out_bytes: int, dest: torch.Tensor | None
    ) -> None:
        max_words = self.stage_bytes // 4
        if self.use_triton:
            gather_rows(
                gids,
                self.row_bounds,
                self.row_meta,
                self._arena_arg(torch.int32),
                out.view(torch.int32),
                out_bytes // 4,
                max_words,
                self.sentinel,
                dest=dest,
                rows=self.options.gather_rows,
                num_warps=self.options.gather_warps,
            )
        else:
            gather_rows_reference(
                gids.to(self.device),
                self.row_bounds,
                self.row_meta,
                self._arena_tensor(torch.int32).to(self.device),
                out.view(torch.int32),
                out_bytes // 4,
                self.sentinel,
                dest=dest,
            )

    def _dedup(self, values: torch.Tensor, offsets: torch.Tensor, b: int) -> torch.Tensor:
        """Gather the batch's unique host rows into staging; returns ``inverse``. With a cache,
        cached rows are staged from the cache and the policy records each distinct row once."""
        n = values.numel()
        gids = torch.full((n,), self.sentinel, dtype=self.gid_dtype, device=values.device)
        if self.use_triton:
            globalize(self._meta_all_dev, len(self.tables), values, offsets, b, gids, self.sentinel)
        else:
            globalize_reference(self._meta_all, values, offsets, b, gids, self.sentinel)
        share = self._unique_share
        measure = share is not None and self.options.path == "auto" and share.ready()
        stage = self._stage_for(n)
        if self.cache is None:
            unique, inverse = dedup_ids(gids, self.sentinel)
            self._gather(unique, stage, self.stage_bytes, None)
            if measure and share is not None:
                distinct = (unique != self.sentinel).sum()
                share.push(torch.stack([distinct, (gids != self.sentinel).sum()]))
            return inverse
        unique, inverse, counts = dedup_ids(gids, self.sentinel, with_counts=True)
        tally = self._tally.zero_() if measure else None
        self._gather_unique(unique, counts, stage, tally)
        if tally is not None and share is not None:
            share.push(tally.sum(0))  # distinct uncached rows, host lookups
        return inverse

    def _gather_unique(
        self,
        unique: torch.Tensor,
        counts: torch.Tensor,
        stage: torch.Tensor,
        tally: torch.Tensor | None,
    ) -> None:
        cache = self.cache
        assert cache is not None
        kw: dict[str, object] = {
            "cache_stride_words": cache.slot_bytes // 4,
            "slot_map": cache.slot_map,
            "num_cached": self.num_cached_ids,
            "score": cache.score,
            "record": cache.record_mode,
            "tick": cache.tick,
            "stats": cache.stats,
            "stat_table": self._stat_table,
            "tally": tally,
        }
        words = self.stage_bytes // 4
        if self.use_triton:
            gather_unique(
                unique,
                counts,
                self.row_bounds,
                self.row_meta,
                self._arena_arg(torch.int32),
                stage.view(torch.int32),
                words,
                words,
                self.sentinel,
                cache=cache.slots.view(torch.int32),
                rows=self.options.gather_rows,
                num_warps=self.options.gather_warps,
                **kw,  # type: ignore[arg-type]
            )
        else:
            gather_unique_reference(
                unique,
                counts,
                self.row_bounds,
                self.row_meta,
                self._arena_tensor(torch.int32).to(self.device),
                stage.view(torch.int32),
                words,
                self.sentinel,
                cache=cache.slots.view(torch.int32),
                **kw,  # type: ignore[arg-type]
            )

    def _choose_path(self, values: torch.Tensor, b: int, key_offsets: list[int] | None) -> str:
        if not self.host_order:
            return "inplace"
        if self.options.path != "auto":
            return self.options.path
        self._poll_estimates()
        if key_offsets is not None:
            counts = [key_offsets[i + 1] - key_offsets[i] for i in range(len(self.tables))]
        else:  # values may run past our tables: a per-table share is enough for an estimate
            counts = [values.numel() // len(self.tables)] * len(self.tables)
        n = sum(counts[i] for i in self.host_order)
        host_bytes = float(sum(counts[i] * self.layouts[i].row_bytes for i in self.host_order))
        span = float(self.host.nbytes) if self.host is not None else 0.0
        path = self.options.cost.choose(n, host_bytes, self.est_miss, self.est_unique, span)
        if path == "inplace" and self._unique_share is not None and n:
            self._since_probe += 1
            if self._since_probe >= self.options.probe_every:
                path = "dedup"
        if path == "dedup":
            self._since_probe = 0
        return path

    def _poll_estimates(self) -> None:
        if self._unique_share is not None:
            got = self._unique_share.poll()
            if got is not None and got[1] > 0:
                self.est_unique = 0.5 * self.est_unique + 0.5 * got[0] / got[1]
        if self._hit_share is not None and self.cache is not None:
            got = self._hit_share.poll()
            if got is not None:
                if self._last_counts is not None:
                    lookups, hits = got - self._last_counts
                    if lookups > 0:
                        self.est_miss = 0.5 * self.est_miss + 0.5 * (1.0 - hits / lookups)
                self._last_counts = got
            if self._hit_share.ready():
                self._hit_share.push(self.cache.stats.sum(dim=(0, 1)))

    def pooled(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        batch_size: int,
        weights: torch.Tensor | None = None,
        key_offsets: list[int] | None = None,
    ) -> torch.Tensor:
        out = torch.empty(batch_size, self.output_dim, dtype=torch.float32, device=values.device)
        path = self._choose_path(values, batch_size, key_offsets)
        inverse = self._dedup(values, offsets, batch_size) if path == "dedup" else None
        n = key_offsets[len(self.tables)] if key_offsets is not None else values.numel()
        long_bags = n >= self.options.short_bag * batch_size * len(self.tables)
        config = self.options.inplace if long_bags else self.options.inplace_short
        for dtype, group in self._groups:
            self._launch(group, dtype, values, offsets, batch_size, out, weights, inverse, config)
        self.path_counts[path] += 1
        if self.cache is not None:
            self.cache.after_lookup()
        return out

    def rows(self, table: int, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        n = flat.numel()
        out = torch.empty(n, self.tables[table].dim, dtype=torch.float32, device=flat.device)
        offsets = torch.arange(n + 1, device=flat.device)
        self._launch(
            self._single[table],
            self.tables[table].dtype,
            flat,
            offsets,
            n,
            out,
            None,
            None,
            config=_ROWS_CONFIG,
        )
        return out

    def _launch(
        self,
        group: TierGroup,
        dtype_name: str,
        values: torch.Tensor,
        offsets: torch.Tensor,
        b: int,
        out: torch.Tensor,
        weights: torch.Tensor | None,
        inverse: torch.Tensor | None,
        config: TierConfig | None = None,
    ) -> None:
        dtype = TORCH_DTYPES[dtype_name]
        elem = dtype.itemsize
        # After dedup every host row (cached ones included) is in staging, already counted.
        cache = self.cache if inverse is None else None
        kw: dict[str, object] = {
            "per_sample_weights": weights,
            "stage_stride": self.stage_bytes // elem,
            "inverse": inverse,
        }
        if cache is not None:
            kw.update(
                cache_stride=cache.slot_bytes // elem,
                slot_map=cache.slot_map,
                score=cache.score,
                record=cache.record_mode,
                tick=cache.tick,
                stats=cache.stats,
            )
        if self.use_triton:
            tiered_pooled(
                group,
                values,
                offsets,
                b,
                out,
                host=self._arena_arg(dtype),
                hbm=self.hbm.view(dtype),
                config=config or self.options.inplace,
                stage=self.stage.view(dtype) if inverse is not None else None,
                cache=cache.slots.view(dtype) if cache is not None else None,
                **kw,  # type: ignore[arg-type]
            )
        else:
            tiered_pooled_reference(
                group,
                values,
                offsets,
                b,
                out,
                host=self._arena_tensor(dtype),
                hbm=self.hbm.view(dtype),
                stage=self.stage.view(dtype) if inverse is not None else None,
                cache=cache.slots.view(dtype) if cache is not None else None,
                **kw,  # type: ignore[arg-type]
            )

    # ------------------------------------------------------------------ statistics

    def cache_stats(self) -> dict[str, dict[str, float]]:
        """Lookups, hits and hit rate per cached table since the last reset (syncs)."""
        if self.cache is None:
            return {}
        counts = self.cache.counts()
        out = {}
        for i, t in enumerate(self.tables):
            if self.placements[i] != "host+cache":
                continue
            lookups, hits = (int(x) for x in counts[i])
            out[t.name] = {
                "lookups": lookups,
                "hits": hits,
                "hit_rate": hits / lookups if lookups else 0.0,
            }
        return out

    def prewarm(self, counts: Sequence[torch.Tensor]) -> None:
        """Pre-warm the cache from access counts, one ``[rows]`` tensor per table (tables
        that are not cached are skipped)."""
        if self.cache is None:
            raise ValueError("this backend has no cache (no table is placed host+cache)")
        cached = [i for i in self.host_order if self.placements[i] == "host+cache"]
        self.cache.prewarm([counts[i].to(self.device) for i in cached])


def tiered_backend_factory(
    device: torch.device | str = "cuda",
    placements: dict[str, str] | None = None,
    **kw: object,
) -> object:
    """A ``backend_factory`` for :class:`~recserve.embedding.EmbeddingCollection` that serves
    its tables with a :class:`TieredBackend` (``placements``: table name -> placement, else each
    table's own)."""

    def build(tables: tuple[TableConfig, ...]) -> EmbeddingBackend:
        places = None
        if placements is not None:
            places = [placements.get(t.name, t.placement) for t in tables]
        return TieredBackend(tables, device, placements=places, **kw)  # type: ignore[arg-type]

    return build


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m
