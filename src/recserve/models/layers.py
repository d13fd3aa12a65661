"""Building blocks shared by the model families: MLPs, interactions, attention, GRU/AUGRU."""

from __future__ import annotations

import itertools

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear layers over ``widths`` (input first), ReLU between them.

    ``final_relu`` adds a ReLU after the last layer (DLRM's bottom MLP has one; heads don't).
    """

    def __init__(
        self,
        widths: tuple[int, ...] | list[int],
        final_relu: bool = False,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        if len(widths) < 2:
            raise ValueError(f"an MLP needs an input and at least one layer, got widths {widths}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2 or final_relu:
                layers.append(activation())
        super().__init__(*layers)
        self.in_features = widths[0]
        self.out_features = widths[-1]


class DotInteraction(nn.Module):
    """DLRM's pairwise dot-product interaction.

    Input: the bottom-MLP output ``x [B, D]`` and the pooled embeddings ``emb [B, T*D]``.
    Output ``[B, D + (T+1)T/2]``: ``x`` followed by the dot products of every distinct pair of
    the T+1 vectors (the strictly lower triangle of ``Z Zᵀ``, row-major).
    """

    def __init__(self, num_tables: int, dim: int) -> None:
        super().__init__()
        self.num_tables, self.dim = num_tables, dim
        n = num_tables + 1
        rows, cols = torch.tril_indices(n, n, offset=-1)
        self.register_buffer("pair_index", rows * n + cols, persistent=False)
        self.out_features = dim + n * (n - 1) // 2

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        z = torch.cat([x.unsqueeze(1), emb.view(b, self.num_tables, self.dim)], dim=1)
        gram = torch.bmm(z, z.transpose(1, 2)).flatten(1)
        return torch.cat([x, gram.index_select(1, self.pair_index)], dim=1)


class CatInteraction(nn.Module):
    """Concatenation of the bottom-MLP output and the pooled embeddings (DeepRecSys configs)."""

    def __init__(self, num_tables: int, dim_dense: int, dim_sparse: int) -> None:
        super().__init__()
        self.out_features = dim_dense + dim_sparse

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, emb], dim=1)


class AttentionUnit(nn.Module):
    """DIN's local activation unit: a score per behaviour from ``[b, a, b − a, b ∗ a]``.

    ``behaviours [B, S, D]``, ``query [B, D]`` → scores ``[B, S]`` (unnormalised, as in DIN).
    """

    def __init__(self, dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.mlp = MLP((4 * dim, *hidden, 1), activation=nn.PReLU)

    def forward(self, behaviours: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        q = query.unsqueeze(1).expand_as(behaviours)
        feats = torch.cat([behaviours, q, behaviours - q, behaviours * q], dim=2)
        return self.mlp(feats).squeeze(2)


class AUGRU(nn.Module):
    """GRU with attentional update gate (DIEN's interest-evolution layer).

    At step t with attention weight ``a_t``: ``u'_t = a_t · u_t`` and
    ``h_t = (1 − u'_t) ∘ h_{t−1} + u'_t ∘ h̃_t``. Padded steps (mask false) keep ``h``.
    Input ``x [B, S, I]``, ``att [B, S]``, ``mask [B, S]`` → final state ``[B, H]``.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.x2h = nn.Linear(input_size, 3 * hidden_size)
        self.h2h = nn.Linear(hidden_size, 3 * hidden_size)

    def forward(self, x: torch.Tensor, att: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = x.new_zeros(b, self.hidden_size)
        gx_all = self.x2h(x)  # all input projections in one matmul
        for t in range(s):
            gx = gx_all[:, t]
            gh = self.h2h(h)
            rx, ux, nx = gx.chunk(3, dim=1)
            rh, uh, nh = gh.chunk(3, dim=1)
            r = torch.sigmoid(rx + rh)
            u = torch.sigmoid(ux + uh) * att[:, t : t + 1]
            cand = torch.tanh(nx + r * nh)
            h_new = (1 - u) * h + u * cand
            h = torch.where(mask[:, t : t + 1], h_new, h)
        return h


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``mask``; rows with no valid entry give zeros."""
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(weights, nan=0.0)
