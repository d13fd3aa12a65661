"""DLRM (Naumov et al. 2019) as DeepRecInfra's RMC1/2/3 use it.

dense [B, n_dense] ─ bottom MLP ─ x [B, D] ─┐
                                            ├─ interaction (dot or cat) ─ top MLP ─ sigmoid
ids ─ EmbeddingCollection ─ pooled [B, T·D] ┘
"""

from __future__ import annotations

import torch

from recserve.config import ModelConfig
from recserve.embedding import SparseOutput
from recserve.embedding.collection import BackendFactory
from recserve.models.base import RecModel
from recserve.models.layers import MLP, CatInteraction, DotInteraction


def interaction_width(config: ModelConfig) -> int:
    """Width of the interaction's output, i.e. the top MLP's input."""
    d = config.bottom_mlp[-1]
    t = len(config.pooled_tables)
    if config.interaction == "dot":
        return d + (t + 1) * t // 2
    return d + sum(tab.dim for tab in config.pooled_tables)


class DLRM(RecModel):
    def __init__(
        self,
        config: ModelConfig,
        device: torch.device | str = "cpu",
        backend_factory: BackendFactory | None = None,
    ) -> None:
        super().__init__(config, device, backend_factory)
        if config.bottom_mlp[0] != config.num_dense:
            raise ValueError(
                f"{config.name}: bottom MLP input {config.bottom_mlp[0]} != num_dense {config.num_dense}"
            )
        d = config.bottom_mlp[-1]
        tables = config.pooled_tables
        if config.interaction == "dot" and any(t.dim != d for t in tables):
            raise ValueError(f"{config.name}: dot interaction needs every table dim == {d}")
        if config.top_mlp[0] != interaction_width(config):
            raise ValueError(
                f"{config.name}: top MLP input {config.top_mlp[0]} != interaction output "
                f"{interaction_width(config)} ({config.interaction})"
            )
        self.bottom = MLP(config.bottom_mlp, final_relu=True).to(device)
        self.interaction = (
            DotInteraction(len(tables), d)
            if config.interaction == "dot"
            else CatInteraction(len(tables), d, sum(t.dim for t in tables))
        ).to(device)
        self.top = MLP(config.top_mlp).to(device)

    def dense_forward(self, dense: torch.Tensor, sparse: SparseOutput) -> torch.Tensor:
        x = self.bottom(dense)
        return torch.sigmoid(self.top(self.interaction(x, sparse.pooled)))
