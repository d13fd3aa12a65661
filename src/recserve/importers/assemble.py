"""Building a recserve DLRM from another system's tensors, and checking it against them.

recserve's DLRM (``models/dlrm.py``): bottom MLP with ReLU after every layer, then
``DotInteraction`` (``[x, strictly lower triangle of Z Zᵀ row-major]`` with ``Z = [x, e_1 … e_T]``)
or ``CatInteraction`` (``[x, e_1 … e_T]``), then a top MLP with ReLU between layers and a
sigmoid at the end. Upstream layouts that order the pairwise terms differently are handled by
permuting the columns of the top MLP's first layer (:func:`pair_permutation`), never by
changing the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from recserve.config import Interaction, ModelConfig, TableConfig
from recserve.embedding.backend import TorchBackend
from recserve.models import build_model
from recserve.models.base import RecModel
from recserve.types import Batch, KeyedJagged

Linear = tuple[torch.Tensor, torch.Tensor]
"""``(weight [out, in], bias [out])`` of one fully connected layer."""

Reference = Callable[[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]
"""The source model's forward: ``(dense [B, n_dense], [(ids, offsets [B+1]) per table])`` →
probabilities ``[B, tasks]``."""


@dataclass
class ImportResult:
    """A recserve model made from a checkpoint, and how it was made."""

    model: RecModel
    source_format: str
    reference: Reference
    """The source model's forward on the source tensors (for :func:`max_difference`)."""
    notes: list[str] = field(default_factory=list)


def recserve_pairs(n: int) -> list[tuple[int, int]]:
    """The ``(i, j)`` pairs of recserve's DotInteraction output, in order: ``i > j``, row-major."""
    rows, cols = torch.tril_indices(n, n, offset=-1)
    return list(zip(rows.tolist(), cols.tolist(), strict=True))


def pair_permutation(source_pairs: Sequence[tuple[int, int]], n: int) -> list[int]:
    """For each recserve pair column, the index of the same (unordered) pair in the source's
    list. Raises ``ValueError`` when the source's pairs are not exactly recserve's set."""
    index = {(max(i, j), min(i, j)): k for k, (i, j) in enumerate(source_pairs)}
    ours = recserve_pairs(n)
    if len(index) != len(source_pairs) or set(index) != set(ours):
        raise ValueError(
            "the source interaction's pairs are not the distinct pairs of its vectors "
            "(recserve's dot interaction has no self-interaction terms)"
        )
    return [index[p] for p in ours]


def permute_top_input(weight: torch.Tensor, dense_dim: int, perm: Sequence[int]) -> torch.Tensor:
    """The top MLP's first weight with its pair columns reordered from the source's order to
    recserve's: column ``dense_dim + k`` takes the source's ``dense_dim + perm[k]``."""
    cols = list(range(dense_dim)) + [dense_dim + p for p in perm]
    return weight[:, cols].contiguous()


def mlp_widths(layers: Sequence[Linear], what: str) -> tuple[int, ...]:
    """``(in, out_1, …, out_k)`` of a chain of layers; checks each layer feeds the next."""
    if not layers:
        raise ValueError(f"{what}: no layers found")
    widths = [int(layers[0][0].shape[1])]
    for k, (w, b) in enumerate(layers):
        if w.dim() != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"{what} layer {k}: weight {list(w.shape)} and bias {list(b.shape)}")
        if w.shape[1] != widths[-1]:
            raise ValueError(
                f"{what} layer {k}: takes {w.shape[1]} inputs, previous layer gives {widths[-1]}"
            )
        widths.append(int(w.shape[0]))
    return tuple(widths)


def assemble_dlrm(
    name: str,
    tables: Sequence[tuple[str, torch.Tensor]],
    bottom: Sequence[Linear],
    top: Sequence[Linear],
    interaction: Interaction,
) -> RecModel:
    """A recserve DLRM holding these tensors (converted to float32).

    ``tables``: ``(name, weight [rows, D])`` in interaction order; ``bottom``/``top``: layers in
    order, ``top[0]``'s columns already in recserve's interaction order.
    """
    bottom_widths = mlp_widths(bottom, "bottom MLP")
    top_widths = mlp_widths(top, "top MLP")
    for table_name, weight in tables:
        if weight.dim() != 2:
            raise ValueError(
                f"table {table_name!r}: expected a [rows, dim] weight, got {list(weight.shape)}"
            )
    table_configs = tuple(TableConfig(n, int(w.shape[0]), int(w.shape[1])) for n, w in tables)
    config = ModelConfig(
        name=name,
        family="dlrm",
        tables=table_configs,
        num_dense=bottom_widths[0],
        bottom_mlp=bottom_widths,
        top_mlp=top_widths,
        interaction=interaction,
        num_tasks=top_widths[-1],
    )
    model = build_model(config, seed=None)  # DLRM checks the widths against the interaction
    with torch.no_grad():
        for part, layers in (("bottom", bottom), ("top", top)):
            mlp = model.get_submodule(part)
            linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
            for linear, (w, b) in zip(linears, layers, strict=True):
                linear.weight.copy_(w.float())
                linear.bias.copy_(b.float())
        backend = model.sparse.backend
        assert isinstance(backend, TorchBackend)
        for i, (_, weight) in enumerate(tables):
            backend.load_table(i, weight.float())
    return model.eval()


def random_inputs(
    config: ModelConfig, batch_size: int = 64, max_lookups: int = 3, seed: int = 0
) -> tuple[Batch, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Random dense features and multi-hot ids (0..``max_lookups`` per bag, empty bags
    included), as a recserve request and as per-table ``(ids, offsets)``."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch_size, config.num_dense, generator=gen)
    per_table, values, lengths = [], [], []
    for t in config.pooled_tables:
        n = torch.randint(0, max_lookups + 1, (batch_size,), generator=gen)
        ids = torch.randint(0, t.num_rows, (int(n.sum()),), generator=gen)
        offsets = torch.zeros(batch_size + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(n, 0)
        per_table.append((ids, offsets))
        values.append(ids)
        lengths.append(n)
    sparse = KeyedJagged.from_lengths(config.feature_keys, torch.cat(values), torch.cat(lengths))
    return Batch(dense, sparse), dense, per_table


@torch.no_grad()
def max_difference(result: ImportResult, batch_size: int = 64, seed: int = 0) -> float:
    """Largest absolute difference between recserve's probabilities and the source model's
    (computed by ``result.reference`` from the source tensors) on random inputs."""
    batch, dense, per_table = random_inputs(result.model.config, batch_size, seed=seed)
    ours = result.model(batch)
    theirs = result.reference(dense, per_table)
    return float((ours - theirs).abs().max())
