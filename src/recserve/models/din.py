"""Deep Interest Network (Zhou et al. 2018) with a real behaviour sequence.

Tables: ``user``, ``behaviour`` (read only through the ``history`` sequence), ``ad``,
``context``; pooled features for user, ad and context (L ids each). For each item, the ids of
past behaviours are looked up in the behaviour table; the attention unit scores each behaviour
against the candidate ad from ``[b, a, b − a, b ∗ a]``; the interest is the score-weighted sum
over the (masked) sequence. Top MLP over ``[user, interest, ad, context]`` → 2 logits → softmax;
the output is the click probability.
"""

from __future__ import annotations

import torch
from torch import nn

from recserve.config import ModelConfig
from recserve.embedding import SparseOutput
from recserve.embedding.collection import BackendFactory
from recserve.models.base import RecModel
from recserve.models.layers import MLP, AttentionUnit

DIN_TABLES = ("user", "behaviour", "ad", "context")


class DIN(RecModel):
    def __init__(
        self,
        config: ModelConfig,
        device: torch.device | str = "cpu",
        backend_factory: BackendFactory | None = None,
    ) -> None:
        super().__init__(config, device, backend_factory)
        names = tuple(t.name for t in config.tables)
        if names != DIN_TABLES or len(config.sequences) != 1:
            raise ValueError(f"{config.name}: DIN needs tables {DIN_TABLES} and one sequence")
        dims = {t.dim for t in config.tables}
        if len(dims) != 1:
            raise ValueError(f"{config.name}: DIN tables must share one dim")
        d = dims.pop()
        if config.top_mlp[0] != 4 * d:
            raise ValueError(f"{config.name}: top MLP input must be 4 * dim = {4 * d}")
        self.dim = d
        self.attention = AttentionUnit(d, config.attention_mlp).to(device)
        self.top = MLP(config.top_mlp, activation=nn.PReLU).to(device)
        self.seq_name = config.sequences[0].name

    def dense_forward(self, dense: torch.Tensor, sparse: SparseOutput) -> torch.Tensor:
        user, ad, context = sparse.table_slices([self.dim] * 3)
        behaviours, mask = sparse.sequences[self.seq_name]
        scores = self.attention(behaviours, ad) * mask
        interest = torch.bmm(scores.unsqueeze(1), behaviours).squeeze(1)
        logits = self.top(torch.cat([user, interest, ad, context], dim=1))
        return torch.softmax(logits, dim=1)[:, 1:]
