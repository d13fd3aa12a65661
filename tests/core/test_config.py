"""User-defined model variants from YAML or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recserve.config import ModelConfig, TableConfig, load_model_config, save_model_config
from recserve.loadgen.synthetic import QueryFactory
from recserve.models import build_model, get_config


def test_yaml_variant_of_a_preset(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "base: dlrm-rmc1\npreset: tiny\ninteraction: dot\ntop_mlp: [18, 16, 1]\n"
        "table_overrides: {dtype: fp16, pooling: mean}\n"
    )
    cfg = load_model_config(path)
    assert cfg.interaction == "dot" and cfg.top_mlp == (18, 16, 1)
    assert {t.dtype for t in cfg.tables} == {"fp16"} and {t.pooling for t in cfg.tables} == {"mean"}
    model = build_model(cfg)
    out = model(QueryFactory(cfg).make(3))
    assert out.shape == (3, 1) and torch.isfinite(out).all()


def test_json_round_trip(tmp_path: Path) -> None:
    cfg = get_config("dien", "tiny")
    save_model_config(cfg, tmp_path / "dien.json")
    assert load_model_config(tmp_path / "dien.json") == cfg


def test_full_model_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "own.yml"
    path.write_text(
        "name: my-dlrm\nfamily: dlrm\nnum_dense: 4\nbottom_mlp: [4, 8]\ntop_mlp: [24, 1]\n"
        "tables:\n  - {name: user, num_rows: 100, dim: 8, lookups: 2}\n"
        "  - {name: item, num_rows: 50, dim: 8}\n"
    )
    cfg = load_model_config(path)
    assert cfg.tables == (TableConfig("user", 100, 8, lookups=2), TableConfig("item", 50, 8))
    assert build_model(cfg)(QueryFactory(cfg).make(2)).shape == (2, 1)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name: x\nfamily: nope\ntables: []\n", "family must be one of"),
        (
            "name: x\nfamily: dlrm\ntables: [{name: a, num_rows: 0, dim: 4}]\n",
            "num_rows must be positive",
        ),
        (
            "name: x\nfamily: dlrm\ntables: [{name: a, num_rows: 5, dim: 4, dtype: fp8}]\n",
            "dtype must be one of",
        ),
        ("name: x\nfamily: dlrm\ncolour: red\ntables: []\n", "unknown model config fields"),
        (
            "name: x\nfamily: dlrm\ntables: [{name: a, num_rows: 5, dim: 4, rows: 3}]\n",
            "unknown TableConfig fields",
        ),
    ],
)
def test_bad_configs_are_rejected(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_model_config(path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ValueError, match=".yaml, .yml or .json"):
        load_model_config(tmp_path / "c.toml")


def test_from_dict_matches_to_dict() -> None:
    cfg = get_config("mt-wnd", "tiny")
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
