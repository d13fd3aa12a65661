"""EmbeddingCollection: the sparse part of every model.

It takes the request's :class:`~recserve.types.KeyedJagged` ids and returns pooled embeddings
``[B, ΣD]`` (tables in config order) and padded behaviour sequences ``[B, S, D]``. Which backend
holds which table is decided here (by placement), never by a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from recserve.config import SequenceConfig, TableConfig
from recserve.embedding.backend import EmbeddingBackend, TorchBackend
from recserve.types import KeyedJagged

BackendFactory = Callable[[tuple[TableConfig, ...]], EmbeddingBackend]


@dataclass
class SparseOutput:
    """What an :class:`EmbeddingCollection` returns for one batch."""

    pooled: torch.Tensor
    """``[B, ΣD]`` float32: every table's pooled embedding, concatenated in config order."""
    sequences: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """``name -> (rows [B, S, D] float32, mask [B, S] bool)`` for each behaviour sequence;
    padded positions hold zero rows."""

    def table_slices(self, dims: list[int]) -> list[torch.Tensor]:
        """The pooled output split back into one ``[B, D_t]`` tensor per table."""
        return list(torch.split(self.pooled, dims, dim=1))


class EmbeddingCollection(nn.Module):
    """A set of tables and sequence features, with their rows held by backends.

    ``backend_factory`` builds the backend for a group of tables; the default is the pure-torch
    :class:`TorchBackend` on ``device``. Tables that share a backend are looked up in one call
    (one kernel launch where the backend has table-batched kernels).
    """

    def __init__(
        self,
        tables: tuple[TableConfig, ...],
        sequences: tuple[SequenceConfig, ...] = (),
        device: torch.device | str = "cpu",
        backend_factory: BackendFactory | None = None,
    ) -> None:
        super().__init__()
        if not tables:
            raise ValueError("an EmbeddingCollection needs at least one table")
        self.tables = tuple(tables)
        self.sequences = tuple(sequences)
        self.table_names = tuple(t.name for t in self.tables)
        self.pooled_tables = tuple(t for t in self.tables if t.pooled)
        self.keys = tuple(t.name for t in self.pooled_tables) + tuple(
            s.name for s in self.sequences
        )
        self.dims = [t.dim for t in self.pooled_tables]
        self.output_dim = sum(self.dims)
        factory = backend_factory or (lambda ts: TorchBackend(ts, device=device))
        self.backend = factory(self.tables)
        self._seq_table = {s.name: self.table_names.index(s.table) for s in self.sequences}
        self._all_pooled = len(self.pooled_tables) == len(self.tables)
        if not self._all_pooled:
            # Columns of the backend's output that belong to pooled tables.
            cols, start = [], 0
            for t in self.tables:
                if t.pooled:
                    cols.extend(range(start, start + t.dim))
                start += t.dim
            self.register_buffer(
                "_pooled_cols", torch.tensor(cols, device=device), persistent=False
            )
        self._spread_cache: dict[tuple[int, str], torch.Tensor] = {}

    def forward(self, features: KeyedJagged) -> SparseOutput:
        if features.keys != self.keys:
            features = features.select(self.keys)
        b, n_pooled = features.batch_size, len(self.pooled_tables)
        # Pooled tables come first in the feature-major layout: their ids are a prefix of values.
        offsets = features.offsets[: n_pooled * b + 1]
        key_offsets = features.offset_per_key
        if key_offsets is None and features.offsets.device.type == "cpu":
            key_offsets = features.key_offsets()
        if key_offsets is not None:
            key_offsets = key_offsets[: n_pooled + 1]
        if not self._all_pooled:
            offsets, key_offsets = self._spread(offsets, key_offsets, b)
        pooled = self.backend.pooled(features.values, offsets, b, features.weights, key_offsets)
        if not self._all_pooled:
            if self._pooled_cols.device != pooled.device:  # the backend lives elsewhere
                self._pooled_cols = self._pooled_cols.to(pooled.device)
            pooled = pooled.index_select(1, self._pooled_cols)
        sequences = {
            s.name: self._sequence(features, n_pooled + i, s) for i, s in enumerate(self.sequences)
        }
        return SparseOutput(pooled, sequences)

    def _spread(
        self, offsets: torch.Tensor, key_offsets: list[int] | None, b: int
    ) -> tuple[torch.Tensor, list[int] | None]:
        """Offsets over all tables, with empty bags for the tables that have no pooled feature."""
        key = (b, str(offsets.device))
        index = self._spread_cache.get(key)
        if index is None:
            parts, p = [], 0
            for t in self.tables:
                if t.pooled:
                    parts.append(torch.arange(p * b, (p + 1) * b))
                    p += 1
                else:
                    parts.append(torch.full((b,), p * b))
            parts.append(torch.tensor([p * b]))
            index = torch.cat(parts).to(offsets.device)
            self._spread_cache[key] = index
        full_keys = None
        if key_offsets is not None:
            full_keys, p = [], 0
            for t in self.tables:
                full_keys.append(key_offsets[p])
                p += int(t.pooled)
            full_keys.append(key_offsets[p])
        return offsets[index], full_keys

    def _sequence(
        self, features: KeyedJagged, f: int, seq: SequenceConfig
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of one behaviour sequence, padded to ``max_len`` (fixed, so no host sync)."""
        b, s = features.batch_size, seq.max_len
        table = self._seq_table[seq.name]
        off = features.offsets[f * b : (f + 1) * b + 1]
        lengths = off[1:] - off[:-1]
        pos = torch.arange(s, device=off.device)
        mask = pos.unsqueeze(0) < lengths.unsqueeze(1)
        dim = self.tables[table].dim
        if features.values.numel() == 0:
            return torch.zeros(b, s, dim, device=off.device), mask
        idx = (off[:-1].unsqueeze(1) + pos).clamp(max=features.values.numel() - 1)
        ids = torch.where(mask, features.values[idx], torch.zeros_like(idx))
        rows = self.backend.rows(table, ids.reshape(-1)).view(b, s, dim)
        return rows * mask.unsqueeze(2), mask

    def dense_weight(self, name: str) -> torch.Tensor:
        return self.backend.dense_weight(self.table_names.index(name))
