"""An HBM cache of hot rows, shared by every cached host table (one id space, as in Fleche).

Rows of all ``host+cache`` tables are numbered in one id space (table ``t``'s row ``r`` is
``gid_t + r``); the cache holds ``capacity`` of them in HBM slots, wherever they come from, so
hot rows of any table compete for the same memory. Lookups read hits from the slots and misses
from host memory in the same kernel launch (:mod:`recserve.kernels.host`), which also records
every access for the policy (relaxed atomics); a deduplicated batch records each distinct row
once with its number of lookups instead, which comes to the same scores without atomics:

- ``lfu``: ``score[g]`` counts accesses; each refresh halves all counts (aging), so the cache
  follows a drifting distribution instead of remembering the past forever.
- ``lru``: ``score[g]`` is the batch number (tick) of the last access.

A refresh (every ``refresh_every`` batches, or when called) makes the cache hold the rows of
highest score, copying newcomers from host memory; with LRU that is exactly an LRU cache's
contents at that moment, with LFU the most frequent rows. It runs on the device with fixed-size
operations: no host sync (:mod:`recserve.kernels.cache`). It ranks every row of the id space (a
top-k over all of them: ~5 ms for 64 M rows on an H200), whatever the batch, so its cost per
batch is that over ``refresh_every``. Pre-warming sets the scores from access counts (a log of
past requests) and refreshes, so the first requests already hit.

Memory: ``capacity * (slot_bytes + 8)`` for the slots and their owners, plus 8 bytes per row of
the id space (slot map and score); a refresh needs ~9 bytes per row of scratch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from recserve.kernels.cache import install, install_reference, plan_refresh
from recserve.kernels.host import RECORD_LFU, RECORD_LRU, STAT_LANES
from recserve.kernels.runtime import triton_runs_on

Policy = Literal["lfu", "lru"]
POLICIES: tuple[str, ...] = ("lfu", "lru")
BYTES_PER_ID = 8
"""Fixed cost of each row of the id space: int32 slot map + int32 score."""
BYTES_PER_SLOT_EXTRA = 8
"""Beyond the row: the int64 id of the row a slot holds."""
REFRESH_SCRATCH_PER_ID = 9
"""Transient bytes per row of the id space while refreshing (an int64 key and a flag)."""

RowLoader = Callable[[torch.Tensor, torch.Tensor], None]
"""``load(gids, slots)``: copy rows ``gids`` (-1: skip) from host memory into ``slots``."""


@dataclass(frozen=True)
class CacheConfig:
    """How the HBM cache is sized and managed."""

    policy: Policy = "lfu"
    """Admission/eviction policy: ``lfu`` (counts with aging) or ``lru`` (last access)."""
    capacity_rows: int | None = None
    """Slots; None: from ``budget_bytes``, else from ``free_fraction`` of free GPU memory."""
    budget_bytes: int | None = None
    """HBM bytes for the cache, its maps included."""
    free_fraction: float = 0.5
    """Share of the GPU's free memory to use when neither size nor budget is given."""
    refresh_every: int = 32
    """Refresh after this many lookups (batches; 0: only when :meth:`HbmRowCache.refresh` is
    called). A refresh costs a top-k over the whole id space, so this trades how fast the cache
    follows a drifting distribution against that cost per batch."""
    record: bool = True
    """Record accesses on the lookup path (off: the cache keeps its pre-warmed rows)."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if not 0.0 < self.free_fraction <= 1.0:
            raise ValueError(f"free_fraction must be in (0, 1], got {self.free_fraction}")
        if self.refresh_every < 0:
            raise ValueError("refresh_every must be >= 0")


def capacity_for_budget(budget_bytes: int, slot_bytes: int, num_ids: int) -> int:
    """Slots that fit ``budget_bytes`` after the fixed per-id cost of the maps."""
    usable = budget_bytes - num_ids * BYTES_PER_ID
    return max(0, min(num_ids, usable // (slot_bytes + BYTES_PER_SLOT_EXTRA)))


def cache_bytes(capacity: int, slot_bytes: int, num_ids: int) -> int:
    """HBM bytes a cache of ``capacity`` slots takes (maps included, scratch excluded)."""
    return capacity * (slot_bytes + BYTES_PER_SLOT_EXTRA) + num_ids * BYTES_PER_ID


def resolve_capacity(
    config: CacheConfig, slot_bytes: int, num_ids: int, device: torch.device
) -> int:
    """The number of slots ``config`` asks for on ``device``."""
    if config.capacity_rows is not None:
        return max(0, min(config.capacity_rows, num_ids))
    budget = config.budget_bytes
    if budget is None:
        if device.type != "cuda":
            raise ValueError("give the cache a capacity or a budget (no GPU to measure)")
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * config.free_fraction) - num_ids * REFRESH_SCRATCH_PER_ID
    return capacity_for_budget(budget, slot_bytes, num_ids)


class HbmRowCache:
    """``capacity`` slots of ``slot_bytes`` in HBM for rows of an id space of ``num_ids``.

    ``loader`` copies rows from host memory into slots; ``table_bounds [T + 1]`` (host list)
    splits the id space by table, for :meth:`prewarm` and statistics. ``num_tables`` counts every
    table of the backend (statistics rows; uncached tables report no hits).
    """

    def __init__(
        self,
        num_ids: int,
        slot_bytes: int,
        capacity: int,
        device: torch.device | str,
        loader: RowLoader,
        *,
        policy: Policy = "lfu",
        num_tables: int = 1,
        refresh_every: int = 32,
        record: bool = True,
    ) -> None:
        if slot_bytes % 16:
            raise ValueError(f"slot_bytes must be a multiple of 16, got {slot_bytes}")
        if policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {list(POLICIES)}, got {policy!r}")
        self.device = torch.device(device)
        self.num_ids = num_ids
        self.slot_bytes = slot_bytes
        self.capacity = min(capacity, num_ids)
        self.policy = policy
        self.refresh_every = refresh_every
        self.record = record
        self.loader = loader
        self.use_triton = triton_runs_on(self.device)
        dev = self.device
        self.slots = torch.zeros(max(self.capacity, 1) * slot_bytes, dtype=torch.uint8, device=dev)
        self.slot_map = torch.full((num_ids,), -1, dtype=torch.int32, device=dev)
        self.slot_row = torch.full((self.capacity,), -1, dtype=torch.int64, device=dev)
        self.score = torch.zeros(num_ids, dtype=torch.int32, device=dev)
        self.tick = torch.ones(1, dtype=torch.int32, device=dev)
        self.stats = torch.zeros(num_tables, STAT_LANES, 2, dtype=torch.int64, device=dev)
        self.lookups_since_refresh = 0
        self.refreshes = 0

    @property
    def nbytes(self) -> int:
        return cache_bytes(self.capacity, self.slot_bytes, self.num_ids)

    @property
    def record_mode(self) -> int:
        if not self.record:
            return 0
        return RECORD_LFU if self.policy == "lfu" else RECORD_LRU

    def slot_view(self, dtype: torch.dtype) -> torch.Tensor:
        return self.slots.view(dtype)

    def after_lookup(self) -> None:
        """Bookkeeping after a lookup launch: LRU's clock, periodic refresh. No host sync."""
        if self.policy == "lru" and self.record:
            self.tick.add_(1)
        self.lookups_since_refresh += 1
        if self.refresh_every and self.lookups_since_refresh >= self.refresh_every:
            self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Hold the rows of highest score (copying newcomers from host); LFU then ages counts."""
        self._apply(self.score)
        if self.policy == "lfu":
            self.score.bitwise_right_shift_(1)
        self.lookups_since_refresh = 0
        self.refreshes += 1

    @torch.no_grad()
    def prewarm(self, counts: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Fill the cache with the most accessed rows by ``counts`` (one tensor over the id
        space, or one per cached table in id order), and seed the policy's scores with them."""
        if isinstance(counts, torch.Tensor):
            c = counts.reshape(-1)
        else:
            c = torch.cat([x.reshape(-1).to(self.device) for x in counts])
        if c.numel() != self.num_ids:
            raise ValueError(f"counts cover {c.numel()} rows, the id space has {self.num_ids}")
        c = c.to(self.device).clamp(0, 2**30).to(torch.int32)
        self._apply(c)
        if self.policy == "lfu":
            self.score.copy_(c)
        else:  # the pre-warmed rows count as just used
            held = self.slot_row[self.slot_row >= 0]
            self.score[held] = self.tick.expand_as(held)
        self.lookups_since_refresh = 0

    def _apply(self, key_score: torch.Tensor) -> None:
        new_rows, slots = plan_refresh(key_score, self.slot_map, self.slot_row)
        if self.use_triton:
            install(new_rows, slots, self.slot_map, self.slot_row)
        else:
            install_reference(new_rows, slots, self.slot_map, self.slot_row)
        self.loader(new_rows, slots)

    @torch.no_grad()
    def drop(self, first_id: int, stop_id: int) -> None:
        """Forget cached copies of ids ``[first_id, stop_id)`` (their rows changed on host)."""
        held = (self.slot_row >= first_id) & (self.slot_row < stop_id)
        self.slot_row.masked_fill_(held, -1)
        self.slot_map[first_id:stop_id] = -1

    @torch.no_grad()
    def clear(self) -> None:
        """Empty the cache and forget every score (statistics are kept)."""
        self.slot_map.fill_(-1)
        self.slot_row.fill_(-1)
        self.score.zero_()
        self.tick.fill_(1)
        self.lookups_since_refresh = 0

    def reset_stats(self) -> None:
        self.stats.zero_()

    def counts(self) -> torch.Tensor:
        """``[T, 2]`` lookups and hits per table since the last reset (syncs the host); lookups
        are counted for host tables only (HBM tables report none)."""
        return self.stats.sum(dim=1).cpu()

    def occupancy(self) -> int:
        """Slots holding a row (syncs the host)."""
        return int((self.slot_row >= 0).sum())

    def cached_ids(self) -> torch.Tensor:
        """Ids held in the cache (syncs the host)."""
        return self.slot_row[self.slot_row >= 0]
