"""Synthetic queries for a model: dense features and jagged ids, reproducible from a seed."""

from __future__ import annotations

import numpy as np
import torch

from recserve.config import ModelConfig
from recserve.loadgen.ids import IdDistribution, IdSampler
from recserve.types import Batch, KeyedJagged


class QueryFactory:
    """Builds :class:`~recserve.types.Batch` objects of any size for one model.

    Each table gets exactly ``lookups`` ids per item (DeepRecInfra's fixed pooling factor)
    unless ``jitter`` is set, in which case bag sizes are uniform in ``[0, 2*lookups]``.
    Sequences get lengths uniform in ``[1, max_len]``.
    """

    def __init__(
        self,
        config: ModelConfig,
        ids: str | IdDistribution = "uniform",
        seed: int = 0,
        jitter: bool = False,
    ) -> None:
        self.config = config
        self.dist = IdDistribution.parse(ids) if isinstance(ids, str) else ids
        self.rng = np.random.default_rng(seed)
        self.jitter = jitter
        self.samplers = {
            t.name: IdSampler(t.num_rows, self.dist, seed=seed + 1 + i)
            for i, t in enumerate(config.tables)
        }

    def make(self, batch_size: int) -> Batch:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        cfg, b = self.config, batch_size
        lengths, values = [], []
        for t in cfg.pooled_tables:
            n = self.rng.integers(0, 2 * t.lookups + 1, b) if self.jitter else np.full(b, t.lookups)
            lengths.append(n)
            values.append(self.samplers[t.name].sample(int(n.sum())))
        for s in cfg.sequences:
            n = self.rng.integers(1, s.max_len + 1, b)
            lengths.append(n)
            values.append(self.samplers[s.table].sample(int(n.sum())))
        keys = cfg.feature_keys
        sparse = KeyedJagged.from_lengths(
            keys,
            torch.from_numpy(np.concatenate(values).astype(np.int64)),
            torch.from_numpy(np.concatenate(lengths).astype(np.int64)),
        )
        sparse.key_offsets()
        dense = torch.from_numpy(self.rng.standard_normal((b, cfg.num_dense), dtype=np.float32))
        return Batch(dense, sparse)
