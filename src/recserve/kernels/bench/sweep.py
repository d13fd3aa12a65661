"""Timing one table set's cases: recserve, PyTorch and FBGEMM on the same rows and ids."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from recserve.kernels.bench.cases import (
    Case,
    IdStream,
    Inputs,
    TableSet,
    id_dtype,
    make_inputs,
    top_k_coverage,
)
from recserve.kernels.bench.peers import (
    FbgemmInferencePeer,
    FbgemmTrainingPeer,
    TorchPeer,
)
from recserve.kernels.pooled import PooledConfig, pooled_lookup
from recserve.kernels.timing import time_us
from recserve.kernels.tuning import (
    CombinedTimer,
    KernelTuner,
    ShapeBucket,
    combine_levers,
    lever_candidates,
)
from recserve.storage.hbm import TritonBackend

ROTATE_BYTES = 256 << 20
"""Input sets per case cover at least this many row bytes (several times the L2), so that
repeated calls do not find the previous calls' rows in L2 (uniform ids stay uniform)."""
MAX_SETS = 1024
TUNING_SETS = 16
"""Input sets a tuning timer rotates through (fewer than timed cases: tuning is many runs)."""


class TableBench:
    """A table set on the device with recserve's backend and the peers built on its rows."""

    def __init__(
        self,
        tables: TableSet,
        tuner: KernelTuner,
        fbgemm: bool,
        seed: int,
        device: str = "cuda",
        max_sets: int = MAX_SETS,
        ids: str = "int32",
    ) -> None:
        self.tables = tables
        self.max_sets = max_sets
        self.id_dtype = id_dtype(tables, ids)
        self.id_bytes = self.id_dtype.itemsize
        self.device = torch.device(device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        self.gen = gen
        self.backend = TritonBackend(tables.configs(), self.device, tuner=tuner, init=False)
        self.backend.reset_parameters(gen)
        self.peers: dict[str, Any] = {}
        self.peer_errors: dict[str, str] = {}
        builders: list[tuple[str, Callable[[], Any]]] = [
            ("torch", lambda: TorchPeer(self.backend, tables))
        ]
        if fbgemm:
            builders += [
                ("fbgemm_inference", lambda: FbgemmInferencePeer(self.backend, tables)),
                ("fbgemm_training", lambda: FbgemmTrainingPeer(self.backend, tables)),
            ]
        for name, build in builders:
            try:
                self.peers[name] = build()
            except Exception as exc:  # a peer that cannot run this dtype is reported, not fatal
                self.peer_errors[name] = f"{type(exc).__name__}: {exc}"[:300]
        self.streams: dict[str, list[IdStream]] = {}
        self._tuning: dict[str, tuple[ShapeBucket, CombinedTimer]] = {}
        self.tuned_on: dict[str, list[str]] = {}
        """The cases each bucket tuned here was tuned on, by bucket key."""

    def close(self) -> None:
        self.peers.clear()
        del self.backend
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def inputs(self, case: Case, count: int) -> list[Inputs]:
        streams = self.streams.get(case.ids)
        if streams is None:
            streams = [IdStream(r, case.ids, self.device, self.gen) for r in self.tables.rows]
            self.streams[case.ids] = streams
        return [make_inputs(case, streams, self.device, self.id_dtype) for _ in range(count)]

    def sets_for(self, case: Case) -> int:
        row_bytes = case.lookups * case.stored_row_bytes()
        return max(1, min(self.max_sets, math.ceil(ROTATE_BYTES / max(row_bytes, 1))))

    def recserve_calls(
        self, sets: list[Inputs], case: Case, config: PooledConfig | None = None
    ) -> list[Callable[[], object]]:
        b = case.batch
        if config is None:
            return [
                lambda s=s: self.backend.pooled(s.values, s.offsets, b, None, s.key_offsets)
                for s in sets
            ]
        packed = self.backend.packed(0)
        out = torch.empty(b, sum(self.tables.dims), device=self.device)
        return [
            lambda s=s: pooled_lookup(packed, s.values, s.offsets, b, out, config) for s in sets
        ]

    def _tuning_timer(self, case: Case, sets: list[Inputs]) -> Callable[[PooledConfig], float]:
        return lambda cfg: time_us(self.recserve_calls(sets, case, cfg), reps=3, min_ms=0.5)

    def tune_tiles(
        self,
        cases: list[Case],
        candidates: Callable[[ShapeBucket], list[PooledConfig]],
        retune: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """Tune the tile of every bucket of ``cases`` the tuner does not know yet (or that
        ``retune(key)`` asks for again), on input sets drawn apart from the timed ones;
        returns the tuned bucket keys.

        A skewed bucket hit by several cases (e.g. Zipf 0.8 and 1.05 ids, both skew level 1)
        is tuned on all of them at once: each config's time is the geometric mean over those
        cases (:class:`CombinedTimer`), so the config suits the whole range of the level. A
        uniform bucket is tuned on its first case (the uniform one, where the plan has it).
        """
        groups: dict[str, tuple[ShapeBucket, list[Case], list[list[Inputs]]]] = {}
        for case in cases:
            sets = self.inputs(case, min(self.sets_for(case), TUNING_SETS))
            self.backend.profile(sets[0].values, sets[0].offsets, case.batch)
            bucket = self.bucket(case, sets[0])
            key = bucket.key()
            known = self.backend.tuner.entry(bucket) is not None
            if key in self._tuning or (known and not (retune and retune(key))):
                continue
            group = groups.setdefault(key, (bucket, [], []))
            if group[1] and not bucket.skew:
                continue
            group[1].append(case)
            group[2].append(sets)
        for key, (bucket, members, member_sets) in groups.items():
            timer = CombinedTimer(
                [self._tuning_timer(c, s) for c, s in zip(members, member_sets, strict=True)]
            )
            self.backend.tuner.tune_tiles(bucket, timer, candidates(bucket))
            self._tuning[key] = (bucket, timer)
            self.tuned_on[key] = [c.name for c in members]
        return list(groups)

    def tuned_case_us(self, key: str) -> dict[str, float]:
        """Each case's time (tuning inputs) with the config chosen for bucket ``key``."""
        _, timer = self._tuning[key]
        times = timer.times.get(self.backend.tuner.entries[key].config, [])
        return dict(zip(self.tuned_on[key], times, strict=False))

    def lever_configs(self, keys: list[str]) -> list[PooledConfig]:
        """The lever variants :meth:`tune_levers` will time (to compile them ahead)."""
        out = []
        for key in keys:
            bucket, _ = self._tuning[key]
            base = self.backend.tuner.entries[key].config
            levers = lever_candidates(base, bucket.reordered, bucket.skew)
            out += [c for v in levers.values() for c in v]
        return out

    def tune_levers(self, keys: list[str], prepare: Callable[[list[PooledConfig]], None]) -> None:
        """Each lever on each tuned tile, then the winning levers combined (``prepare`` compiles
        the combinations first, all buckets at once)."""
        measured = {}
        for key in keys:
            bucket, timer = self._tuning[key]
            base = self.backend.tuner.entries[key].config
            lever_times = {
                lever: {c: timer(c) for c in variants}
                for lever, variants in lever_candidates(base, bucket.reordered, bucket.skew).items()
            }
            base_us = timer(base)
            measured[key] = (base, base_us, lever_times, combine_levers(base, base_us, lever_times))
        prepare([m[3] for m in measured.values()])
        for key, (base, base_us, lever_times, combined) in measured.items():
            bucket, timer = self._tuning[key]
            tuner = self.backend.tuner
            tuner.record_levers(bucket, base, base_us, lever_times, combined, timer(combined))

    def bucket(self, case: Case, inputs: Inputs) -> ShapeBucket:
        return self.backend.configs_for(inputs.values, case.batch, None, inputs.key_offsets)[0][0]

    def config_for(self, case: Case) -> PooledConfig:
        """The config the backend uses for ``case`` (profiling a fresh sample of its ids)."""
        sample = self.inputs(case, 1)[0]
        self.backend.profile(sample.values, sample.offsets, case.batch)
        return self.backend.configs_for(sample.values, case.batch, None, sample.key_offsets)[0][1]

    def run_case(self, case: Case, before: KernelTuner | None = None) -> dict[str, Any]:
        """Time ``case`` with recserve's backend and every peer on the same input sets.

        With ``before`` (the configs the run started from), a case whose bucket's config
        changed in this run is also timed with the earlier config (``recserve_before``).
        """
        sets = self.inputs(case, self.sets_for(case))
        first = sets[0]
        skew = self.backend.profile(first.values, first.offsets, case.batch)
        bucket, config = self.backend.configs_for(
            first.values, case.batch, None, first.key_offsets
        )[0]
        row = {
            "name": case.name,
            "group": case.group,
            "tables": self.tables.name,
            "num_tables": self.tables.num_tables,
            "dtype": self.tables.dtype,
            "dims": sorted(set(self.tables.dims)),
            "batch": case.batch,
            "pooling": case.pooling[0] if len(set(case.pooling)) == 1 else list(case.pooling),
            "ids": case.ids,
            "lookups": case.lookups,
            "input_sets": len(sets),
            "stored_row_bytes": case.stored_row_bytes(),
            "ids_dtype": str(self.id_dtype).removeprefix("torch."),
            "must_move_bytes": case.must_move_bytes(self.id_bytes),
            "coverage_top60k": top_k_coverage(first.values[: first.key_offsets[1]]),
            "unique_vs_uniform": skew["unique_vs_uniform"],
            "bucket": bucket.key(),
            "config": config.to_dict(),
        }
        ours = self.backend.pooled(first.values, first.offsets, case.batch, None, first.key_offsets)
        methods: dict[str, list[Callable[[], object]]] = {
            "recserve": self.recserve_calls(sets, case)
        }
        if before is not None and before.config(bucket) != config:
            row["config_before"] = before.config(bucket).to_dict()
            methods["recserve_before"] = self.recserve_calls(sets, case, before.config(bucket))
        for name, peer in self.peers.items():
            methods[name] = [peer.call(s, case.batch) for s in sets]
            try:
                ref = methods[name][0]()
                assert isinstance(ref, torch.Tensor)
                row[f"{name}_max_rel_diff"] = float(
                    (ours.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)
                )
            except Exception as exc:
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                methods.pop(name)
        for name, calls in methods.items():
            try:
                us = time_us(calls, reps=5, min_ms=1.5)
            except Exception as exc:
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            row[name] = {
                "us": us,
                "gbps": case.must_move_bytes(self.id_bytes) / us / 1e3,
                "rows_per_s": case.lookups / us * 1e6,
            }
        return row
