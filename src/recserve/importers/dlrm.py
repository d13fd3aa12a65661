"""Import facebookresearch/dlrm (``dlrm_s_pytorch.py``, ``DLRM_Net``) checkpoints.

Layout of ``DLRM_Net.state_dict()`` (the checkpoint's ``"state_dict"``):

- ``emb_l.<t>.weight [rows_t, D]``: one ``nn.EmbeddingBag(mode="sum")`` per table;
  ``v_W_l.<t> [rows_t]`` where ``--weighted-pooling learned`` was used (per-row weights of the
  pooled sum).
- ``bot_l.<2k>.weight/bias``: ``nn.Sequential`` of Linear and ReLU (odd indices hold the ReLUs).
- ``top_l.<2k>.weight/bias``: the same, with a Sigmoid after the last Linear.

Interaction (``interact_features``): ``dot`` builds ``T = [x, e_1 … e_T]`` (``[B, T+1, D]``),
``Z = T Tᵀ`` and keeps ``Z[:, li, lj]`` with ``li, lj = [(i, j) for i in range(n) for j in
range(i + offset)]`` (``offset = 1`` with ``--arch-interaction-itself``, else 0), then
``R = [x, Zflat]``; ``cat`` gives ``R = [x, e_1 … e_T]``. Without self-interaction that is
exactly recserve's order (strictly lower triangle, row-major), checked by
:func:`~recserve.importers.assemble.pair_permutation`. With self-interaction the diagonal
``|z_i|²`` terms have no counterpart in recserve's model: such checkpoints are refused.

Not representable, and refused: quotient-remainder (``--qr-flag``) and mixed-dimension
(``--md-flag``) embeddings. Assumed, as ``dlrm_s_pytorch.py``'s defaults: ReLU everywhere but
the top MLP's last layer (``--sigmoid-bot -1``), no ``--loss-threshold`` clamp.

Learned per-row pooling weights are folded into the rows (``E'[r] = w[r] · E[r]``), which is
exact for sum pooling.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from recserve.config import Interaction
from recserve.importers.assemble import (
    ImportResult,
    Linear,
    assemble_dlrm,
    pair_permutation,
    permute_top_input,
)
from recserve.importers.checkpoint import SourceState, numbered, strip_prefix

FORMAT = "dlrm"
_KNOWN = re.compile(r"(emb_l\.\d+\.weight|v_W_l\.\d+|(bot_l|top_l)\.\d+\.(weight|bias))")


def is_dlrm_state(tensors: dict[str, torch.Tensor]) -> bool:
    return any(re.search(r"(^|\.)emb_l\.\d+\.", k) for k in tensors) and any(
        re.search(r"(^|\.)top_l\.\d+\.", k) for k in tensors
    )


def dlrm_pairs(n: int, itself: bool) -> list[tuple[int, int]]:
    """``dlrm_s_pytorch``'s ``(li, lj)`` pairs of ``Z`` for ``n`` vectors."""
    offset = 1 if itself else 0
    return [(i, j) for i in range(n) for j in range(i + offset)]


def _layers(tensors: dict[str, torch.Tensor], prefix: str) -> list[Linear]:
    weights = numbered(tensors, rf"{prefix}\.(\d+)\.weight")
    biases = numbered(tensors, rf"{prefix}\.(\d+)\.bias")
    if set(weights) != set(biases):
        raise ValueError(f"{prefix}: weights at {sorted(weights)} but biases at {sorted(biases)}")
    return [(weights[k], biases[k]) for k in weights]


def _interaction(
    top_in: int, d: int, dims: list[int], requested: Interaction | None
) -> tuple[Interaction, bool]:
    """(interaction, self-interaction) whose output width is the top MLP's input."""
    t = len(dims)
    n = t + 1
    widths: dict[tuple[Interaction, bool], int] = {
        ("dot", False): d + n * (n - 1) // 2,
        ("dot", True): d + n * (n + 1) // 2,
        ("cat", False): d + sum(dims),
    }
    fits = [k for k, w in widths.items() if w == top_in and (requested in (None, k[0]))]
    if not fits:
        raise ValueError(
            f"top MLP takes {top_in} inputs; with a {d}-wide bottom output and {t} tables, "
            f"dot gives {widths['dot', False]} (with self-interaction {widths['dot', True]}), "
            f"cat gives {widths['cat', False]}" + (f" (asked for {requested})" if requested else "")
        )
    if len(fits) > 1:
        raise ValueError(
            f"top MLP width {top_in} fits both {fits[0][0]} and {fits[1][0]} interactions: "
            "say which (interaction='dot' or 'cat')"
        )
    return fits[0]


def import_dlrm_state(
    source: SourceState,
    interaction: Interaction | None = None,
    name: str = "dlrm-imported",
) -> ImportResult:
    """A recserve DLRM from a ``DLRM_Net`` state dict (see the module docstring)."""
    tensors = strip_prefix(source.tensors, "emb_l.")
    extra = sorted(k for k in tensors if not _KNOWN.fullmatch(k))
    if any(".embs." in k or "weight_q" in k or "weight_r" in k for k in extra):
        raise ValueError(
            f"{source.path}: quotient-remainder or mixed-dimension embeddings "
            "(--qr-flag / --md-flag) are not supported"
        )
    if extra:
        raise ValueError(f"{source.path}: unexpected tensors for a dlrm DLRM_Net: {extra[:5]}")
    tables = numbered(tensors, r"emb_l\.(\d+)\.weight")
    if list(tables) != list(range(len(tables))):
        raise ValueError(f"{source.path}: embedding tables numbered {list(tables)}")
    row_weights = numbered(tensors, r"v_W_l\.(\d+)")
    bottom, top = _layers(tensors, "bot_l"), _layers(tensors, "top_l")
    if not bottom or not top:
        raise ValueError(f"{source.path}: no bottom (bot_l) or top (top_l) MLP layers")
    d = int(bottom[-1][0].shape[0])
    dims = [int(w.shape[1]) for w in tables.values()]
    kind, itself = _interaction(int(top[0][0].shape[1]), d, dims, interaction)
    if itself:
        raise ValueError(
            f"{source.path}: this model was trained with --arch-interaction-itself (its dot "
            "interaction keeps the |z_i|² diagonal terms), which recserve's DotInteraction "
            "does not compute"
        )
    notes = [f"interaction {kind} (from the top MLP's input width {top[0][0].shape[1]})"]
    weights = []
    for t, w in tables.items():
        if t in row_weights:
            w = w.float() * row_weights[t].float().reshape(-1, 1)
        weights.append((f"t{t}", w))
    if row_weights:
        notes.append(f"learned pooling weights folded into {len(row_weights)} tables")
    top_layers = list(top)
    if kind == "dot":
        perm = pair_permutation(dlrm_pairs(len(tables) + 1, itself=False), len(tables) + 1)
        top_layers[0] = (permute_top_input(top[0][0], d, perm), top[0][1])
        if perm != sorted(perm):
            notes.append("top MLP input columns permuted to recserve's pair order")
    model = assemble_dlrm(name, weights, bottom, top_layers, kind)
    reference = _reference(bottom, top, list(tables.values()), row_weights, kind)
    return ImportResult(model, FORMAT, reference, notes)


def _reference(
    bottom: list[Linear],
    top: list[Linear],
    tables: list[torch.Tensor],
    row_weights: dict[int, torch.Tensor],
    kind: Interaction,
):
    """``DLRM_Net.sequential_forward`` on the source tensors, written from upstream's code."""

    def forward(
        dense: torch.Tensor, per_table: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        x = dense
        for w, b in bottom:
            x = torch.relu(F.linear(x, w.float(), b.float()))
        ly = []
        for t, (ids, offsets) in enumerate(per_table):
            psw = row_weights[t].float()[ids] if t in row_weights else None
            ly.append(
                F.embedding_bag(
                    ids, tables[t].float(), offsets[:-1], mode="sum", per_sample_weights=psw
                )
            )
        if kind == "dot":
            batch, d = x.shape
            z = torch.cat([x, *ly], dim=1).view(batch, -1, d)
            gram = torch.bmm(z, z.transpose(1, 2))
            pairs = dlrm_pairs(z.shape[1], itself=False)
            li = torch.tensor([i for i, _ in pairs], dtype=torch.int64)
            lj = torch.tensor([j for _, j in pairs], dtype=torch.int64)
            r = torch.cat([x, gram[:, li, lj]], dim=1)
        else:
            r = torch.cat([x, *ly], dim=1)
        for k, (w, b) in enumerate(top):
            r = F.linear(r, w.float(), b.float())
            r = torch.sigmoid(r) if k == len(top) - 1 else torch.relu(r)
        return r

    return forward
