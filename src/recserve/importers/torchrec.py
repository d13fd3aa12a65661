"""Import TorchRec DLRM state dicts (``torchrec.models.dlrm.DLRM``, its EmbeddingBagCollection).

Layout of ``DLRM.state_dict()`` (possibly under a wrapper prefix such as ``model.`` from
``DLRMTrain`` or ``module.`` from ``DistributedModelParallel``, which is stripped):

- ``sparse_arch.embedding_bag_collection.embedding_bags.<table>.weight [rows, D]``, tables in
  their ``EmbeddingBagConfig`` order (every table the same D).
- ``dense_arch.model._mlp.<i>._linear.weight/bias``: ``MLP`` of ``Perceptron``s, ReLU after
  every layer, the last included.
- ``over_arch.model.0._mlp.<i>._linear.weight/bias`` (``MLP`` with ReLU after every layer),
  then ``over_arch.model.1.weight/bias`` (a plain ``nn.Linear``, no activation).

Interaction (``InteractionArch``): ``combined = [x, f_1 … f_F]`` (``[B, F+1, D]``), ``Z =
combined combinedᵀ``, keep ``Z[:, triu_indices(F+1, F+1, offset=1)]`` (``i < j``, row-major), output
``[x, those]``. That is recserve's set of pairs in another order: the over arch's first-layer
columns are permuted to recserve's order. TorchRec's ``DLRM`` returns logits; recserve returns
``sigmoid(logits)``, as ``DLRMTrain`` does for its predictions.

Features: ``SparseArch`` takes one pooled feature per ``feature_names`` entry of each table
config, which a state dict does not record. By default every table has one feature (named after
the table); ``features=[(feature, table), ...]`` in SparseArch order maps shared tables, each
feature getting its own copy of the table in recserve. Table order: the file's for
``torch.save`` checkpoints; for safetensors files (which keep no order) table names sorted
naturally (``t_cat_2`` before ``t_cat_10``), unless ``tables`` gives the order.

Not supported (refused): ``DLRM_DCN`` (``inter_arch.crossnet``) and ``DLRM_Projection``
(``inter_arch.interaction_branch*``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from recserve.importers.assemble import (
    ImportResult,
    Linear,
    assemble_dlrm,
    pair_permutation,
    permute_top_input,
)
from recserve.importers.checkpoint import SourceState, natural_key, numbered, strip_prefix

FORMAT = "torchrec"
EBC = "sparse_arch.embedding_bag_collection.embedding_bags."
_TABLE = re.compile(re.escape(EBC) + r"(.+)\.weight")


def is_torchrec_state(tensors: dict[str, torch.Tensor]) -> bool:
    return any(EBC in k for k in tensors)


def torchrec_pairs(n: int) -> list[tuple[int, int]]:
    """``InteractionArch``'s pairs: ``torch.triu_indices(n, n, offset=1)``."""
    rows, cols = torch.triu_indices(n, n, offset=1)
    return list(zip(rows.tolist(), cols.tolist(), strict=True))


def _perceptrons(tensors: dict[str, torch.Tensor], prefix: str) -> list[Linear]:
    weights = numbered(tensors, rf"{re.escape(prefix)}(\d+)\._linear\.weight")
    biases = numbered(tensors, rf"{re.escape(prefix)}(\d+)\._linear\.bias")
    if set(weights) != set(biases):
        raise ValueError(f"{prefix}: weights at {sorted(weights)} but biases at {sorted(biases)}")
    return [(weights[k], biases[k]) for k in weights]


def _safe_name(name: str) -> str:
    """A recserve table name (alphanumeric, ``_``, ``-``) for a TorchRec table or feature."""
    return re.sub(r"[^0-9A-Za-z_-]", "_", name) or "table"


def import_torchrec_state(
    source: SourceState,
    features: Sequence[tuple[str, str]] | None = None,
    tables: Sequence[str] | None = None,
    name: str = "torchrec-dlrm-imported",
) -> ImportResult:
    """A recserve DLRM from a TorchRec ``DLRM`` state dict (see the module docstring)."""
    tensors = strip_prefix(source.tensors, "sparse_arch.")
    if any(k.startswith("inter_arch.crossnet") for k in tensors):
        raise ValueError(
            f"{source.path}: TorchRec DLRM_DCN (a cross-net interaction) is not supported"
        )
    if any(k.startswith("inter_arch.interaction_branch") for k in tensors):
        raise ValueError(f"{source.path}: TorchRec DLRM_Projection is not supported")
    found = {m.group(1): v for k, v in tensors.items() if (m := _TABLE.fullmatch(k))}
    if not found:
        raise ValueError(f"{source.path}: no {EBC}<table>.weight tensors")
    notes: list[str] = []
    if tables is not None:
        missing = sorted(set(tables) ^ set(found))
        if missing:
            raise ValueError(
                f"{source.path}: table order {list(tables)} does not match the file's tables ({missing})"
            )
        order = list(tables)
    elif source.ordered:
        order = list(found)
    else:
        order = sorted(found, key=natural_key)
        notes.append("table order: names sorted naturally (safetensors keeps no order)")
    if features is None:
        features = [(t, t) for t in order]
    else:
        unknown = sorted({t for _, t in features} - set(found))
        if unknown:
            raise ValueError(f"features refer to unknown tables {unknown}; the file has {order}")
    dense = _perceptrons(tensors, "dense_arch.model._mlp.")
    over = _perceptrons(tensors, "over_arch.model.0._mlp.")
    final = (tensors.get("over_arch.model.1.weight"), tensors.get("over_arch.model.1.bias"))
    if not dense or final[0] is None or final[1] is None:
        raise ValueError(
            f"{source.path}: a TorchRec DLRM needs dense_arch.model._mlp.* and "
            "over_arch.model.{0._mlp.*,1} tensors (an EmbeddingBagCollection alone is not a model)"
        )
    known = {
        *(f"{EBC}{t}.weight" for t in found),
        *(k for k in tensors if k.startswith(("dense_arch.model._mlp.", "over_arch.model."))),
    }
    extra = sorted(set(tensors) - known)
    if extra:
        raise ValueError(f"{source.path}: unexpected tensors for a TorchRec DLRM: {extra[:5]}")
    over_layers = [*over, (final[0], final[1])]
    d = int(dense[-1][0].shape[0])
    n = len(features) + 1
    perm = pair_permutation(torchrec_pairs(n), n)
    over_layers[0] = (permute_top_input(over_layers[0][0], d, perm), over_layers[0][1])
    notes.append("over arch input columns permuted from TorchRec's triu order to recserve's")
    names = [_safe_name(f) for f, _ in features]
    if len(set(names)) != len(names):
        raise ValueError(f"feature names are not unique once made table names: {names}")
    weights = [(nm, found[t]) for nm, (_, t) in zip(names, features, strict=True)]
    model = assemble_dlrm(name, weights, dense, over_layers, "dot")
    reference = _reference(dense, [*over, (final[0], final[1])], [found[t] for _, t in features])
    return ImportResult(model, FORMAT, reference, notes)


def _reference(dense: list[Linear], over: list[Linear], tables: list[torch.Tensor]):
    """``sigmoid(DLRM.forward)`` on the source tensors, written from TorchRec's code."""

    def forward(
        x: torch.Tensor, per_table: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        for w, b in dense:
            x = torch.relu(F.linear(x, w.float(), b.float()))
        pooled = [
            F.embedding_bag(ids, tables[t].float(), offsets, mode="sum", include_last_offset=True)
            for t, (ids, offsets) in enumerate(per_table)
        ]
        batch, d = x.shape
        combined = torch.cat(
            [x.unsqueeze(1), torch.cat(pooled, dim=1).reshape(batch, -1, d)], dim=1
        )
        z = torch.bmm(combined, combined.transpose(1, 2))
        rows, cols = torch.triu_indices(combined.shape[1], combined.shape[1], offset=1)
        r = torch.cat([x, z[:, rows, cols]], dim=1)
        for k, (w, b) in enumerate(over):
            r = F.linear(r, w.float(), b.float())
            if k < len(over) - 1:
                r = torch.relu(r)
        return torch.sigmoid(r)

    return forward
