"""What every model shares: a config, an EmbeddingCollection, and ``forward(batch) -> probs``."""

from __future__ import annotations

import copy
import dataclasses
from abc import abstractmethod

import torch
from torch import nn

from recserve.config import ModelConfig
from recserve.embedding import EmbeddingBackend, EmbeddingCollection, SparseOutput
from recserve.embedding.collection import BackendFactory
from recserve.types import Batch


class RecModel(nn.Module):
    """A recommendation model: sparse part (embeddings) + dense part (everything else).

    ``forward(batch)`` returns probabilities ``[B, num_tasks]`` float32. The dense part
    (:meth:`dense_forward`) takes the dense features and the collection's output, so the
    embedding stage and the dense stage can be timed, compiled or placed separately.
    """

    def __init__(
        self,
        config: ModelConfig,
        device: torch.device | str = "cpu",
        backend_factory: BackendFactory | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.sparse = EmbeddingCollection(
            config.tables, config.sequences, device=device, backend_factory=backend_factory
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.dense_forward(batch.dense, self.sparse(batch.sparse))

    @abstractmethod
    def dense_forward(self, dense: torch.Tensor, sparse: SparseOutput) -> torch.Tensor:
        """Probabilities ``[B, num_tasks]`` from dense features ``[B, n_dense]`` and embeddings."""

    def with_backend(self, backend: EmbeddingBackend) -> RecModel:
        """A model that shares this one's dense layers and reads its rows from ``backend``
        (which must hold the same tables, e.g. ``TritonBackend.from_backend(...)``; the rows'
        storage dtype may differ, e.g. fp16 rows for an fp32 model)."""
        mine = [dataclasses.replace(t, dtype="fp32") for t in self.config.tables]
        theirs = [dataclasses.replace(t, dtype="fp32") for t in backend.tables]
        if mine != theirs:
            raise ValueError("the backend must hold exactly this model's tables")
        clone = copy.copy(self)
        clone._modules = dict(self._modules)
        clone._modules["sparse"] = EmbeddingCollection(
            self.config.tables, self.config.sequences, backend_factory=lambda _: backend
        )
        return clone

    def dense_modules(self) -> list[nn.Module]:
        """The modules of the dense part (everything but the embedding tables)."""
        return [m for name, m in self.named_children() if name != "sparse"]

    def dense_parameter_count(self) -> int:
        return sum(p.numel() for m in self.dense_modules() for p in m.parameters())
