"""Small independent re-implementations of the upstream models recserve imports from.

Written from reading facebookresearch/dlrm ``dlrm_s_pytorch.py`` (``DLRM_Net``) and TorchRec
``torchrec/models/dlrm.py`` + ``torchrec/modules/mlp.py``; the module structure mirrors
upstream's so that ``state_dict()`` produces upstream's key names by itself. Only what the
state dict and the forward need is kept (no distributed paths, no QR/MD embeddings).
"""

from __future__ import annotations

import torch
from torch import nn


def _dlrm_mlp(widths: list[int], sigmoid_layer: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=True))
        layers.append(nn.Sigmoid() if i == sigmoid_layer else nn.ReLU())
    return nn.Sequential(*layers)


class DlrmNet(nn.Module):
    """``DLRM_Net`` (single device): ``emb_l``, optional learned ``v_W_l``, ``bot_l``, ``top_l``."""

    def __init__(
        self,
        m_spa: int,
        ln_emb: list[int],
        ln_bot: list[int],
        ln_top: list[int],
        arch_interaction_op: str = "dot",
        arch_interaction_itself: bool = False,
        learned_pooling: bool = False,
    ) -> None:
        super().__init__()
        self.arch_interaction_op = arch_interaction_op
        self.arch_interaction_itself = arch_interaction_itself
        self.emb_l = nn.ModuleList(nn.EmbeddingBag(n, m_spa, mode="sum") for n in ln_emb)
        for emb in self.emb_l:
            nn.init.uniform_(emb.weight, -0.5, 0.5)
        self.v_W_l = (
            nn.ParameterList(nn.Parameter(torch.rand(n) + 0.5) for n in ln_emb)
            if learned_pooling
            else None
        )
        self.bot_l = _dlrm_mlp(ln_bot, sigmoid_layer=-1)
        self.top_l = _dlrm_mlp(ln_top, sigmoid_layer=len(ln_top) - 2)

    def interact_features(self, x: torch.Tensor, ly: list[torch.Tensor]) -> torch.Tensor:
        if self.arch_interaction_op == "dot":
            batch_size, d = x.shape
            t = torch.cat([x, *ly], dim=1).view((batch_size, -1, d))
            z = torch.bmm(t, torch.transpose(t, 1, 2))
            _, ni, nj = z.shape
            offset = 1 if self.arch_interaction_itself else 0
            li = torch.tensor([i for i in range(ni) for j in range(i + offset)])
            lj = torch.tensor([j for i in range(nj) for j in range(i + offset)])
            return torch.cat([x, z[:, li, lj]], dim=1)
        return torch.cat([x, *ly], dim=1)

    def forward(
        self, dense_x: torch.Tensor, ls_o: list[torch.Tensor], ls_i: list[torch.Tensor]
    ) -> torch.Tensor:
        x = self.bot_l(dense_x)
        ly = []
        for k, (offsets, ids) in enumerate(zip(ls_o, ls_i, strict=True)):
            psw = None if self.v_W_l is None else self.v_W_l[k].gather(0, ids)
            ly.append(self.emb_l[k](ids, offsets, per_sample_weights=psw))
        return self.top_l(self.interact_features(x, ly))


class Perceptron(nn.Module):
    def __init__(self, in_size: int, out_size: int) -> None:
        super().__init__()
        self._linear = nn.Linear(in_size, out_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self._linear(x))


class MLP(nn.Module):
    def __init__(self, in_size: int, layer_sizes: list[int]) -> None:
        super().__init__()
        sizes = [in_size, *layer_sizes]
        self._mlp = nn.Sequential(
            *(Perceptron(sizes[i], sizes[i + 1]) for i in range(len(layer_sizes)))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mlp(x)


class EmbeddingBagCollection(nn.Module):
    """Tables by name, each read by one or more features (in table order, then feature order)."""

    def __init__(self, tables: list[tuple[str, int, int, list[str]]]) -> None:
        super().__init__()
        self.embedding_bags = nn.ModuleDict()
        self.feature_tables: list[str] = []
        for name, rows, dim, feature_names in tables:
            bag = nn.EmbeddingBag(rows, dim, mode="sum")
            nn.init.uniform_(bag.weight, -0.5, 0.5)
            self.embedding_bags[name] = bag
            self.feature_tables += [name] * len(feature_names)


class SparseArch(nn.Module):
    def __init__(self, embedding_bag_collection: EmbeddingBagCollection) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection

    def forward(self, features: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        ebc = self.embedding_bag_collection
        pooled = [
            ebc.embedding_bags[table](ids, offsets[:-1])
            for table, (ids, offsets) in zip(ebc.feature_tables, features, strict=True)
        ]
        batch = pooled[0].shape[0]
        return torch.cat(pooled, dim=1).reshape(batch, len(pooled), -1)


class DenseArch(nn.Module):
    def __init__(self, in_features: int, layer_sizes: list[int]) -> None:
        super().__init__()
        self.model = MLP(in_features, layer_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class InteractionArch(nn.Module):
    def __init__(self, num_sparse_features: int) -> None:
        super().__init__()
        self.F = num_sparse_features
        self.triu_indices = torch.triu_indices(self.F + 1, self.F + 1, offset=1)  # not a buffer

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        combined = torch.cat((dense.unsqueeze(1), sparse), dim=1)
        interactions = torch.bmm(combined, torch.transpose(combined, 1, 2))
        flat = interactions[:, self.triu_indices[0], self.triu_indices[1]]
        return torch.cat((dense, flat), dim=1)


class OverArch(nn.Module):
    def __init__(self, in_features: int, layer_sizes: list[int]) -> None:
        super().__init__()
        self.model = nn.Sequential(
            MLP(in_features, layer_sizes[:-1]),
            nn.Linear(layer_sizes[-2], layer_sizes[-1], bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class TorchRecDLRM(nn.Module):
    """``torchrec.models.dlrm.DLRM``: returns logits."""

    def __init__(
        self,
        ebc: EmbeddingBagCollection,
        dense_in_features: int,
        dense_arch_layer_sizes: list[int],
        over_arch_layer_sizes: list[int],
    ) -> None:
        super().__init__()
        self.sparse_arch = SparseArch(ebc)
        f = len(ebc.feature_tables)
        d = dense_arch_layer_sizes[-1]
        self.dense_arch = DenseArch(dense_in_features, dense_arch_layer_sizes)
        self.inter_arch = InteractionArch(f)
        self.over_arch = OverArch(d + f * (f - 1) // 2 + f, over_arch_layer_sizes)

    def forward(
        self, dense: torch.Tensor, features: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        embedded_dense = self.dense_arch(dense)
        embedded_sparse = self.sparse_arch(features)
        return self.over_arch(self.inter_arch(embedded_dense, embedded_sparse))


class DLRMTrain(nn.Module):
    """TorchRec's training wrapper: the model under ``model.`` (keys gain that prefix)."""

    def __init__(self, dlrm_module: TorchRecDLRM) -> None:
        super().__init__()
        self.model = dlrm_module
