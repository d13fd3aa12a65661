"""The peers timed beside recserve: PyTorch ``embedding_bag`` per table, FBGEMM's TBE.

Each peer is built on the same rows as recserve's backend (copied into its own layout where it
has one) and returns a call per input set, prepared ahead so that timing sees only device work
and the peer's own host code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from recserve.kernels.bench.cases import Inputs, TableSet
from recserve.kernels.pooled import META_FIELDS
from recserve.storage.hbm import TritonBackend

FBGEMM_LIBS = (
    "fbgemm_gpu_config,fbgemm_gpu_tbe_utils,fbgemm_gpu_tbe_common,fbgemm_gpu_tbe_cache,"
    "fbgemm_gpu_tbe_inference,fbgemm_gpu_tbe_training_forward,fbgemm_gpu_tbe_training_backward_pt2"
)


class TorchPeer:
    """``F.embedding_bag`` per table (sum, include_last_offset), outputs concatenated, on the
    case's ids as they are (int32 or int64: both are native to its CUDA kernel; its offsets
    are made ahead in the ids' dtype, which it requires).

    Reads recserve's packed rows in place (fp32/fp16 tables whose rows need no padding are
    plain ``[R, D]`` blocks of the buffer). PyTorch has no CUDA int8 row-wise bag: not for int8.
    """

    name = "torch"

    def __init__(self, backend: TritonBackend, tables: TableSet) -> None:
        if tables.dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError("PyTorch embedding_bag has no int8 row-wise CUDA kernel")
        self.weights = []
        packed = backend.packed(0)
        for i in range(tables.num_tables):
            meta = dict(zip(META_FIELDS, packed.meta_host[i].tolist(), strict=True))
            if meta["stride"] != meta["dim"] or packed.split_hot:
                raise ValueError("torch peer needs unpadded, unreordered rows")
            start = meta["cold_base"]
            rows = tables.rows[i]
            self.weights.append(
                packed.rows[start : start + rows * meta["dim"]].view(rows, meta["dim"])
            )

    def call(self, inputs: Inputs, batch: int) -> Callable[[], torch.Tensor]:
        parts = []
        for i, w in enumerate(self.weights):
            lo, hi = inputs.key_offsets[i], inputs.key_offsets[i + 1]
            off = inputs.offsets[i * batch : (i + 1) * batch + 1] - lo
            ids = inputs.values[lo:hi]
            parts.append((ids, w, off.to(ids.dtype)))  # its kernel wants one dtype for both

        def run() -> torch.Tensor:
            outs = [
                F.embedding_bag(ids, w, off, mode="sum", include_last_offset=True)
                for ids, w, off in parts
            ]
            return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

        return run


def fbgemm_available() -> str | None:
    """None when fbgemm_gpu imports (with the TBE subset's libraries), else why not."""
    os.environ.setdefault("FBGEMM_GPU_LIBS", FBGEMM_LIBS)
    try:
        import fbgemm_gpu  # noqa: F401
    except Exception as exc:  # any import failure means: no FBGEMM peer in this run
        return f"{type(exc).__name__}: {exc}"
    return None


class FbgemmInferencePeer:
    """FBGEMM's inference TBE (``IntNBitTableBatchedEmbeddingBagsCodegen``), int32 ids."""

    name = "fbgemm_inference"

    def __init__(self, backend: TritonBackend, tables: TableSet) -> None:
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
            IntNBitTableBatchedEmbeddingBagsCodegen,
        )

        sparse = {"fp32": SparseType.FP32, "fp16": SparseType.FP16, "int8": SparseType.INT8}[
            tables.dtype
        ]
        dev = backend.device
        specs = [
            (f"t{i}", r, d, sparse, EmbeddingLocation.DEVICE)
            for i, (r, d) in enumerate(zip(tables.rows, tables.dims, strict=True))
        ]
        self.module = IntNBitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=specs, device=dev, output_dtype=SparseType.FP32
        )
        self.module.initialize_weights()
        splits = self.module.split_embedding_weights_with_scale_bias(2)
        for i, (w, scale, bias) in enumerate(splits):
            stored = backend.stored(i)
            d = tables.dims[i]
            if tables.dtype == "int8":
                assert stored.scale_bias is not None
                w[:, :d].copy_(stored.rows)
                scale.copy_(stored.scale_bias[:, :1].half())
                bias.copy_(stored.scale_bias[:, 1:].half())
            else:
                dt = torch.float32 if tables.dtype == "fp32" else torch.float16
                w.view(dt)[:, :d].copy_(stored.rows)
            del stored

    def call(self, inputs: Inputs, batch: int) -> Callable[[], torch.Tensor]:
        idx = inputs.values.to(torch.int32)
        off = inputs.offsets.to(torch.int32)
        return lambda: self.module(idx, off)


class FbgemmTrainingPeer:
    """FBGEMM's training TBE (``SplitTableBatchedEmbeddingBagsCodegen``), forward only."""

    name = "fbgemm_training"

    def __init__(self, backend: TritonBackend, tables: TableSet) -> None:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        if tables.dtype not in ("fp32", "fp16"):
            raise ValueError("the training TBE stores fp32 or fp16 rows")
        precision = SparseType.FP32 if tables.dtype == "fp32" else SparseType.FP16
        self.module = SplitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[
                (r, d, EmbeddingLocation.DEVICE, ComputeDevice.CUDA)
                for r, d in zip(tables.rows, tables.dims, strict=True)
            ],
            optimizer=EmbOptimType.EXACT_SGD,
            learning_rate=0.0,
            weights_precision=precision,
            output_dtype=SparseType.FP32,
            device=backend.device,
        )
        with torch.no_grad():
            for i, w in enumerate(self.module.split_embedding_weights()):
                w.copy_(backend.stored(i).rows)

    def call(self, inputs: Inputs, batch: int) -> Callable[[], torch.Tensor]:
        idx, off = inputs.values.long(), inputs.offsets.long()  # its usual int64, made ahead

        def run() -> Any:
            with torch.no_grad():
                return self.module(idx, off)

        return run
