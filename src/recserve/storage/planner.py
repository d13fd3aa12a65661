"""Placing tables on tiers: HBM, host DRAM behind the shared HBM cache, or host DRAM only.

Given the tables, a GPU memory budget and (optionally) how skewed each table's accesses are,
:func:`plan_placements` decides per table, greedily by time saved per HBM byte:

- start with every ``auto`` table on the host (explicit placements are kept and their HBM bytes
  reserved first);
- candidate moves: a table to HBM (its whole rows), or a step more of a table's hottest rows in
  the cache (the first step also pays the cache's maps, 8 bytes per row of the table);
- take the move with the highest predicted time saved per extra HBM byte that still fits, until
  nothing fits or nothing helps. Tables whose cache share ends at zero stay ``host``.

Predicted time per batch of ``batch_size`` items, ``n = batch * lookups`` ids of a table:
HBM ``n * row_bytes / hbm_gbps``; host: the cheaper of the two ways of reading host rows as the
measured cost rule (:class:`recserve.storage.cost.PathCost`) predicts them, without its fixed
per-launch terms (in place: per distinct row; dedup: per distinct host page touched, per byte);
with ``k`` rows cached, hits ``n * coverage(k)`` are read at HBM speed and only the misses from
host. ``coverage(k)`` is the share of lookups on the ``k`` hottest rows: from access counts, a
Zipf law, or ``k / rows`` (uniform). The plan keeps every number it used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from recserve.config import TableConfig
from recserve.loadgen.ids import IdDistribution
from recserve.storage.cache import BYTES_PER_ID, BYTES_PER_SLOT_EXTRA
from recserve.storage.cost import PathCost
from recserve.storage.host import host_row_layout

CACHE_STEPS = 64
"""A table's cache share grows in steps of 1/64 of its rows (finer at the hot head: see
:func:`_cache_step`)."""


@dataclass(frozen=True)
class TierSpeeds:
    """What the planner assumes of the hardware.

    ``hbm_gbps``: pooled lookups from HBM (GPU.md's H200 reading, ~3,000 GB/s on large batches);
    ``host``: the cost rule of host reads (defaults fitted on an H200). ``recserve bench tiers``
    measures the rule; pass its JSON to :func:`speeds_from_bench`.
    """

    hbm_gbps: float = 3000.0
    host: PathCost = field(default_factory=PathCost)


def speeds_from_bench(path: str | Path) -> TierSpeeds:
    """Speeds measured by ``recserve bench tiers`` (its JSON's fitted ``cost_rule``)."""
    data = json.loads(Path(path).read_text())
    fitted = (data.get("cost_rule") or {}).get("fitted")
    if not fitted:
        raise ValueError(f"{path}: no fitted cost_rule in this result file")
    hbm = float((data.get("planner_speeds") or {}).get("hbm_gbps", TierSpeeds.hbm_gbps))
    return TierSpeeds(hbm, PathCost(**fitted))


class Coverage:
    """Share of a table's lookups that fall on its ``k`` hottest rows."""

    def __init__(self, num_rows: int, counts: np.ndarray | None = None, alpha: float = 0.0):
        self.num_rows = num_rows
        self.alpha = alpha
        self._cum: np.ndarray | None = None
        self.source = "uniform"
        if counts is not None:
            c = np.sort(np.asarray(counts, dtype=np.float64).ravel())[::-1]
            total = c.sum()
            if total > 0:
                self._cum = np.cumsum(c) / total
                self.source = "counts"
        elif alpha > 0:
            self.source = f"zipf:{alpha:g}"

    @classmethod
    def from_spec(cls, num_rows: int, spec: str) -> Coverage:
        dist = IdDistribution.parse(spec)
        if dist.kind == "uniform":
            return cls(num_rows)
        if dist.kind == "zipf":
            return cls(num_rows, alpha=dist.alpha)
        if dist.kind == "one-item":
            return cls(num_rows, counts=np.array([1.0]))
        raise ValueError(f"the planner takes uniform, zipf:<alpha> or one-item, got {spec!r}")

    def __call__(self, k: int) -> float:
        k = max(0, min(int(k), self.num_rows))
        if k == 0:
            return 0.0
        if self._cum is not None:
            return float(self._cum[min(k, self._cum.size) - 1])
        if self.alpha > 0:
            return _harmonic(k, self.alpha) / _harmonic(self.num_rows, self.alpha)
        return k / self.num_rows

    def unique_share(self, n: int, cached: int = 0) -> float:
        """Expected distinct uncached rows among ``n`` lookups, over ``n`` (what crosses PCIe
        with dedup). Uniform: the balls-in-bins expectation; skewed: the uncached tail, whose
        rows rarely repeat within a batch, counted once per lookup (an upper bound)."""
        if n <= 0:
            return 0.0
        miss = 1.0 - self(cached)
        if self.source == "uniform":
            free = self.num_rows - cached
            if free <= 0:
                return 0.0
            return free * -math.expm1(-n * miss / free) / n
        return miss


def _harmonic(k: int, s: float) -> float:
    """``sum_{i=1..k} i^-s``: exact to 1000 terms, Euler-Maclaurin beyond."""
    head = min(k, 1000)
    total = float(np.sum(np.arange(1, head + 1, dtype=np.float64) ** -s))
    if k > head:
        a, b = float(head), float(k)
        integral = (
            math.log(b / a) if abs(s - 1.0) < 1e-12 else (b ** (1 - s) - a ** (1 - s)) / (1 - s)
        )
        total += integral + 0.5 * (b**-s - a**-s)
    return total


@dataclass
class TablePlan:
    """Where one table goes, and the numbers behind it."""

    name: str
    rows: int
    dim: int
    dtype: str
    lookups: int
    placement: str
    fixed: bool
    """True when the table's config named its placement (not ``auto``)."""
    table_bytes: int
    """Rows in their dtype, unpadded."""
    hbm_bytes: int = 0
    host_bytes: int = 0
    cache_rows: int = 0
    hit_rate: float = 0.0
    """Expected share of lookups served from HBM (1 in HBM, cache coverage for host+cache)."""
    est_us: float = 0.0
    """Predicted embedding time per batch for this table (microseconds)."""
    access: str = "uniform"


@dataclass
class Plan:
    tables: list[TablePlan]
    gpu_budget_bytes: int
    batch_size: int
    speeds: TierSpeeds
    notes: list[str] = field(default_factory=list)

    @property
    def hbm_bytes(self) -> int:
        return sum(t.hbm_bytes for t in self.tables)

    @property
    def host_bytes(self) -> int:
        return sum(t.host_bytes for t in self.tables)

    @property
    def cache_rows(self) -> int:
        return sum(t.cache_rows for t in self.tables)

    @property
    def est_us(self) -> float:
        return sum(t.est_us for t in self.tables)

    def placements(self) -> dict[str, str]:
        return {t.name: t.placement for t in self.tables}

    def to_dict(self) -> dict[str, object]:
        return {
            "gpu_budget_bytes": self.gpu_budget_bytes,
            "batch_size": self.batch_size,
            "speeds": asdict(self.speeds),
            "hbm_bytes": self.hbm_bytes,
            "host_bytes": self.host_bytes,
            "cache_rows": self.cache_rows,
            "est_us_per_batch": self.est_us,
            "tables": [asdict(t) for t in self.tables],
            "notes": self.notes,
        }

    def format_table(self) -> str:
        head = (
            f"{'table':<16} {'rows':>12} {'dim':>4} {'dtype':<5} {'L':>4} {'size':>10} "
            f"{'placement':<10} {'HBM':>10} {'host':>10} {'cached rows':>12} {'hit':>6} "
            f"{'est. us':>9}  access"
        )
        lines = [head, "-" * len(head)]
        for t in self.tables:
            lines.append(
                f"{t.name:<16} {t.rows:>12,} {t.dim:>4} {t.dtype:<5} {t.lookups:>4} "
                f"{_human(t.table_bytes):>10} {t.placement + ('*' if t.fixed else ''):<10} "
                f"{_human(t.hbm_bytes):>10} {_human(t.host_bytes):>10} {t.cache_rows:>12,} "
                f"{t.hit_rate:>6.1%} {t.est_us:>9.1f}  {t.access}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"HBM {_human(self.hbm_bytes)} of {_human(self.gpu_budget_bytes)} budget; host "
            f"{_human(self.host_bytes)}; cache {self.cache_rows:,} rows; estimated "
            f"{self.est_us / 1e3:.3f} ms per batch of {self.batch_size} "
            f"(HBM {self.speeds.hbm_gbps:g} GB/s; host reads by the measured cost rule)"
        )
        lines.extend(self.notes)
        return "\n".join(lines)


class _State:
    """One table's current choice and its costs."""

    def __init__(self, t: TableConfig, cov: Coverage, batch: int, speeds: TierSpeeds) -> None:
        self.t = t
        self.cov = cov
        self.n = batch * max(t.lookups, 1)
        self.rb = host_row_layout(t.dim, t.dtype, 1).row_bytes
        self.hbm_table = host_row_layout(t.dim, t.dtype, t.num_rows, align=16).nbytes
        self.host_table = host_row_layout(t.dim, t.dtype, t.num_rows).nbytes
        self.slot = host_row_layout(t.dim, t.dtype, 1, align=16).stride + BYTES_PER_SLOT_EXTRA
        self.speeds = speeds
        self.placement = "host"
        self.k = 0

    def time_us(self, placement: str, k: int) -> float:
        nbytes = self.n * self.rb
        if placement == "hbm":
            return nbytes / self.speeds.hbm_gbps / 1e3
        k = k if placement == "host+cache" else 0
        hit = self.cov(k)
        unique = self.cov.unique_share(self.n, k)
        rule = self.speeds.host
        inplace = rule.inplace_time_us(self.n, 1.0 - hit, unique) - rule.inplace_us
        dedup = rule.dedup_time_us(self.n, nbytes, unique, self.host_table) - rule.dedup_us
        return hit * nbytes / self.speeds.hbm_gbps / 1e3 + min(inplace, dedup)

    def hbm_bytes(self, placement: str, k: int) -> int:
        if placement == "hbm":
            return self.hbm_table
        if placement == "host+cache" and k > 0:
            return k * self.slot + self.t.num_rows * BYTES_PER_ID
        return 0

    @property
    def now_us(self) -> float:
        return self.time_us(self.placement, self.k)

    @property
    def now_bytes(self) -> int:
        return self.hbm_bytes(self.placement, self.k)


def _cache_step(state: _State) -> int:
    """The next cache increment: doubling from 1/4096 of the rows, then steps of 1/64."""
    rows = state.t.num_rows
    coarse = max(1, rows // CACHE_STEPS)
    return min(rows - state.k, max(1, min(coarse, max(state.k, rows // 4096))))


def plan_placements(
    tables: Sequence[TableConfig],
    gpu_budget_bytes: int,
    *,
    access: Mapping[str, Coverage | str | np.ndarray] | None = None,
    batch_size: int = 2048,
    speeds: TierSpeeds = TierSpeeds(),
) -> Plan:
    """Place each ``auto`` table (see the module docstring). ``access`` maps table names to a
    :class:`Coverage`, a distribution spec (``uniform``, ``zipf:1.05``) or per-row counts."""
    access = access or {}
    states = []
    for t in tables:
        a = access.get(t.name, "uniform")
        if isinstance(a, Coverage):
            cov = a
        elif isinstance(a, str):
            cov = Coverage.from_spec(t.num_rows, a)
        else:
            cov = Coverage(t.num_rows, counts=np.asarray(a))
        states.append(_State(t, cov, batch_size, speeds))

    budget = gpu_budget_bytes
    notes = []
    for s in states:
        if s.t.placement == "ssd":
            raise ValueError(f"table {s.t.name!r}: the ssd tier is not planned here yet")
        if s.t.placement != "auto":
            s.placement = s.t.placement
            if s.placement == "host+cache":
                s.k = 0  # the shared cache's size is planned below, with the auto tables
            budget -= s.now_bytes
    if budget < 0:
        notes.append(f"note: fixed placements need {_human(-budget)} more than the budget")

    while True:
        best: tuple[float, _State, str, int] | None = None
        for s in states:
            if s.t.placement not in ("auto", "host+cache"):
                continue
            options = []
            if s.t.placement == "auto" and s.placement != "hbm":
                options.append(("hbm", 0))
            if s.placement != "hbm" and s.k < s.t.num_rows:
                options.append(("host+cache", s.k + _cache_step(s)))
            for placement, k in options:
                extra = s.hbm_bytes(placement, k) - s.now_bytes
                gain = s.now_us - s.time_us(placement, k)
                if extra <= 0 or extra > budget or gain <= 0:
                    continue
                score = gain / extra
                if best is None or score > best[0]:
                    best = (score, s, placement, k)
        if best is None:
            break
        _, s, placement, k = best
        budget -= s.hbm_bytes(placement, k) - s.now_bytes
        s.placement, s.k = placement, k

    plans = []
    for s in states:
        if s.placement == "host+cache" and s.k == 0 and s.t.placement == "auto":
            s.placement = "host"
        hit = 1.0 if s.placement == "hbm" else (s.cov(s.k) if s.placement == "host+cache" else 0.0)
        plans.append(
            TablePlan(
                name=s.t.name,
                rows=s.t.num_rows,
                dim=s.t.dim,
                dtype=s.t.dtype,
                lookups=s.t.lookups,
                placement=s.placement,
                fixed=s.t.placement != "auto",
                table_bytes=s.t.nbytes,
                hbm_bytes=s.now_bytes,
                host_bytes=0 if s.placement == "hbm" else s.host_table,
                cache_rows=s.k if s.placement == "host+cache" else 0,
                hit_rate=hit,
                est_us=s.now_us,
                access=s.cov.source,
            )
        )
    if any(p.fixed for p in plans):
        notes.append("* placement fixed by the table's config")
    return Plan(plans, gpu_budget_bytes, batch_size, speeds, notes)


def parse_bytes(text: str) -> int:
    """``"40GiB"``, ``"512MB"``, ``"1.5e9"`` -> bytes."""
    units = {
        "k": 1e3,
        "m": 1e6,
        "g": 1e9,
        "t": 1e12,
        "ki": 2**10,
        "mi": 2**20,
        "gi": 2**30,
        "ti": 2**40,
    }
    s = text.strip().lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * units[suffix])
    return int(float(s))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
