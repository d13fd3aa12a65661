"""Helpers of the server tests: synthetic queries, references, tritonclient inputs."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from recserve.config import ModelConfig
from recserve.loadgen.synthetic import QueryFactory
from recserve.models import RecModel
from recserve.server.client import batch_tensors
from recserve.types import Batch

REPO_MODELS = ("wnd", "dlrm-rmc2", "mt-wnd", "ncf", "din")
MAX_ITEMS = 64
MAX_BODY = 1 << 20


def query(config: ModelConfig, batch_size: int, seed: int = 0, jitter: bool = True) -> Batch:
    """A synthetic query; with ``jitter`` bag sizes vary (empty bags included)."""
    batch = QueryFactory(config, seed=seed, jitter=jitter).make(batch_size)
    keys = config.feature_keys
    return Batch(batch.dense, batch.sparse.select(keys))


def reference(model: RecModel, batch: Batch) -> np.ndarray:
    with torch.inference_mode():
        return model(batch).numpy()


def triton_inputs(module: Any, batch: Batch, config: ModelConfig, binary: bool = True) -> list[Any]:
    """``tritonclient.http`` or ``.grpc`` InferInputs of a batch (as a user would build them)."""
    inputs = []
    for name, datatype, shape, data in batch_tensors(batch, config):
        dtype = np.float32 if datatype == "FP32" else np.int64
        tensor = module.InferInput(name, shape, datatype)
        array = np.frombuffer(data, dtype=dtype).reshape(shape)
        if module.__name__.endswith("http"):
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)
