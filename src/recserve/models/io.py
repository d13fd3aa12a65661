"""Save and load models as a folder: ``config.json`` + ``model.safetensors``.

safetensors holds only tensors, so loading never unpickles anything (``torch.load`` of
untrusted files is never used).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from recserve.config import ModelConfig
from recserve.embedding.collection import BackendFactory
from recserve.models.base import RecModel
from recserve.models.registry import build_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model(model: RecModel, folder: str | Path) -> Path:
    """Write ``model`` to ``folder`` (created if needed); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(
        tensors,
        str(folder / WEIGHTS_FILE),
        metadata={"format": "recserve", "model": model.config.name},
    )
    return folder


def load_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE} (not a recserve model folder)")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_model(
    folder: str | Path,
    device: torch.device | str = "cpu",
    backend_factory: BackendFactory | None = None,
) -> RecModel:
    """Read a model folder written by :func:`save_model`; every tensor must match the config."""
    folder = Path(folder)
    config = load_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE}")
    model = build_model(config, device=device, seed=None, backend_factory=backend_factory)
    state = load_file(str(weights), device=str(torch.device(device)))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in state.items():
        if value.shape != expected[key].shape or value.dtype != expected[key].dtype:
            raise ValueError(
                f"{weights}: tensor {key!r} is {value.dtype} {list(value.shape)}, "
                f"the config needs {expected[key].dtype} {list(expected[key].shape)}"
            )
    model.load_state_dict(state)
    return model
