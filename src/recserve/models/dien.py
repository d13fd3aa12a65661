"""Deep Interest Evolution Network (Zhou et al. 2019) with a real GRU and AUGRU.

Tables: ``c0 … c{n-1}`` (context features, one id each), ``user`` and ``item``. The ``history``
sequence holds ids of past items, looked up in the item table. A GRU extracts interest states
``h_t`` from the behaviour rows; attention scores them against the candidate item
(``softmax_t(h_t W e_item)`` over the valid steps); an AUGRU (attention-gated update) evolves
them into the final interest ``h'``. Top MLP over ``[h', item, user, Σ context]`` → 2 logits →
softmax; the output is the click probability.
"""

from __future__ import annotations

import torch
from torch import nn

from recserve.config import ModelConfig
from recserve.embedding import SparseOutput
from recserve.embedding.collection import BackendFactory
from recserve.models.base import RecModel
from recserve.models.layers import AUGRU, MLP, masked_softmax


class DIEN(RecModel):
    def __init__(
        self,
        config: ModelConfig,
        device: torch.device | str = "cpu",
        backend_factory: BackendFactory | None = None,
    ) -> None:
        super().__init__(config, device, backend_factory)
        names = [t.name for t in config.tables]
        if names[-2:] != ["user", "item"] or len(config.sequences) != 1:
            raise ValueError(
                f"{config.name}: DIEN needs tables c0..cN, user, item and one sequence"
            )
        dims = {t.dim for t in config.tables}
        if len(dims) != 1:
            raise ValueError(f"{config.name}: DIEN tables must share one dim")
        d, h = dims.pop(), config.gru_hidden
        if config.top_mlp[0] != h + 3 * d:
            raise ValueError(f"{config.name}: top MLP input must be hidden + 3 * dim = {h + 3 * d}")
        self.dim, self.num_context = d, len(names) - 2
        self.extractor = nn.GRU(d, h, batch_first=True, device=device)
        self.att_proj = nn.Linear(h, d, bias=False, device=device)
        self.evolution = AUGRU(h, h).to(device)
        self.top = MLP(config.top_mlp, activation=nn.PReLU).to(device)
        self.seq_name = config.sequences[0].name

    def dense_forward(self, dense: torch.Tensor, sparse: SparseOutput) -> torch.Tensor:
        b = sparse.pooled.shape[0]
        pooled = sparse.pooled.view(b, self.num_context + 2, self.dim)
        context = pooled[:, : self.num_context].sum(dim=1)
        user, item = pooled[:, -2], pooled[:, -1]
        behaviours, mask = sparse.sequences[self.seq_name]
        states, _ = self.extractor(behaviours)
        scores = torch.bmm(self.att_proj(states), item.unsqueeze(2)).squeeze(2)
        att = masked_softmax(scores, mask)
        interest = self.evolution(states, att, mask)
        logits = self.top(torch.cat([interest, item, user, context], dim=1))
        return torch.softmax(logits, dim=1)[:, 1:]
