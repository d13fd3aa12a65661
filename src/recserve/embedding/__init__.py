"""Embedding tables and the seam between models and where rows live."""

from recserve.embedding.backend import (
    EmbeddingBackend,
    TorchBackend,
    dequantize_rowwise,
    quantize_rowwise,
)
from recserve.embedding.collection import EmbeddingCollection, SparseOutput

__all__ = [
    "EmbeddingBackend",
    "EmbeddingCollection",
    "SparseOutput",
    "TorchBackend",
    "dequantize_rowwise",
    "quantize_rowwise",
]
