"""The eight DeepRecInfra models, their presets, and save/load."""

from recserve.models.base import RecModel
from recserve.models.io import load_model, save_model
from recserve.models.registry import (
    MODEL_NAMES,
    PRESETS,
    build_model,
    get_config,
    parameter_counts,
)

__all__ = [
    "MODEL_NAMES",
    "PRESETS",
    "RecModel",
    "build_model",
    "get_config",
    "load_model",
    "parameter_counts",
    "save_model",
]
