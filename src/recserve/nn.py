"""Drop-in embedding modules for users who bring their own PyTorch model ("plug-and-play").

:class:`EmbeddingBag` takes the arguments and inputs of :class:`torch.nn.EmbeddingBag` (modes
``sum`` and ``mean``); :class:`EmbeddingBagCollection` pools many tables from one
:class:`~recserve.types.KeyedJagged` in one kernel launch; :func:`replace_embedding_bags`
swaps every ``nn.EmbeddingBag`` of an existing model for the recserve one, weights included.
Rows may be stored as fp32, fp16, bf16 or row-wise int8; inference only (no gradients).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from recserve.config import TableConfig
from recserve.kernels.tuning import KernelTuner
from recserve.storage.hbm import TritonBackend
from recserve.types import KeyedJagged


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class EmbeddingBag(nn.Module):
    """``torch.nn.EmbeddingBag`` backed by recserve's pooled-lookup kernel.

    Inputs as torch's: ``input [B, L]`` (fixed bags) or ``input [N]`` with ``offsets [B]``
    (``[B + 1]`` with ``include_last_offset``), optional ``per_sample_weights [N]``. Output
    ``[B, D]`` in ``output_dtype``. ``dtype`` is the row storage type.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        mode: str = "mean",
        include_last_offset: bool = False,
        *,
        dtype: str = "fp32",
        device: torch.device | str | None = None,
        output_dtype: torch.dtype = torch.float32,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        _weight: torch.Tensor | None = None,
        tuner: KernelTuner | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode {mode!r} is not supported (use 'sum' or 'mean')")
        if padding_idx is not None or max_norm is not None:
            raise ValueError("padding_idx and max_norm are not supported")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.mode = mode
        self.include_last_offset = include_last_offset
        table = TableConfig("bag", num_embeddings, embedding_dim, pooling=mode, dtype=dtype)  # type: ignore[arg-type]
        self.backend = TritonBackend(
            (table,),
            _default_device(device),
            output_dtype=output_dtype,
            tuner=tuner,
            init=_weight is None,
        )
        if _weight is not None:
            self.backend.load_table(0, _weight)

    @classmethod
    def from_pretrained(
        cls,
        embeddings: torch.Tensor,
        mode: str = "mean",
        include_last_offset: bool = False,
        **kwargs: object,
    ) -> EmbeddingBag:
        """Rows from a float ``[num_embeddings, D]`` tensor (on ``device``, default: its own)."""
        kwargs.setdefault("device", embeddings.device)
        return cls(
            embeddings.shape[0],
            embeddings.shape[1],
            mode,
            include_last_offset,
            _weight=embeddings,
            **kwargs,  # type: ignore[arg-type]
        )

    @classmethod
    def from_torch(cls, module: nn.EmbeddingBag, **kwargs: object) -> EmbeddingBag:
        """The recserve twin of a ``torch.nn.EmbeddingBag`` (same rows, mode and offsets)."""
        if module.padding_idx is not None or module.max_norm is not None:
            raise ValueError("padding_idx and max_norm are not supported")
        return cls.from_pretrained(
            module.weight.detach(), module.mode, module.include_last_offset, **kwargs
        )

    @property
    def weight(self) -> torch.Tensor:
        """The rows as float32 ``[num_embeddings, D]`` (a copy; int8 rows dequantised)."""
        return self.backend.dense_weight(0)

    def load_weight(self, weight: torch.Tensor) -> None:
        self.backend.load_table(0, weight)

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when input is 2-D")
            b, length = input.shape
            values = input.reshape(-1)
            offsets = torch.arange(0, b * length + 1, max(length, 1), device=input.device)
            if length == 0:
                offsets = torch.zeros(b + 1, dtype=torch.int64, device=input.device)
            weights = None if per_sample_weights is None else per_sample_weights.reshape(-1)
        elif input.dim() == 1:
            if offsets is None or offsets.dim() != 1:
                raise ValueError("offsets (1-D) are required when input is 1-D")
            values, weights = input, per_sample_weights
            if not self.include_last_offset:
                end = offsets.new_full((1,), values.numel())
                offsets = torch.cat([offsets, end])
            b = offsets.numel() - 1
        else:
            raise ValueError(f"input must be 1-D or 2-D, got {input.dim()}-D")
        return self.backend.pooled(values, offsets, b, weights)

    def extra_repr(self) -> str:
        t = self.backend.tables[0]
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}, dtype={t.dtype}"


class EmbeddingBagCollection(nn.Module):
    """Many pooled tables, one launch: ``KeyedJagged -> [B, ΣD]`` (tables in order).

    ``forward`` accepts features in any key order holding at least these tables' keys.
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        device: torch.device | str | None = None,
        *,
        output_dtype: torch.dtype = torch.float32,
        tuner: KernelTuner | None = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        self.tables = tuple(tables)
        self.keys = tuple(t.name for t in self.tables)
        self.dims = [t.dim for t in self.tables]
        self.backend = TritonBackend(
            self.tables, _default_device(device), output_dtype=output_dtype, tuner=tuner, init=init
        )

    @classmethod
    def from_torch(
        cls,
        bags: Mapping[str, nn.EmbeddingBag],
        dtype: str = "fp32",
        device: torch.device | str | None = None,
        **kwargs: object,
    ) -> EmbeddingBagCollection:
        """One collection from named ``torch.nn.EmbeddingBag`` modules (e.g. an ``nn.ModuleDict``)."""
        tables = [
            TableConfig(name, m.num_embeddings, m.embedding_dim, pooling=m.mode, dtype=dtype)  # type: ignore[arg-type]
            for name, m in bags.items()
        ]
        first = next(iter(bags.values()))
        out = cls(tables, device or first.weight.device, init=False, **kwargs)  # type: ignore[arg-type]
        for i, m in enumerate(bags.values()):
            out.backend.load_table(i, m.weight.detach())
        return out

    def forward(self, features: KeyedJagged) -> torch.Tensor:
        if features.keys[: len(self.keys)] != self.keys:
            features = features.select(self.keys)
        b, n = features.batch_size, len(self.keys)
        key_offsets = features.offset_per_key
        return self.backend.pooled(
            features.values,
            features.offsets[: n * b + 1],
            b,
            features.weights,
            None if key_offsets is None else key_offsets[: n + 1],
        )

    def split(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, ΣD]`` -> ``{table name: [B, D]}`` (views)."""
        return dict(zip(self.keys, torch.split(pooled, self.dims, dim=1), strict=True))


def replace_embedding_bags(model: nn.Module, dtype: str = "fp32", **kwargs: object) -> int:
    """Swap every ``torch.nn.EmbeddingBag`` inside ``model`` for :class:`EmbeddingBag` (same
    rows, stored as ``dtype``), in place. Returns how many were replaced."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.EmbeddingBag):
            setattr(model, name, EmbeddingBag.from_torch(child, dtype=dtype, **kwargs))
            count += 1
        else:
            count += replace_embedding_bags(child, dtype, **kwargs)
    return count
