"""TorchRec DLRM state dicts → recserve: predictions equal sigmoid(TorchRec's logits)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from upstream_models import DLRMTrain, EmbeddingBagCollection, TorchRecDLRM

from recserve.importers import import_checkpoint, max_difference
from recserve.importers.assemble import pair_permutation, random_inputs, recserve_pairs
from recserve.importers.torchrec import torchrec_pairs
from recserve.models import load_model, save_model

D = 4


def _dlrm(tables: list[tuple[str, int, int, list[str]]], seed: int = 0) -> TorchRecDLRM:
    torch.manual_seed(seed)
    return TorchRecDLRM(EmbeddingBagCollection(tables), 5, [8, D], [16, 8, 1]).eval()


def _compare(dlrm: TorchRecDLRM, model: torch.nn.Module) -> float:
    batch, dense, per_table = random_inputs(model.config, batch_size=32, seed=7)
    with torch.no_grad():
        theirs = torch.sigmoid(dlrm(dense, per_table))
        ours = model(batch)
    assert float(theirs.std()) > 1e-3  # not saturated: the comparison means something
    return float((ours - theirs).abs().max())


def test_triu_order_differs_and_permutation_maps_it() -> None:
    n = 4
    assert torchrec_pairs(n) != recserve_pairs(n)
    perm = pair_permutation(torchrec_pairs(n), n)
    assert sorted(perm) == list(range(n * (n - 1) // 2)) and perm != sorted(perm)
    for k, (i, j) in enumerate(recserve_pairs(n)):
        a, b = torchrec_pairs(n)[perm[k]]
        assert {a, b} == {i, j}


def test_round_trip_through_dlrm_train_wrapper(tmp_path: Path) -> None:
    dlrm = _dlrm([("t_a", 10, D, ["a"]), ("t_b", 7, D, ["b"]), ("t_c", 13, D, ["c"])])
    torch.save(DLRMTrain(dlrm).state_dict(), tmp_path / "torchrec.pt")
    result = import_checkpoint(tmp_path / "torchrec.pt")
    assert result.source_format == "torchrec"
    assert result.model.config.feature_keys == ("t_a", "t_b", "t_c")
    assert _compare(dlrm, result.model) < 1e-6
    assert max_difference(result) < 1e-6
    assert _compare(dlrm, load_model(save_model(result.model, tmp_path / "m"))) < 1e-6


def test_shared_table_read_by_two_features(tmp_path: Path) -> None:
    dlrm = _dlrm([("users", 9, D, ["viewer", "author"]), ("item_table", 11, D, ["item"])], seed=1)
    torch.save({"model_state_dict": dlrm.state_dict(), "epoch": 3}, tmp_path / "shared.pt")
    features = [("viewer", "users"), ("author", "users"), ("item", "item_table")]
    result = import_checkpoint(tmp_path / "shared.pt", features=features)
    assert result.model.config.feature_keys == ("viewer", "author", "item")
    assert _compare(dlrm, result.model) < 1e-6


def test_safetensors_tables_in_natural_order(tmp_path: Path) -> None:
    names = [f"t_cat_{i}" for i in range(12)]  # alphabetical order would put t_cat_10 third
    dlrm = _dlrm([(n, 5 + i, D, [n]) for i, n in enumerate(names)], seed=2)
    state = {k: v.contiguous() for k, v in dlrm.state_dict().items()}
    save_file(state, str(tmp_path / "dlrm.safetensors"))
    result = import_checkpoint(tmp_path / "dlrm.safetensors")
    assert result.model.config.feature_keys == tuple(names)
    assert any("naturally" in n for n in result.notes)
    assert _compare(dlrm, result.model) < 1e-6


def test_embedding_bag_collection_alone_is_not_a_model(tmp_path: Path) -> None:
    dlrm = _dlrm([("t", 5, D, ["t"])])
    state = {k: v for k, v in dlrm.state_dict().items() if k.startswith("sparse_arch")}
    torch.save(state, tmp_path / "ebc.pt")
    with pytest.raises(ValueError, match="not a model"):
        import_checkpoint(tmp_path / "ebc.pt")


def test_dcn_variant_is_refused(tmp_path: Path) -> None:
    dlrm = _dlrm([("t", 5, D, ["t"])])
    state = dict(dlrm.state_dict())
    state["inter_arch.crossnet.W_kernels.0"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "dcn.pt")
    with pytest.raises(ValueError, match="DLRM_DCN"):
        import_checkpoint(tmp_path / "dcn.pt")
