"""The CPU-mediated peer: host tables looked up the way HugeCTR's HPS does it.

The CPU deduplicates the batch's ids, gathers each unique row from host DRAM into a pinned
staging buffer, the staging goes to the GPU in one copy, and the GPU pools from it. Done well,
so the comparison with GPU-driven reads is fair:

- dedup without sorting: a direct map ``slot_of[id]`` (as HPS's hash table) is written with
  each position, read back to find one representative per id, and numbered — all vectorised
  torch ops over chunks of ids, run by a pool of threads;
- gather with the same pool, each thread ``index_select``-ing a chunk of rows straight into
  the pinned staging (torch's own intra-op threads are set to one meanwhile, so threads do not
  oversubscribe the cores);
- one host-to-device copy of the unique rows and one of the inverse ids, then the same pooling
  kernel as the GPU paths (:func:`recserve.kernels.host.tiered_pooled`) reading the staged rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from recserve.config import TORCH_DTYPES
from recserve.kernels.host import SOURCE_HBM, TIER_FIELDS, TierGroup, tiered_pooled
from recserve.kernels.host import tiered_pooled_reference as _pooled_reference
from recserve.storage.tiered import TieredBackend


class CpuMediatedLookup:
    """Pooled lookups of a :class:`TieredBackend`'s host tables through the CPU (every table
    must be on the host, with one row stride)."""

    def __init__(self, backend: TieredBackend, threads: int | None = None) -> None:
        if backend.host is None or len(backend.host_order) != len(backend.tables):
            raise ValueError("the CPU-mediated path serves backends whose tables are all on host")
        strides = {backend.layouts[i].stride for i in backend.host_order}
        if len(strides) != 1:
            raise ValueError(f"the CPU-mediated path needs one row stride, got {sorted(strides)}")
        self.backend = backend
        self.host = backend.host
        self.stride = strides.pop()
        self.device = backend.device
        self.threads = threads or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.threads)
        self.slot_of = torch.zeros(backend.num_host_ids, dtype=torch.int64)
        self.gid_base = torch.tensor([backend.gid_base[i] for i in range(len(backend.tables))])
        self.pinned = torch.empty(0, dtype=torch.uint8)
        self.pinned_inverse = torch.empty(0, dtype=torch.int64)
        self.staged = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.groups = [(name, self._staged_group(g)) for name, g in backend._groups]
        self.use_triton = backend.use_triton
        self._copied: torch.cuda.Event | None = None
        self._pin = self.device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}

    def _staged_group(self, group: TierGroup) -> TierGroup:
        meta = group.meta_host.clone()
        elem = 16 // group.vec
        meta[:, TIER_FIELDS.index("source")] = SOURCE_HBM
        meta[:, TIER_FIELDS.index("base")] = 0
        meta[:, TIER_FIELDS.index("stride")] = self.stride // elem
        return TierGroup(
            meta.to(self.device), meta, group.block_d, group.vec, group.quant, any_cached=False
        )

    def _chunks(self, n: int, fn: Callable[[int, int], None]) -> None:
        step = max(4096, -(-n // self.threads))
        futures = [self.pool.submit(fn, s, min(s + step, n)) for s in range(0, n, step)]
        for f in futures:
            f.result()

    def _grow(self, unique_bytes: int, n: int) -> None:
        if self.pinned.numel() < unique_bytes:
            self.pinned = torch.empty(unique_bytes, dtype=torch.uint8, pin_memory=self._pin)
            self.staged = torch.empty(unique_bytes, dtype=torch.uint8, device=self.device)
        if self.pinned_inverse.numel() < n:
            self.pinned_inverse = torch.empty(n, dtype=torch.int64, pin_memory=self._pin)

    @torch.no_grad()
    def pooled(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        batch_size: int,
        key_offsets: list[int],
        offsets_device: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled ``[B, ΣD]`` on the GPU from ids and offsets on the host (KeyedJagged layout);
        ``offsets_device`` is the same offsets already on the device, if the caller has it."""
        if self._copied is not None:  # the staging is reused: the last copy must be done
            self._copied.synchronize()
        threads_before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            unique_rows, inverse = self._dedup_gather(values, key_offsets)
        finally:
            torch.set_num_threads(threads_before)
        n = inverse.numel()
        nbytes = unique_rows * self.stride
        staged = self.staged[:nbytes]
        staged.copy_(self.pinned[:nbytes], non_blocking=True)
        inv = self.pinned_inverse[:n].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        off = offsets_device if offsets_device is not None else offsets.to(self.device)
        out = torch.empty(
            batch_size, self.backend.output_dim, dtype=torch.float32, device=self.device
        )
        for name, group in self.groups:
            dtype = TORCH_DTYPES[name]
            stage = self.staged.view(dtype)
            if self.use_triton:
                tiered_pooled(group, inv, off, batch_size, out, host=stage, hbm=stage)
            else:
                _pooled_reference(group, inv, off, batch_size, out, host=stage, hbm=stage)
        return out

    def _scratch(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            if name == "positions":
                torch.arange(n, out=buf)
            self._buffers[name] = buf
        return buf[:n]

    def _dedup_gather(
        self, values: torch.Tensor, key_offsets: list[int]
    ) -> tuple[int, torch.Tensor]:
        """Unique rows into ``pinned`` (grouped by table), inverse ids into ``pinned_inverse``.

        Every step runs on the thread pool over chunks, with ops that release the GIL."""
        num_tables = len(self.backend.tables)
        n = key_offsets[num_tables]
        gids = self._scratch("gids", n, torch.int64)
        positions = self._scratch("positions", n, torch.int64)
        looked_up = self._scratch("looked_up", n, torch.int64)
        is_rep = self._scratch("is_rep", n, torch.bool)
        slot_of = self.slot_of
        for t in range(num_tables):  # shared-space ids: values + the table's first id
            lo, base = key_offsets[t], self.backend.gid_base[t]

            def shift(s: int, e: int, lo: int = lo, base: int = base) -> None:
                torch.add(values[lo + s : lo + e], base, out=gids[lo + s : lo + e])

            self._chunks(key_offsets[t + 1] - lo, shift)

        def claim(s: int, e: int) -> None:  # any one position of each id wins
            slot_of.index_put_((gids[s:e],), positions[s:e])

        def mark(s: int, e: int) -> None:
            torch.index_select(slot_of, 0, gids[s:e], out=looked_up[s:e])
            torch.eq(looked_up[s:e], positions[s:e], out=is_rep[s:e])

        self._chunks(n, claim)
        self._chunks(n, mark)
        parts: dict[int, torch.Tensor] = {}

        def find(s: int, e: int) -> None:
            parts[s] = is_rep[s:e].nonzero().squeeze(1).add_(s)

        self._chunks(n, find)
        reps = torch.cat([parts[k] for k in sorted(parts)]) if parts else positions[:0]
        u = reps.numel()
        rep_gids = self._scratch("rep_gids", u, torch.int64)

        def number(s: int, e: int) -> None:
            torch.index_select(gids, 0, reps[s:e], out=rep_gids[s:e])
            slot_of.index_put_((rep_gids[s:e],), positions[s:e])

        self._chunks(u, number)
        self._grow(u * self.stride, n)
        inverse = self.pinned_inverse[:n]

        def invert(s: int, e: int) -> None:
            torch.index_select(slot_of, 0, gids[s:e], out=inverse[s:e])

        self._chunks(n, invert)
        # Representatives are in position order, so each table's unique rows are contiguous.
        bounds = torch.searchsorted(reps, torch.tensor(key_offsets)).tolist()
        staging = self.pinned[: u * self.stride].view(u, self.stride)
        for t in range(num_tables):
            lo, hi = bounds[t], bounds[t + 1]
            if hi == lo:
                continue
            src = self.host.row_view(self.backend._host_index(t))
            base = self.backend.gid_base[t]

            def gather(
                s: int, e: int, src: torch.Tensor = src, lo: int = lo, base: int = base
            ) -> None:
                rows = rep_gids[lo + s : lo + e] - base
                torch.index_select(src, 0, rows, out=staging[lo + s : lo + e])

            self._chunks(hi - lo, gather)
        return u, inverse

    def close(self) -> None:
        self.pool.shutdown()
