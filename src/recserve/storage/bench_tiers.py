"""The tiered-storage benchmark (issue 4): host rows read in place, dedup, cache+host, CPU peer.

One run, on one registered host arena of ``host_gib`` (filled once, from the GPU, with random
floats) that every table set views:

1. ceilings: host-to-device copy bandwidth from the registered arena and from a pinned buffer;
2. tuning: a few launch configurations of the in-place kernel and of the gather kernel;
3. per id distribution (uniform, Zipf 1.05, Zipf 1.2): pre-warm the shared cache (10% of the
   rows) from access counts of a sample, measure its hit rate over a stream with LFU and LRU
   (refreshed every ``refresh_every`` batches) against the static top-K oracle, then time every
   batch x pooling case: in place, dedup, cache+host (both ways, per policy of ``policies``,
   each from the same pre-warmed contents, refresh excluded; one refresh is timed on its own
   and reported amortised over ``refresh_every`` batches) and the CPU-mediated peer, each
   checked against a float64 reference on the CPU first;
4. the same (uniform) for other row sizes;
5. fit the cost rule to the timings and report what it picks.

Every figure is unique-row bytes over time (what must cross PCIe at least once), as GB/s and as
a fraction of the copy ceiling. The JSON starts with the ``summary`` the issue's targets name.
Each cached case also counts the distinct 64 KiB host pages that its unique rows and its unique
cache misses touch (host reads here pay per distinct page: ``recserve.storage.cost``), whose
ratio bounds what the cache can gain over a host path that deduplicates. Shares per case:
``unique_share`` is unique rows / lookups, ``cache_unique_miss_share`` unique missed rows /
lookups, ``cache_unique_miss_of_unique`` unique missed rows / unique rows (the share of the
host-only path's rows the cache still has to read from the host).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recserve.bench.common import git_commit
from recserve.config import Placement, TableConfig
from recserve.kernels.host import TierConfig
from recserve.loadgen.ids import IdDistribution
from recserve.storage.cache import POLICIES as CACHE_POLICIES
from recserve.storage.cache import CacheConfig
from recserve.storage.cost import PathCost, fit_path_cost
from recserve.storage.cpu_mediated import CpuMediatedLookup
from recserve.storage.host import HostArena
from recserve.storage.tiered import TieredBackend, TieredOptions

INPLACE_CANDIDATES = (
    TierConfig(1, 16, 4),
    TierConfig(1, 32, 4),
    TierConfig(1, 32, 8),
    TierConfig(1, 64, 8),
    TierConfig(2, 16, 4),
    TierConfig(4, 8, 4),
)
GATHER_CANDIDATES = ((16, 4), (32, 4), (64, 4), (32, 8), (64, 8))
PAGE_BYTES = 1 << 16
"""Host pages as the page-bound cost model counts them (``PathCost.page_bytes``)."""


@dataclass
class TiersOptions:
    out: Path
    host_gib: float = 16.0
    tables: int = 8
    row_bytes: int = 256
    sweep_row_bytes: tuple[int, ...] = (64, 128, 512)
    sweep_cases: tuple[tuple[int, int], ...] = ((2048, 80), (16384, 20))
    dists: tuple[str, ...] = ("uniform", "zipf:1.05", "zipf:1.2")
    batches: tuple[int, ...] = (2048, 16384)
    poolings: tuple[int, ...] = (1, 20, 80)
    cache_frac: float = 0.10
    sets: int = 3
    reps: int = 5
    hit_batches: int = 12
    hit_shape: tuple[int, int] = (16384, 20)
    refresh_every: int = 4
    """Cache refresh period (batches) of the hit-rate stream and of the amortised refresh cost."""
    policies: tuple[str, ...] = ("lfu", "lru")
    """Cache policies timed per case (``lfu`` gives the ``cache_*`` variants, others
    ``cache_<policy>_*``)."""
    prewarm_factor: float = 1.0
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    device: str = "cuda"
    commit: str = ""
    seed: int = 0
    budget_s: float = 390.0
    check_bags: int = 64
    tune: bool = True
    host_alloc: str = "register"

    def __post_init__(self) -> None:
        bad = [p for p in self.policies if p not in CACHE_POLICIES]
        if bad:
            raise ValueError(f"cache policies must be among {list(CACHE_POLICIES)}, got {bad}")
        if self.refresh_every < 0:
            raise ValueError("refresh_every must be >= 0 (batches between refreshes; 0: never)")


class GpuIds:
    """Ids of one table drawn on the device: uniform, or Zipf over a random permutation of the
    rows (inverse CDF on a geometric grid of ranks, as :class:`recserve.loadgen.ids.IdSampler`)."""

    def __init__(self, num_rows: int, spec: str, seed: int, device: torch.device) -> None:
        self.num_rows = num_rows
        self.dist = IdDistribution.parse(spec)
        self.device = device
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)
        self.perm: torch.Tensor | None = None
        if self.dist.kind == "zipf":
            self.perm = torch.randperm(num_rows, generator=self.gen, device=device)
            grid = 1 << 20
            if num_rows <= grid:
                ranks = np.arange(1, num_rows + 1, dtype=np.float64)
            else:
                ranks = np.unique(np.geomspace(1, num_rows, grid).round())
            w = ranks ** (-self.dist.alpha) * np.diff(np.append(ranks, num_rows + 1))
            cdf = np.cumsum(w)
            self.cdf = torch.tensor(cdf / cdf[-1], device=device)
            self.ranks = torch.tensor(ranks.astype(np.int64) - 1, device=device)
            self.next = torch.tensor(
                np.append(ranks[1:] - 1, num_rows).astype(np.int64), device=device
            )
        elif self.dist.kind != "uniform":
            raise ValueError(f"the benchmark draws uniform or zipf ids, got {spec!r}")

    def sample(self, n: int) -> torch.Tensor:
        if self.perm is None:
            return torch.randint(0, self.num_rows, (n,), generator=self.gen, device=self.device)
        u = torch.rand(n, generator=self.gen, device=self.device, dtype=torch.float64)
        pos = torch.searchsorted(self.cdf, u).clamp_(max=self.cdf.numel() - 1)
        lo, hi = self.ranks[pos], self.next[pos]
        spread = torch.rand(n, generator=self.gen, device=self.device, dtype=torch.float64)
        rank = (lo + (spread * (hi - lo).double()).long()).clamp_(max=self.num_rows - 1)
        return self.perm[rank]

    def hot_mask(self, k: int) -> torch.Tensor:
        """The ``k`` most likely rows (the static top-K oracle's cache) as a mask."""
        mask = torch.zeros(self.num_rows, dtype=torch.bool, device=self.device)
        if self.perm is None:
            mask[:k] = True  # uniform: any k rows are as good
        else:
            mask[self.perm[:k]] = True
        return mask


@dataclass
class Batch:
    values: torch.Tensor
    offsets: torch.Tensor
    key_offsets: list[int]
    values_cpu: torch.Tensor
    offsets_cpu: torch.Tensor
    unique_rows: int
    gids: torch.Tensor


def make_batch(streams: Sequence[GpuIds], batch: int, pooling: int) -> Batch:
    """``batch`` items, ``pooling`` ids per item per table (feature-major, fixed bags)."""
    t = len(streams)
    device = streams[0].device
    values = torch.cat([s.sample(batch * pooling) for s in streams])
    offsets = torch.arange(t * batch + 1, device=device, dtype=torch.int64) * pooling
    rows = torch.tensor([s.num_rows for s in streams], device=device)
    base = torch.cumsum(rows, 0) - rows
    gids = values + base.repeat_interleave(batch * pooling)
    unique = int(torch.unique(gids).numel())
    key_offsets = [i * batch * pooling for i in range(t + 1)]
    return Batch(values, offsets, key_offsets, values.cpu(), offsets.cpu(), unique, gids)


def reference_check(out: torch.Tensor, b: Batch, backend: TieredBackend, bags: int) -> float:
    """Relative error of the first and last ``bags / 2`` items of ``out`` against float64 sums
    of the stored rows, read on the CPU."""
    assert backend.host is not None
    batch = out.shape[0]
    half = max(1, min(bags // 2, batch // 2))
    items = torch.cat([torch.arange(half), torch.arange(batch - half, batch)]).unique()
    ref = torch.zeros(items.numel(), backend.output_dim, dtype=torch.float64)
    for t in range(len(backend.tables)):
        codes = backend.host.codes(backend._host_index(t))
        bag = t * batch + items
        lo, hi = b.offsets_cpu[bag], b.offsets_cpu[bag + 1]
        col = backend.cols[t]
        for j in range(items.numel()):
            ids = b.values_cpu[int(lo[j]) : int(hi[j])]
            ref[j, col : col + backend.tables[t].dim] = codes[ids].double().sum(0)
    got = out[items.to(out.device)].double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp(min=1e-30))


def host_pages(backend: TieredBackend, gids: torch.Tensor) -> int:
    """Distinct ``PAGE_BYTES`` pages of host memory that rows ``gids`` (ids of the backend's
    host id space) lie in."""
    if gids.numel() == 0:
        return 0
    g = gids.long()
    table = torch.searchsorted(backend.row_bounds[1:].contiguous(), g, right=True)
    meta = backend.row_meta[table]
    word = meta[:, 0] + (g - backend.row_bounds[table]) * meta[:, 1]
    return int(torch.unique(word * 4 // PAGE_BYTES).numel())


def _gpu_us(calls: Sequence[Callable[[], object]], reps: int) -> float:
    """Median microseconds per call, cycling through ``calls`` (one per input set)."""
    for fn in calls:
        fn()
    if not torch.cuda.is_available():
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            for fn in calls:
                fn()
            samples.append((time.perf_counter() - start) * 1e6 / len(calls))
        return statistics.median(samples)
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(reps):
        begin.record()
        for fn in calls:
            fn()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(samples)


def _wall_us(calls: Sequence[Callable[[], object]], reps: int) -> float:
    """Median wall-clock microseconds per call, each call waited for (host-driven paths)."""
    _sync()
    samples = []
    for r in range(reps + 1):
        for fn in calls:
            start = time.perf_counter()
            fn()
            _sync()
            if r:
                samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_ceiling(arena: HostArena, device: torch.device, nbytes: int = 1 << 30) -> dict[str, Any]:
    """Host-to-device copy bandwidth from the registered arena and from a pinned tensor."""
    n = min(nbytes, arena.nbytes)
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    src = arena.tensor(torch.uint8)[:n]
    out: dict[str, Any] = {"bytes": n, "arena_is_pinned": bool(src.is_pinned())}
    us = _gpu_us([lambda: dst.copy_(src, non_blocking=True)], 7)
    out["registered_gbps"] = n / us / 1e3
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    us = _gpu_us([lambda: dst.copy_(pinned, non_blocking=True)], 7)
    out["pinned_gbps"] = n / us / 1e3
    us = _gpu_us([lambda: pinned.copy_(dst, non_blocking=True)], 7)
    out["d2h_gbps"] = n / us / 1e3
    out["gbps"] = max(out["registered_gbps"], out["pinned_gbps"])
    return out


def fill_arena(arena: HostArena, device: torch.device, seed: int) -> float:
    """Random floats in [-1, 1) over the whole arena, drawn on the device and copied over."""
    start = time.perf_counter()
    flat = arena.tensor(torch.float32)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    chunk = 1 << 28
    for s in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - s)
        block = torch.rand(n, generator=gen, device=device).mul_(2).sub_(1)
        flat[s : s + n].copy_(block)
    _sync()
    return time.perf_counter() - start


def table_set(
    opts: TiersOptions, arena: HostArena, row_bytes: int, placement: Placement
) -> tuple[TableConfig, ...]:
    dim = row_bytes // 4
    stride = max(128, -(-row_bytes // 128) * 128)
    rows = arena.nbytes // opts.tables // stride
    return tuple(
        TableConfig(f"t{i}", rows, dim, lookups=1, placement=placement) for i in range(opts.tables)
    )


class Bench:
    """The state of one run: arena, backends, results."""

    def __init__(self, opts: TiersOptions) -> None:
        self.opts = opts
        self.device = torch.device(opts.device)
        self.t0 = time.perf_counter()
        self.log: list[str] = []
        self.cases: list[dict[str, Any]] = []
        self.cache_runs: list[dict[str, Any]] = []
        self.tuning: dict[str, Any] = {}
        self.skipped: list[str] = []
        self.errors: list[dict[str, str]] = []
        self.ceilings: dict[str, Any] = {"gbps": 1.0}
        self.ceiling = 1.0
        self.prewarm_counts: list[torch.Tensor] | None = None

    def say(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log.append(line)

    def guarded(self, name: str, fn: Callable[..., dict[str, Any] | None], *args: Any) -> None:
        """Run one step; an exception is recorded (and the run goes on); results so far are
        written out after every step, so a run cut short still leaves its numbers."""
        try:
            case = fn(*args)
        except Exception as exc:  # one broken case must not lose the others
            self.errors.append({"step": name, "error": repr(exc), "trace": traceback.format_exc()})
            self.say(f"{name}: FAILED {exc!r}")
            _sync()
            return
        if case is not None:
            self.cases.append(case)
            self.say(_case_line(name, case))
        try:
            self.report(plot=False)
        except Exception as exc:
            self.say(f"writing results failed: {exc!r}")

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.opts.budget_s

    # -------------------------------------------------------------- per case

    def measure(
        self,
        host: TieredBackend,
        peer: CpuMediatedLookup | None,
        cached: TieredBackend | None,
        streams: Sequence[GpuIds],
        dist: str,
        batch: int,
        pooling: int,
        oracle_masks: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        o = self.opts
        sets = [make_batch(streams, batch, pooling) for _ in range(o.sets)]
        row_bytes = host.tables[0].dim * 4
        lookups = len(streams) * batch * pooling
        unique = statistics.mean(s.unique_rows for s in sets)
        case: dict[str, Any] = {
            "dist": dist,
            "batch": batch,
            "pooling": pooling,
            "row_bytes": row_bytes,
            "tables": len(streams),
            "lookups": lookups,
            "unique_rows": unique,
            "unique_share": unique / lookups,
            "unique_bytes": unique * row_bytes,
            "span_bytes": host.host.nbytes if host.host is not None else 0,
            "variants": {},
        }
        if oracle_masks is not None:
            hits = sum(
                float(
                    oracle_masks[t][s.values[t * batch * pooling : (t + 1) * batch * pooling]].sum()
                )
                for s in sets
                for t in range(len(streams))
            )
            case["oracle_hit"] = hits / (lookups * len(sets))

        def gpu(name: str, backend: TieredBackend, path: str) -> None:
            backend.options.path = path
            first = sets[0]
            out = backend.pooled(first.values, first.offsets, batch, None, first.key_offsets)
            err = reference_check(out, first, backend, o.check_bags)
            calls = [
                lambda s=s: backend.pooled(s.values, s.offsets, batch, None, s.key_offsets)
                for s in sets
            ]
            self._record(case, name, _gpu_us(calls, o.reps), err)

        gpu("inplace", host, "inplace")
        gpu("dedup", host, "dedup")
        if cached is not None and cached.cache is not None and o.policies:
            case["host_pages"] = statistics.mean(
                host_pages(host, torch.unique(s.gids)) for s in sets
            )
            for policy in o.policies:
                self._measure_cache(case, cached, policy, sets, gpu)
        if peer is not None:
            first = sets[0]
            out = peer.pooled(
                first.values_cpu, first.offsets_cpu, batch, first.key_offsets, first.offsets
            )
            err = reference_check(out, first, host, o.check_bags)
            calls = [
                lambda s=s: peer.pooled(
                    s.values_cpu, s.offsets_cpu, batch, s.key_offsets, s.offsets
                )
                for s in sets
            ]
            self._record(case, "cpu_mediated", _wall_us(calls, max(1, o.reps // 2)), err)
        return case

    def _measure_cache(
        self,
        case: dict[str, Any],
        cached: TieredBackend,
        policy: str,
        sets: Sequence[Batch],
        gpu: Callable[[str, TieredBackend, str], None],
    ) -> None:
        """Time cache+host both ways with ``policy`` from the pre-warmed contents (no refresh
        while timing), then its hit rate, unique misses, their pages, and one refresh."""
        cache = cached.cache
        assert cache is not None
        batch = case["batch"]
        tag = "cache" if policy == "lfu" else f"cache_{policy}"
        sfx = "" if policy == "lfu" else f"_{policy}"
        cache.refresh_every = 0
        if self.prewarm_counts is not None:
            cache.clear()
            cache.policy = policy  # type: ignore[assignment]
            cache.prewarm(self.prewarm_counts)
        elif cache.policy != policy:
            return  # no counts to pre-warm another policy from
        gpu(f"{tag}_inplace", cached, "inplace")
        gpu(f"{tag}_dedup", cached, "dedup")
        cache.reset_stats()
        for s in sets:
            cached.pooled(s.values, s.offsets, batch, None, s.key_offsets)
        lookups_seen, hits = (int(x) for x in cache.counts().sum(0))
        case["cache_hit" + sfx] = hits / max(lookups_seen, 1)
        misses = [torch.unique(s.gids[cache.slot_map[s.gids] < 0]) for s in sets]
        lookups = case["lookups"]
        case["cache_unique_miss_share" + sfx] = statistics.mean(m.numel() / lookups for m in misses)
        case["cache_unique_miss_of_unique" + sfx] = statistics.mean(
            m.numel() / s.unique_rows for m, s in zip(misses, sets, strict=True)
        )
        case["cache_miss_pages" + sfx] = statistics.mean(host_pages(cached, m) for m in misses)
        case["cache_refresh_us" + sfx] = _gpu_us([cache.refresh], 3)

    def _record(self, case: dict[str, Any], name: str, us: float, err: float) -> None:
        gbps = case["unique_bytes"] / us / 1e3
        case["variants"][name] = {
            "us": us,
            "unique_gbps": gbps,
            "frac_ceiling": gbps / self.ceiling,
            "rel_err": err,
            "ok": err < 1e-5,
        }

    # -------------------------------------------------------------- phases

    def run(self) -> dict[str, Any]:
        o = self.opts
        self.say(f"arena: {o.host_gib} GiB")
        arena = HostArena(int(o.host_gib * (1 << 30)), method=o.host_alloc)
        self.say(f"arena {arena.method}, mapped for the device: {arena.registered}; filling")
        fill_s = fill_arena(arena, self.device, o.seed)
        self.say(f"filled in {fill_s:.1f}s")
        self.ceilings = (
            copy_ceiling(arena, self.device) if self.device.type == "cuda" else {"gbps": 1.0}
        )
        self.ceiling = float(self.ceilings["gbps"])
        self.say(f"copy ceiling {self.ceilings}")

        tables = table_set(o, arena, o.row_bytes, "host")
        host = TieredBackend(
            tables, self.device, options=TieredOptions(cache=None), init=False, arena=arena
        )
        peer = CpuMediatedLookup(host, threads=o.threads)
        ctabs = table_set(o, arena, o.row_bytes, "host+cache")
        capacity = int(o.cache_frac * sum(t.num_rows for t in ctabs))
        copts = TieredOptions(
            cache=CacheConfig(capacity_rows=capacity, refresh_every=o.refresh_every)
        )
        cached = TieredBackend(ctabs, self.device, options=copts, init=False, arena=arena)
        self.best_inplace = host.options.inplace
        if o.tune:
            self.guarded("tune", self.tune, host, tables, cached)
        for i, dist in enumerate(o.dists):
            self.prewarm_counts = None
            streams = [
                GpuIds(t.num_rows, dist, o.seed + 100 * i + k, self.device)
                for k, t in enumerate(tables)
            ]
            masks = [s.hot_mask(capacity // len(tables)) for s in streams]
            if o.policies:
                self.guarded(f"cache {dist}", self.cache_experiment, cached, streams, dist, masks)
            for batch in o.batches:
                for pooling in o.poolings:
                    name = f"{dist} B={batch} L={pooling} rows={o.row_bytes}B"
                    if self.over_budget():
                        self.skipped.append(name)
                        continue
                    self.guarded(
                        name, self.measure, host, peer, cached, streams, dist, batch, pooling, masks
                    )
            del streams, masks
            self.prewarm_counts = None
        peer.close()
        del host, cached, peer
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for rb in o.sweep_row_bytes:
            tables = table_set(o, arena, rb, "host")
            backend = TieredBackend(
                tables, self.device, options=TieredOptions(cache=None), init=False, arena=arena
            )
            backend.options.inplace = self.best_inplace
            sweep_peer = CpuMediatedLookup(backend, threads=o.threads)
            streams = [
                GpuIds(t.num_rows, "uniform", o.seed + 7 + k, self.device)
                for k, t in enumerate(tables)
            ]
            for batch, pooling in o.sweep_cases:
                name = f"uniform B={batch} L={pooling} rows={rb}B"
                if self.over_budget():
                    self.skipped.append(name)
                    continue
                self.guarded(
                    name,
                    self.measure,
                    backend,
                    sweep_peer,
                    None,
                    streams,
                    "uniform",
                    batch,
                    pooling,
                )
            sweep_peer.close()
            del backend, sweep_peer, streams
        arena.release()
        return self.report()

    def tune(
        self, host: TieredBackend, tables: tuple[TableConfig, ...], cached: TieredBackend
    ) -> None:
        """Pick the in-place and gather launch configurations on uniform ids (the smallest
        batch, the largest pooling of the grid)."""
        o = self.opts
        batch, pooling = min(o.batches), max(o.poolings)
        streams = [
            GpuIds(t.num_rows, "uniform", o.seed + 999 + k, self.device)
            for k, t in enumerate(tables)
        ]
        sets = [make_batch(streams, batch, pooling) for _ in range(o.sets)]
        ubytes = statistics.mean(s.unique_rows for s in sets) * o.row_bytes
        self.tuning = {"batch": batch, "pooling": pooling}

        def time_path(path: str) -> float:
            host.options.path = path
            calls = [
                lambda s=s: host.pooled(s.values, s.offsets, batch, None, s.key_offsets)
                for s in sets
            ]
            return _gpu_us(calls, o.reps)

        runs: list[dict[str, Any]] = []
        for cfg in INPLACE_CANDIDATES:
            host.options.inplace = cfg
            us = time_path("inplace")
            runs.append(
                {"config": dataclasses.asdict(cfg), "us": us, "unique_gbps": ubytes / us / 1e3}
            )
        best = min(runs, key=lambda r: r["us"])
        self.best_inplace = TierConfig(**best["config"])
        host.options.inplace = cached.options.inplace = self.best_inplace
        gruns: list[dict[str, Any]] = []
        for rows, warps in GATHER_CANDIDATES:
            host.options.gather_rows, host.options.gather_warps = rows, warps
            us = time_path("dedup")
            gruns.append({"rows": rows, "warps": warps, "us": us, "unique_gbps": ubytes / us / 1e3})
        gbest = min(gruns, key=lambda r: r["us"])
        host.options.gather_rows = cached.options.gather_rows = gbest["rows"]
        host.options.gather_warps = cached.options.gather_warps = gbest["warps"]
        self.tuning.update(inplace=runs, gather=gruns, inplace_best=best, gather_best=gbest)
        self.say(f"tuned: in place {best['config']} {best['unique_gbps']:.1f} GB/s; gather {gbest}")

    def cache_experiment(
        self,
        cached: TieredBackend,
        streams: Sequence[GpuIds],
        dist: str,
        masks: Sequence[torch.Tensor],
    ) -> None:
        """Hit rate of LRU and LFU over a stream after pre-warming, against the oracle."""
        o = self.opts
        cache = cached.cache
        assert cache is not None
        rows = [s.num_rows for s in streams]
        counts = []
        for s in streams:
            n = int(o.prewarm_factor * s.num_rows)
            c = torch.zeros(s.num_rows, dtype=torch.int64, device=self.device)
            for first in range(0, n, 1 << 26):
                c += torch.bincount(s.sample(min(1 << 26, n - first)), minlength=s.num_rows)
            counts.append(c.clamp(max=2**30).int())
        self.prewarm_counts = counts
        batch, pooling = o.hit_shape
        for policy in ("lru", "lfu"):
            cache.clear()
            cache.policy = policy
            cache.refresh_every = 0
            start = time.perf_counter()
            cache.prewarm(counts)
            _sync()
            prewarm_s = time.perf_counter() - start
            cache.refresh_every = o.refresh_every
            cache.reset_stats()
            total, oracle = 0.0, 0.0
            stream_counts = torch.zeros(sum(rows), dtype=torch.int32, device=self.device)
            cached.options.path = "dedup"
            for _ in range(o.hit_batches):
                b = make_batch(streams, batch, pooling)
                cached.pooled(b.values, b.offsets, batch, None, b.key_offsets)
                span = batch * pooling
                oracle += sum(
                    float(masks[t][b.values[t * span : (t + 1) * span]].sum())
                    for t in range(len(streams))
                )
                total += b.values.numel()
                stream_counts += torch.bincount(b.gids, minlength=sum(rows)).int()
            per_table = cached.cache_stats()
            lookups = sum(v["lookups"] for v in per_table.values())
            hits = sum(v["hits"] for v in per_table.values())
            hindsight = float(torch.topk(stream_counts, cache.capacity).values.sum()) / total
            _sync()
            start = time.perf_counter()
            cache.refresh()
            _sync()
            run = {
                "dist": dist,
                "policy": policy,
                "capacity_rows": cache.capacity,
                "cache_frac": o.cache_frac,
                "hit_rate": hits / max(lookups, 1),
                "oracle_topk_hit_rate": oracle / total,
                "hindsight_topk_hit_rate": hindsight,
                "vs_oracle": (hits / max(lookups, 1)) / max(oracle / total, 1e-12),
                "per_table": per_table,
                "prewarm_lookups": int(o.prewarm_factor * sum(rows)),
                "prewarm_s": prewarm_s,
                "refresh_ms": (time.perf_counter() - start) * 1e3,
                "refresh_every": o.refresh_every,
                "stream": {"batches": o.hit_batches, "batch": batch, "pooling": pooling},
            }
            self.cache_runs.append(run)
            self.say(
                f"cache {dist} {policy}: hit {run['hit_rate']:.3f} oracle {run['oracle_topk_hit_rate']:.3f} "
                f"hindsight {hindsight:.3f} refresh {run['refresh_ms']:.1f} ms"
            )
        cache.refresh_every = 0

    # -------------------------------------------------------------- report

    def report(self, plot: bool = True) -> dict[str, Any]:
        from recserve.storage.bench_report import summarize, write_outputs

        result = summarize(self)
        write_outputs(result, self.opts.out, plot=plot)
        return result


def _case_line(name: str, case: dict[str, Any]) -> str:
    parts = [
        f"{k} {v['unique_gbps']:.1f}GB/s{'' if v['ok'] else ' BAD'}"
        for k, v in case["variants"].items()
    ]
    hit = ""
    for key, label in (("cache_hit", "hit"), ("cache_hit_lru", "lru hit")):
        if key in case:
            hit += f" {label} {case[key]:.2f}"
    if "cache_miss_pages" in case:
        hit += f" pages {case['host_pages']:.0f}->{case['cache_miss_pages']:.0f}"
    return f"{name}: uniq {case['unique_share']:.2f}{hit} | " + ", ".join(parts)


def environment(opts: TiersOptions) -> dict[str, Any]:
    commit = opts.commit or git_commit()
    import triton

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "device": name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cpu_threads": opts.threads,
    }


def run_bench(opts: TiersOptions) -> dict[str, Any]:
    return Bench(opts).run()


def fitted_rule(cases: list[dict[str, Any]]) -> tuple[PathCost, list[dict[str, float]]]:
    """The cost rule fitted to this run's timings (host-only and cache+host variants)."""
    samples = []
    for c in cases:
        if not c["variants"]:
            continue
        n, nbytes, span = c["lookups"], c["lookups"] * c["row_bytes"], c["span_bytes"]
        pairs = [
            ("inplace", "inplace", 1.0, c["unique_share"]),
            ("dedup", "dedup", 1.0, c["unique_share"]),
        ]
        for policy in CACHE_POLICIES:
            sfx = "" if policy == "lfu" else f"_{policy}"
            tag = "cache" if policy == "lfu" else f"cache_{policy}"
            if "cache_hit" + sfx in c:
                miss, um = 1.0 - c["cache_hit" + sfx], c["cache_unique_miss_share" + sfx]
                pairs += [
                    (f"{tag}_inplace", "inplace", miss, um),
                    (f"{tag}_dedup", "dedup", miss, um),
                ]
        for variant, path, miss, uniq in pairs:
            if variant in c["variants"]:
                us = c["variants"][variant]["us"]
                samples.append(
                    {
                        "path": path,
                        "n": n,
                        "bytes": nbytes,
                        "miss": miss,
                        "unique": uniq,
                        "span": span,
                        "us": us,
                    }
                )
    return fit_path_cost(samples), samples


def dump(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, default=float))
