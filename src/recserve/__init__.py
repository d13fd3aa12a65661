"""recserve: serve deep learning recommendation models at the highest throughput a tail-latency
target allows."""

from recserve.config import ModelConfig, SequenceConfig, TableConfig, load_model_config
from recserve.types import Batch, KeyedJagged, validate_batch

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "KeyedJagged",
    "ModelConfig",
    "SequenceConfig",
    "TableConfig",
    "__version__",
    "load_model_config",
    "validate_batch",
]
