"""The seam between models and where embedding rows live.

An :class:`EmbeddingBackend` owns a group of tables (their rows, on some tier) and answers two
questions: the pooled embeddings of jagged ids for all its tables at once (table-batched, the
KeyedJagged layout), and the rows of given ids of one table (for behaviour sequences). Models
never see backends; :class:`~recserve.embedding.collection.EmbeddingCollection` routes features
to them. :class:`TorchBackend` is the pure-torch backend (CPU and CUDA) and the reference every
other backend is tested against.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from recserve.config import TORCH_DTYPES, TableConfig


class EmbeddingBackend(nn.Module, ABC):
    """Rows of several tables, and the lookups a model needs from them."""

    graph_safe: bool = False
    """Lookups read ``key_offsets`` at most as a hint (never for correctness) and keep no
    host-side state per batch, so a CUDA graph that captured them stays right for other
    batches of the same size (the pipeline then captures the whole forward)."""

    def __init__(self, tables: tuple[TableConfig, ...]) -> None:
        super().__init__()
        self.tables = tuple(tables)
        self.output_dim = sum(t.dim for t in self.tables)

    @abstractmethod
    def pooled(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        batch_size: int,
        weights: torch.Tensor | None = None,
        key_offsets: list[int] | None = None,
    ) -> torch.Tensor:
        """Pooled embeddings ``[B, ΣD]`` float32 of this backend's tables.

        ``values [N]`` and ``offsets [T*B + 1]`` are in KeyedJagged layout over this backend's
        tables, in order (``values`` may run on past them); ``weights [N]`` are optional
        per-sample weights; ``key_offsets [T + 1]`` is the host copy of ``offsets[::B]`` for
        backends that slice per table (it saves them a device sync).
        """

    @abstractmethod
    def rows(self, table: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``[N, D]`` float32 of table number ``table`` (index into ``self.tables``)."""

    @abstractmethod
    def dense_weight(self, table: int) -> torch.Tensor:
        """The whole table as float32 ``[rows, D]`` (for export and checks; may be large)."""


def check_table_weight(table: TableConfig, weight: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``weight`` is ``[rows, D]`` for ``table``."""
    if tuple(weight.shape) != (table.num_rows, table.dim):
        raise ValueError(
            f"table {table.name!r}: expected weight [{table.num_rows}, {table.dim}], "
            f"got {list(weight.shape)}"
        )


def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise int8 (as uint8) quantisation: ``row ≈ q * scale + bias``.

    Returns ``q [R, D] uint8`` and ``scale_bias [R, 2] float32`` (column 0 scale, 1 bias),
    the layout FBGEMM uses for its 8-bit rows (with fp32 instead of fp16 scale/bias).
    """
    w = weight.float()
    lo = w.amin(dim=1, keepdim=True)
    hi = w.amax(dim=1, keepdim=True)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((w - lo) / scale).clamp_(0, 255).to(torch.uint8)
    return q, torch.cat([scale, lo], dim=1)


def dequantize_rowwise(q: torch.Tensor, scale_bias: torch.Tensor) -> torch.Tensor:
    return q.float() * scale_bias[:, :1] + scale_bias[:, 1:]


class TorchBackend(EmbeddingBackend):
    """Tables as plain tensors on one device; lookups with ``torch.nn.functional`` ops.

    fp32 tables use ``F.embedding_bag`` (PyTorch's EmbeddingBag kernel); fp16/bf16/int8 rows
    are gathered, converted to float32 and reduced (fp32 accumulation, as the kernels do).
    """

    def __init__(self, tables: tuple[TableConfig, ...], device: torch.device | str = "cpu") -> None:
        super().__init__(tables)
        self.weights = nn.ParameterList()
        self._scale_bias: list[str] = []
        for i, t in enumerate(self.tables):
            dtype = TORCH_DTYPES[t.dtype]
            w = torch.empty(t.num_rows, t.dim, dtype=dtype, device=device)
            self.weights.append(nn.Parameter(w, requires_grad=False))
            name = f"scale_bias_{i}"
            if t.dtype == "int8":
                self.register_buffer(name, torch.empty(t.num_rows, 2, device=device))
            else:
                self.register_buffer(name, None)
            self._scale_bias.append(name)

    def scale_bias(self, table: int) -> torch.Tensor | None:
        sb: torch.Tensor | None = getattr(self, self._scale_bias[table])
        return sb

    @torch.no_grad()
    def load_table(self, table: int, weight: torch.Tensor) -> None:
        """Set a table's rows from a float ``[rows, D]`` tensor (quantising int8 tables)."""
        t = self.tables[table]
        check_table_weight(t, weight)
        dest = self.weights[table]
        if t.dtype == "int8":
            q, sb = quantize_rowwise(weight.to(dest.device))
            dest.copy_(q)
            sb_buf = self.scale_bias(table)
            assert sb_buf is not None
            sb_buf.copy_(sb)
        else:
            dest.copy_(weight)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """DLRM's initialisation: rows uniform in ±sqrt(1 / rows), drawn in chunks."""
        for i, t in enumerate(self.tables):
            bound = math.sqrt(1.0 / t.num_rows)
            w = self.weights[i]
            chunk = max(1, (1 << 24) // t.dim)
            for start in range(0, t.num_rows, chunk):
                stop = min(start + chunk, t.num_rows)
                rows = torch.rand(stop - start, t.dim, generator=generator, device=w.device)
                rows = rows.mul_(2 * bound).sub_(bound)
                if t.dtype == "int8":
                    q, sb = quantize_rowwise(rows)
                    w[start:stop] = q
                    sb_buf = self.scale_bias(i)
                    assert sb_buf is not None
                    sb_buf[start:stop] = sb
                else:
                    w[start:stop] = rows.to(w.dtype)

    def rows(self, table: int, ids: torch.Tensor) -> torch.Tensor:
        w = self.weights[table]
        r = F.embedding(ids, w) if w.dtype != torch.uint8 else w[ids]
        if self.tables[table].dtype == "int8":
            sb = self.scale_bias(table)
            assert sb is not None
            return dequantize_rowwise(r, sb[ids])
        return r.float()

    def dense_weight(self, table: int) -> torch.Tensor:
        w = self.weights[table]
        if self.tables[table].dtype == "int8":
            sb = self.scale_bias(table)
            assert sb is not None
            return dequantize_rowwise(w, sb)
        return w.float()

    def pooled(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        batch_size: int,
        weights: torch.Tensor | None = None,
        key_offsets: list[int] | None = None,
    ) -> torch.Tensor:
        b = batch_size
        if key_offsets is None:
            key_offsets = offsets[::b].tolist()
        outs = []
        for i, t in enumerate(self.tables):
            lo, hi = key_offsets[i], key_offsets[i + 1]
            ids = values[lo:hi]
            off = offsets[i * b : (i + 1) * b + 1] - lo
            psw = None if weights is None else weights[lo:hi]
            w = self.weights[i]
            if t.dtype == "fp32" and (psw is None or t.pooling == "sum"):
                outs.append(
                    F.embedding_bag(
                        ids,
                        w,
                        off,
                        mode=t.pooling,
                        include_last_offset=True,
                        per_sample_weights=psw,
                    )
                )
            else:
                outs.append(self._pooled_generic(i, ids, off, psw))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def _pooled_generic(
        self,
        table: int,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        weights: torch.Tensor | None,
    ) -> torch.Tensor:
        """Gather, convert to fp32, (weight,) reduce per bag: any dtype, sum or mean."""
        t = self.tables[table]
        b = offsets.numel() - 1
        lengths = offsets[1:] - offsets[:-1]
        bag = torch.repeat_interleave(
            torch.arange(b, device=ids.device), lengths, output_size=ids.numel()
        )
        rows = self.rows(table, ids)
        if weights is not None:
            rows = rows * weights.unsqueeze(1).float()
        out = torch.zeros(b, t.dim, device=rows.device, dtype=torch.float32)
        out.index_add_(0, bag, rows)
        if t.pooling == "mean":
            out = out / lengths.clamp(min=1).unsqueeze(1).to(out.dtype)
        return out
