"""Wide & Deep (Cheng et al. 2016) and its multi-task variant, as in DeepRecInfra.

Both take 512 raw dense features (no bottom MLP). ``z = [dense, pooled embeddings]``.
WnD:    sigmoid(deep(z) + wide(z)), deep = top MLP, wide = one linear layer.
MT-WnD: a shared MLP over z, then per task a head MLP; task k's wide logit is added to it.
"""

from __future__ import annotations

import torch
from torch import nn

from recserve.config import ModelConfig
from recserve.embedding import SparseOutput
from recserve.embedding.collection import BackendFactory
from recserve.models.base import RecModel
from recserve.models.layers import MLP


def _check_input(config: ModelConfig, width: int) -> None:
    expected = config.num_dense + sum(t.dim for t in config.pooled_tables)
    if width != expected:
        raise ValueError(
            f"{config.name}: first MLP input {width} != dense + embeddings = {expected}"
        )


class WideAndDeep(RecModel):
    def __init__(
        self,
        config: ModelConfig,
        device: torch.device | str = "cpu",
        backend_factory: BackendFactory | None = None,
    ) -> None:
        super().__init__(config, device, backend_factory)
        _check_input(config, config.top_mlp[0])
        self.deep = MLP(config.top_mlp).to(device)
        self.wide = nn.Linear(config.top_mlp[0], config.top_mlp[-1], device=device)

    def dense_forward(self, dense: torch.Tensor, sparse: SparseOutput) -> torch.Tensor:
        z = torch.cat([dense, sparse.pooled], dim=1)
        return torch.sigmoid(self.deep(z) + self.wide(z))


class MultiTaskWideAndDeep(RecModel):
    def __init__(
        self,
        config: ModelConfig,
        device: torch.device | str = "cpu",
        backend_factory: BackendFactory | None = None,
    ) -> None:
        super().__init__(config, device, backend_factory)
        _check_input(config, config.top_mlp[0])
        if config.task_mlp[0] != config.top_mlp[-1]:
            raise ValueError(f"{config.name}: task MLP input must equal the shared MLP output")
        self.shared = MLP(config.top_mlp, final_relu=True).to(device)
        self.heads = nn.ModuleList(MLP(config.task_mlp) for _ in range(config.num_tasks)).to(device)
        self.wide = nn.Linear(config.top_mlp[0], config.num_tasks, device=device)

    def dense_forward(self, dense: torch.Tensor, sparse: SparseOutput) -> torch.Tensor:
        z = torch.cat([dense, sparse.pooled], dim=1)
        h = self.shared(z)
        deep = torch.cat([head(h) for head in self.heads], dim=1)
        return torch.sigmoid(deep + self.wide(z))
