"""facebookresearch/dlrm checkpoints → recserve: predictions equal the source model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from upstream_models import DlrmNet

from recserve.importers import import_checkpoint, max_difference
from recserve.importers.assemble import random_inputs, recserve_pairs
from recserve.importers.dlrm import dlrm_pairs
from recserve.models import load_model, save_model


def _save_dlrm(net: DlrmNet, path: Path) -> Path:
    """As dlrm_s_pytorch.py saves: the state dict beside numpy-scalar metrics and optimiser state."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.save(
        {
            "epoch": 1,
            "nepochs": 2,
            "nbatches": 10,
            "iter": 5,
            "state_dict": net.state_dict(),
            "train_acc": np.float64(0.75),
            "train_loss": np.float32(0.5),
            "total_accu": np.int64(75),
            "opt_state_dict": optimizer.state_dict(),
        },
        path,
    )
    return path


def _compare(net: DlrmNet, model: torch.nn.Module, seed: int = 1) -> float:
    batch, dense, per_table = random_inputs(model.config, batch_size=32, seed=seed)
    with torch.no_grad():
        theirs = net(dense, [o[:-1] for _, o in per_table], [ids for ids, _ in per_table])
        ours = model(batch)
    assert float(theirs.std()) > 1e-3  # not saturated: the comparison means something
    return float((ours - theirs).abs().max())


def test_dlrm_pairs_are_recserve_order() -> None:
    assert dlrm_pairs(5, itself=False) == recserve_pairs(5)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_dot_and_cat_round_trip(tmp_path: Path, interaction: str) -> None:
    torch.manual_seed(0)
    t, d = 3, 4
    top_in = d + (t + 1) * t // 2 if interaction == "dot" else d + t * d
    net = DlrmNet(d, [11, 7, 5], [6, 8, d], [top_in, 8, 1], interaction).eval()
    result = import_checkpoint(_save_dlrm(net, tmp_path / "dlrm.pt"))
    assert result.source_format == "dlrm" and result.model.config.interaction == interaction
    assert _compare(net, result.model) < 1e-6
    assert max_difference(result) < 1e-6
    folder = save_model(result.model, tmp_path / "model")
    assert _compare(net, load_model(folder)) < 1e-6


def test_learned_pooling_weights_are_folded(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = DlrmNet(4, [9, 13], [3, 4], [4 + 3, 5, 1], learned_pooling=True).eval()
    result = import_checkpoint(_save_dlrm(net, tmp_path / "w.pth"))
    assert any("pooling weights" in n for n in result.notes)
    assert _compare(net, result.model) < 1e-6


def test_ambiguous_width_needs_the_interaction(tmp_path: Path) -> None:
    # dlrm_s_pytorch.py's defaults: 3 tables of dim 2 → dot and cat both give 2 + 6 inputs.
    torch.manual_seed(2)
    net = DlrmNet(2, [4, 3, 2], [4, 3, 2], [8, 2, 1], "cat").eval()
    path = _save_dlrm(net, tmp_path / "toy.pt")
    with pytest.raises(ValueError, match="fits both"):
        import_checkpoint(path)
    result = import_checkpoint(path, interaction="cat")
    assert _compare(net, result.model) < 1e-6


def test_self_interaction_is_refused(tmp_path: Path) -> None:
    net = DlrmNet(4, [5, 6], [3, 4], [4 + 6, 1], "dot", arch_interaction_itself=True)
    with pytest.raises(ValueError, match="arch-interaction-itself"):
        import_checkpoint(_save_dlrm(net, tmp_path / "self.pt"))


def test_safetensors_and_wrapper_prefix(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = DlrmNet(4, [6] * 11, [5, 4], [4 + 66, 4, 1]).eval()  # 11 tables: emb_l.10 sorts before .2
    state = {f"module.{k}": v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "dlrm.safetensors"))
    result = import_checkpoint(tmp_path / "dlrm.safetensors", format="dlrm")
    assert _compare(net, result.model) < 1e-6


def test_unrecognised_tensors_are_refused(tmp_path: Path) -> None:
    net = DlrmNet(4, [5], [3, 4], [4 + 1, 1])
    state = dict(net.state_dict())
    state["emb_l.0.weight_q"] = torch.zeros(2, 4)
    torch.save(state, tmp_path / "qr.pt")
    with pytest.raises(ValueError, match="quotient-remainder"):
        import_checkpoint(tmp_path / "qr.pt")
