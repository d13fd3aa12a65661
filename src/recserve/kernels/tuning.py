"""Choosing :class:`PooledConfig` per (device, shape bucket): heuristics, search, JSON cache.

The lookup path only reads a dict (no timing, no host sync): a tuned entry when one exists
for the bucket, else :func:`heuristic_config`. Tuning (:meth:`KernelTuner.tune`) times
candidates on real inputs, searching the tile shape and warps first and then each other lever
on top of the best (coordinate descent), and records each lever's measured effect.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recserve.kernels.pooled import PooledConfig

CONFIG_DIR = Path(__file__).parent / "configs"
"""Tuned configs shipped with recserve, one JSON file per device (``<device-slug>.json``)."""

SAME_ARCHITECTURE = (("nvidia-h100", "nvidia-h200"), ("nvidia-h800", "nvidia-h200"),
                     ("nvidia-gh200", "nvidia-h200"))  # fmt: skip
"""Devices without shipped configs that take another device's (slug prefix -> config file
stem): the other Hopper (sm_90) parts start from the H200's tuning. Measured on the H100 80GB
HBM3 only: there the H200's configs reached 4.04x PyTorch and 2.02x FBGEMM's TBE over the whole
sweep, no case slower than either (``benchmarks/results/nvidia-h100-80gb-hbm3/kernels.json``)."""


def shipped_configs(device: str) -> Path | None:
    """The shipped config file for ``device``: its own, else one of the same architecture
    (:data:`SAME_ARCHITECTURE`), else None."""
    slug = device_slug(device)
    own = CONFIG_DIR / f"{slug}.json"
    if own.exists():
        return own
    for prefix, stem in SAME_ARCHITECTURE:
        if slug.startswith(prefix) and (CONFIG_DIR / f"{stem}.json").exists():
            return CONFIG_DIR / f"{stem}.json"
    return None


def device_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (file and folder names)."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in name)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "unknown"


@dataclass(frozen=True)
class ShapeBucket:
    """What decides the best config: row dtype, tile width, pooling factor, batch (bags) and
    how skewed the ids are (``skew`` 0: uniform-like, 1: Zipf-like, many rows hit in L2, 2:
    a few rows take most lookups; see ``TritonBackend.profile``).

    ``pooling`` is the mean ids per bag rounded to a power of two (capped at 128); ``bags``
    the number of (table, item) bags rounded to a power of four.
    """

    dtype: str
    block_d: int
    pooling: int
    bags: int
    weighted: bool = False
    reordered: bool = False
    skew: int = 0

    @classmethod
    def of(
        cls,
        dtype: str,
        block_d: int,
        num_lookups: int,
        num_bags: int,
        weighted: bool = False,
        reordered: bool = False,
        skew: int = 0,
    ) -> ShapeBucket:
        mean = num_lookups / max(num_bags, 1)
        pooling = 1 if mean <= 1.5 else min(128, 1 << round(math.log2(mean)))
        bags = 1 << (2 * max(0, round(math.log(max(num_bags, 1), 4))))
        return cls(dtype, block_d, pooling, bags, weighted, reordered, skew)

    def key(self) -> str:
        flags = ("w" if self.weighted else "") + ("r" if self.reordered else "")
        flags += f"h{self.skew}" if self.skew else ""
        return f"{self.dtype}-d{self.block_d}-L{self.pooling}-B{self.bags}" + (
            f"-{flags}" if flags else ""
        )


SMS_GUESS = 132
"""Multiprocessors assumed by the heuristic (H100/H200); tuning measures the real device."""


def heuristic_config(bucket: ShapeBucket) -> PooledConfig:
    """A good untuned config, fitted to the design probe on an H200 (NOTES-kernels.md).

    Small tiles, many programs: about 2 KiB of rows in flight per program (at least 8 rows),
    at most 2 positions of each bag per step and as many bags as fill the rest (pooling 1:
    many bags per program), 2 warps; with few bags, fewer bags per program so that every SM
    gets several programs, and then up to 16 positions of one bag.
    """
    row_bytes = bucket.block_d * _elem_bytes(bucket.dtype)
    in_flight = min(128, max(8, 2048 // row_bytes))
    pooling = max(1, bucket.pooling)
    rows = min(2, pooling)
    bags = max(1, in_flight // rows)
    while bags > 1 and bucket.bags // bags < 4 * SMS_GUESS:
        bags //= 2
    if bags == 1:
        rows = min(16, pooling)
    return PooledConfig(bags=bags, rows=rows, num_warps=2)


def tile_candidates(
    bucket: ShapeBucket, limit: int = 0, skew_tiles: bool = True
) -> list[PooledConfig]:
    """Tile shapes (bags x rows, 8 to 256 rows in flight) and warps to search first; with
    ``limit``, the ``limit`` nearest the heuristic (in rows in flight, then shape, then warps).

    For a skewed bucket (``skew`` > 0) and ``skew_tiles``, :func:`skew_tile_candidates` are
    added after those (never cut by ``limit``).
    """
    out = []
    for in_flight in (8, 16, 32, 64, 128, 256):
        for rows in (1, 2, 4, 8, 16, 32, 64):
            if rows > in_flight or rows > 2 * max(1, bucket.pooling):
                continue
            bags = in_flight // rows
            if bags > 128 or bags * rows * bucket.block_d > 16384:
                continue
            for warps in (2, 4, 8):
                if bags * rows * bucket.block_d < 32 * warps * 4:
                    continue  # fewer elements than threads x 4: idle lanes
                out.append(PooledConfig(bags=bags, rows=rows, num_warps=warps))
    if limit and len(out) > limit:
        h = heuristic_config(bucket)

        def distance(c: PooledConfig) -> tuple[int, int, int]:
            flight = abs((c.bags * c.rows).bit_length() - (h.bags * h.rows).bit_length())
            shape = abs(c.rows.bit_length() - h.rows.bit_length())
            return (flight + shape, abs(c.num_warps.bit_length() - h.num_warps.bit_length()), 0)

        out = sorted(out, key=distance)[:limit]
    if skew_tiles and bucket.skew:
        out += [c for c in skew_tile_candidates(bucket) if c not in out]
    return out


def skew_tile_candidates(bucket: ShapeBucket) -> list[PooledConfig]:
    """Small tiles for skewed ids, where most rows come from L2 or L1 (short latency, so few
    rows in flight suffice, and L1 reuse wants few rows per SM): one warp per program from 2
    rows in flight, and one warp per bag (``bags == num_warps``), as FBGEMM's training-forward
    kernel works. At most 64 tile elements per thread (no register spills; 16 rows of 128
    elements per warp) and no idle lanes. All ``num_stages=1`` (plain loads, cached in L1).
    """
    out = []
    pooling = max(1, bucket.pooling)
    for warps in (1, 2, 4, 8):
        for in_flight in (2, 4, 8, 16, 32, 64, 128):
            for rows in (1, 2, 4, 8, 16, 32):
                if rows > in_flight or rows > 2 * pooling:
                    continue
                bags = in_flight // rows
                if warps > 1 and bags != warps:
                    continue
                elements = in_flight * bucket.block_d
                if elements > 64 * 32 * warps or elements < 4 * 32 * warps:
                    continue
                out.append(PooledConfig(bags=bags, rows=rows, num_warps=warps))
    return out


def lever_candidates(
    base: PooledConfig, reordered: bool, skew: int = 0, skew_levers: bool = True
) -> dict[str, list[PooledConfig]]:
    """Variants of ``base`` with one lever changed each, by lever name.

    For skewed ids (``skew`` > 0, with ``skew_levers``) the cache hints also try ``evict_last``
    (hot rows are read again: keeping them in L1 can pay). Pipelining (``num_stages=3``, whose
    ``cp.async`` skips L1) is timed for every bucket; a skewed bucket should be tuned on inputs
    across its skew range (:class:`CombinedTimer`) so that it is kept only where it pays.
    """

    def with_(**kw: Any) -> PooledConfig:
        return PooledConfig(**{**base.to_dict(), **kw})  # type: ignore[arg-type]

    evicts: tuple[str, ...] = ("first", "hotcold") if reordered else ("first",)
    if skew and skew_levers:
        evicts = (*evicts, "last")
    levers = {
        "maxnreg": [with_(maxnreg=n) for n in (64, 128) if n != base.maxnreg],
        "num_stages": [with_(num_stages=n) for n in (3,) if n != base.num_stages],
        "evict": [with_(evict=e) for e in evicts if e != base.evict],
        "order": [with_(order="bag" if base.order == "table" else "table")],
        "prefetch": [with_(prefetch=not base.prefetch)],
        "early_offsets": [with_(early_offsets=not base.early_offsets)],
    }
    return {k: v for k, v in levers.items() if v}


class CombinedTimer:
    """Times a config on several inputs of one bucket and returns the geometric mean of the
    times, so that the bucket's config suits all of them (e.g. Zipf 0.8 and 1.05 ids, which
    share a skew level) rather than whichever input was tuned first. ``times`` keeps each
    input's time of every config timed (the last timing of it)."""

    def __init__(self, timers: Sequence[Callable[[PooledConfig], float]]) -> None:
        if not timers:
            raise ValueError("CombinedTimer needs at least one timer")
        self.timers = list(timers)
        self.times: dict[PooledConfig, list[float]] = {}

    def __call__(self, config: PooledConfig) -> float:
        times = [timer(config) for timer in self.timers]
        self.times[config] = times
        return math.exp(sum(math.log(max(t, 1e-9)) for t in times) / len(times))


@dataclass
class TunedEntry:
    config: PooledConfig
    us: float
    """Median time of the chosen config on the tuning inputs, microseconds (the geometric
    mean over the inputs when tuned on several, see :class:`CombinedTimer`)."""
    l2_window: bool = False
    """Whether an L2 access-policy window over the hot rows measured a gain here."""
    gains: dict[str, float] | None = None
    """Measured speedup of each lever over the config without it (1.0 = none)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "us": self.us,
            "l2_window": self.l2_window,
            "gains": self.gains or {},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TunedEntry:
        return cls(
            PooledConfig.from_dict(data["config"]),
            float(data["us"]),
            bool(data.get("l2_window", False)),
            dict(data.get("gains", {})),
        )


class KernelTuner:
    """Tuned configs of one device, by shape bucket; persisted as JSON.

    ``KernelTuner.for_device(name)`` starts from the configs shipped for that device, or for
    one of the same architecture (:func:`shipped_configs`), and, when ``path`` is given, from a
    user file (which wins); :meth:`save` writes them. ``sources`` names the files read.
    """

    def __init__(self, device: str, entries: dict[str, TunedEntry] | None = None) -> None:
        self.device = device
        self.entries: dict[str, TunedEntry] = dict(entries or {})
        self.sources: list[str] = []

    @classmethod
    def for_device(cls, device: str, path: str | Path | None = None) -> KernelTuner:
        tuner = cls(device)
        for source in (shipped_configs(device), Path(path) if path else None):
            if source is not None and source.exists():
                tuner.merge(cls.load(source))
                tuner.sources.append(source.name)
        return tuner

    @classmethod
    def load(cls, path: str | Path) -> KernelTuner:
        data = json.loads(Path(path).read_text())
        entries = {k: TunedEntry.from_dict(v) for k, v in data.get("entries", {}).items()}
        return cls(data.get("device", "unknown"), entries)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "device": self.device,
            "entries": {k: e.to_dict() for k, e in sorted(self.entries.items())},
        }
        path.write_text(json.dumps(data, indent=1) + "\n")

    def merge(self, other: KernelTuner) -> None:
        self.entries.update(other.entries)

    def config(self, bucket: ShapeBucket) -> PooledConfig:
        entry = self.entries.get(bucket.key())
        return entry.config if entry is not None else heuristic_config(bucket)

    def entry(self, bucket: ShapeBucket) -> TunedEntry | None:
        return self.entries.get(bucket.key())

    def tune(
        self,
        bucket: ShapeBucket,
        time_us: Callable[[PooledConfig], float],
        candidates: Iterable[PooledConfig] | None = None,
        levers: bool = True,
    ) -> TunedEntry:
        """Search configs with ``time_us(config)`` (median microseconds) and record the best:
        :meth:`tune_tiles`, then (``levers``) :meth:`tune_levers`."""
        entry = self.tune_tiles(bucket, time_us, candidates)
        return self.tune_levers(bucket, time_us) if levers else entry

    def tune_tiles(
        self,
        bucket: ShapeBucket,
        time_us: Callable[[PooledConfig], float],
        candidates: Iterable[PooledConfig] | None = None,
    ) -> TunedEntry:
        """Tile shape and warps: the fastest of ``candidates`` (default: all
        :func:`tile_candidates`) and the heuristic."""
        pool = list(candidates) if candidates is not None else tile_candidates(bucket)
        pool.append(heuristic_config(bucket))
        timed = {c: time_us(c) for c in dict.fromkeys(pool)}
        best = min(timed, key=lambda c: timed[c])
        entry = TunedEntry(best, timed[best], gains={})
        self.entries[bucket.key()] = entry
        return entry

    def tune_levers(
        self, bucket: ShapeBucket, time_us: Callable[[PooledConfig], float]
    ) -> TunedEntry:
        """Each lever of :func:`lever_candidates` on the bucket's config, then the levers that
        each gained more than 2% (timing noise) together; keeps the fastest and records each
        lever's own measured gain."""
        entry = self.entries.get(bucket.key())
        if entry is None:
            entry = self.tune_tiles(bucket, time_us, [])
        base = entry.config
        lever_times = {
            lever: {c: time_us(c) for c in variants}
            for lever, variants in lever_candidates(base, bucket.reordered, bucket.skew).items()
        }
        base_us = time_us(base)
        combined = combine_levers(base, base_us, lever_times)
        return self.record_levers(bucket, base, base_us, lever_times, combined, time_us(combined))

    def record_levers(
        self,
        bucket: ShapeBucket,
        base: PooledConfig,
        base_us: float,
        lever_times: dict[str, dict[PooledConfig, float]],
        combined: PooledConfig,
        combined_us: float,
    ) -> TunedEntry:
        """Store the fastest of the base, each lever variant and the combination."""
        timed = {base: base_us, combined: combined_us}
        gains = {}
        for lever, times in lever_times.items():
            timed.update(times)
            gains[lever] = base_us / min(times.values())
        best = min(timed, key=lambda c: timed[c])
        entry = TunedEntry(best, timed[best], gains=gains)
        self.entries[bucket.key()] = entry
        return entry


def combine_levers(
    base: PooledConfig, base_us: float, lever_times: dict[str, dict[PooledConfig, float]]
) -> PooledConfig:
    """``base`` with the best variant of every lever that beat it by more than 2%."""
    start = base.to_dict()
    fields = dict(start)
    for times in lever_times.values():
        winner = min(times, key=lambda c: times[c])
        if times[winner] < base_us * 0.98:
            fields.update({k: v for k, v in winner.to_dict().items() if v != start[k]})
    return PooledConfig(**fields)  # type: ignore[arg-type]


def _elem_bytes(dtype: str) -> int:
    return {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}[dtype]
