"""Save → load round trip through safetensors; bad folders are rejected clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from recserve.loadgen.synthetic import QueryFactory
from recserve.models import MODEL_NAMES, build_model, load_model, save_model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_round_trip(name: str, tmp_path: Path) -> None:
    model = build_model(name, preset="tiny", seed=11)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    batch = QueryFactory(model.config, "uniform", seed=0).make(6)
    with torch.inference_mode():
        assert torch.equal(model(batch), loaded(batch))
    assert loaded.config == model.config


def test_round_trip_int8_tables(tmp_path: Path) -> None:
    from recserve.models import get_config

    cfg = get_config("dlrm-rmc2", "tiny").with_tables(dtype="int8")
    model = build_model(cfg, seed=1)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    batch = QueryFactory(cfg, "uniform", seed=0).make(4)
    with torch.inference_mode():
        assert torch.equal(model(batch), loaded(batch))


def test_wrong_tensor_shape_is_rejected(tmp_path: Path) -> None:
    model = build_model("ncf", preset="tiny")
    save_model(model, tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if "weights" in k)
    state[key] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="tensor"):
        load_model(tmp_path)


def test_missing_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    model = build_model("ncf", preset="tiny")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)
