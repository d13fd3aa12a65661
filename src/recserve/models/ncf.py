"""Neural collaborative filtering (He et al. 2017): GMF and MLP branches, fused.

Tables (in order): ``mf_user``, ``mf_item`` (GMF branch), ``mlp_user``, ``mlp_item`` (MLP
branch), one id each per item. GMF is the element-wise product of its two embeddings; the MLP
branch runs over their concatenation; the final layer reads ``[GMF, MLP]`` and gives one logit.
"""

from __future__ import annotations

import torch
from torch import nn

from recserve.config import ModelConfig
from recserve.embedding import SparseOutput
from recserve.embedding.collection import BackendFactory
from recserve.models.base import RecModel
from recserve.models.layers import MLP


class NCF(RecModel):
    def __init__(
        self,
        config: ModelConfig,
        device: torch.device | str = "cpu",
        backend_factory: BackendFactory | None = None,
    ) -> None:
        super().__init__(config, device, backend_factory)
        if len(config.pooled_tables) != 4:
            raise ValueError(
                f"{config.name}: NCF needs 4 tables (mf_user, mf_item, mlp_user, mlp_item)"
            )
        d_mf, d_mf2, d_u, d_i = (t.dim for t in config.pooled_tables)
        if d_mf != d_mf2:
            raise ValueError(f"{config.name}: GMF tables must share a dim")
        if config.top_mlp[0] != d_u + d_i:
            raise ValueError(f"{config.name}: MLP input must be {d_u + d_i}")
        self.mlp = MLP(config.top_mlp, final_relu=True).to(device)
        self.final = nn.Linear(d_mf + config.top_mlp[-1], 1, device=device)
        self._dims = [d_mf, d_mf2, d_u, d_i]

    def dense_forward(self, dense: torch.Tensor, sparse: SparseOutput) -> torch.Tensor:
        mf_user, mf_item, mlp_user, mlp_item = sparse.table_slices(self._dims)
        gmf = mf_user * mf_item
        mlp = self.mlp(torch.cat([mlp_user, mlp_item], dim=1))
        return torch.sigmoid(self.final(torch.cat([gmf, mlp], dim=1)))
