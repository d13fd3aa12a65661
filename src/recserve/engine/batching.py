"""Coalescing whole queries into one batch, optionally straight into (pinned) buffers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from recserve.types import Batch, KeyedJagged


@dataclass
class HostBuffers:
    """Preallocated inputs of one batch (pinned on a GPU machine): ``dense [max_items,
    n_dense]``, ``values [max_values]``, ``offsets [F*max_items + 1]``."""

    dense: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def allocate(
        cls,
        max_items: int,
        max_values: int,
        num_features: int,
        num_dense: int,
        device: torch.device | str = "cpu",
        pin: bool = False,
    ) -> HostBuffers:
        def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)

        return cls(
            empty((max_items, num_dense), torch.float32),
            empty((max_values,), torch.int64),
            empty((num_features * max_items + 1,), torch.int64),
        )

    def fits(self, batch_size: int, num_values: int) -> bool:
        return batch_size <= self.dense.shape[0] and num_values <= self.values.numel()


def concat_batches(
    batches: Sequence[Batch], keys: tuple[str, ...], out: HostBuffers | None = None
) -> Batch:
    """One batch holding every item of ``batches`` in order (features in ``keys`` order).

    Written into ``out`` when given (it must be large enough); the result's ``offset_per_key``
    is filled on the host, so the batch can go to a GPU without a device sync later.
    """
    sparses = [b.sparse if b.sparse.keys == keys else b.sparse.select(keys) for b in batches]
    total = sum(b.batch_size for b in batches)
    if len(batches) == 1 and out is None:
        return Batch(batches[0].dense, sparses[0])
    key_offsets = [sp.key_offsets() for sp in sparses]
    values, lengths, weights, starts = [], [], [], [0]
    for f in range(len(keys)):
        for sp, ko in zip(sparses, key_offsets, strict=True):
            b = sp.batch_size
            values.append(sp.values[ko[f] : ko[f + 1]])
            off = sp.offsets[f * b : (f + 1) * b + 1]
            lengths.append(off[1:] - off[:-1])
            if sp.weights is not None:
                weights.append(sp.weights[ko[f] : ko[f + 1]])
        starts.append(starts[-1] + sum(ko[f + 1] - ko[f] for ko in key_offsets))
    if weights and len(weights) != len(values):
        raise ValueError("cannot coalesce queries with and without per-sample weights")
    n = starts[-1]
    if out is None:
        dense = torch.cat([b.dense for b in batches])
        flat = torch.cat(values)
        offsets = torch.empty(len(keys) * total + 1, dtype=torch.int64)
    else:
        if not out.fits(total, n):
            raise ValueError(f"batch of {total} items and {n} ids does not fit the buffers")
        dense = torch.cat([b.dense for b in batches], out=out.dense[:total])
        flat = torch.cat(values, out=out.values[:n])
        offsets = out.offsets[: len(keys) * total + 1]
    offsets[0] = 0
    torch.cumsum(torch.cat(lengths), 0, out=offsets[1:])
    sparse = KeyedJagged(
        keys, flat, offsets, total, torch.cat(weights) if weights else None, starts
    )
    return Batch(dense, sparse)
