"""The request containers that flow unchanged from the wire to the kernels.

Sparse features use TorchRec's KeyedJaggedTensor layout: ``values`` holds the ids of every
feature back to back (feature-major: all bags of the first key, then of the second, ...), and
``offsets`` has ``F * B + 1`` entries so bag ``(f, b)`` is ``values[offsets[f*B + b] :
offsets[f*B + b + 1]]``. That single offsets array is exactly what a table-batched kernel reads.

Validation happens once, where a request enters (:func:`validate_batch`), with vectorised checks
on host tensors, so kernels never check bounds and the GPU path never synchronises to report
bad input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recserve.config import ModelConfig


@dataclass
class KeyedJagged:
    """Jagged ids for several features over one batch of B items.

    Shapes: ``values [N] int64``, ``offsets [F*B + 1] int64`` (F = ``len(keys)``), optional
    ``weights [N] float32`` (per-sample weights for weighted pooling).
    """

    keys: tuple[str, ...]
    values: torch.Tensor
    offsets: torch.Tensor
    batch_size: int
    weights: torch.Tensor | None = None
    offset_per_key: list[int] | None = None
    """Host copy of ``offsets[::B]`` (where each feature starts in ``values``), as TorchRec keeps
    it: lets per-feature slicing on a GPU avoid a device-to-host sync. Filled while on the host."""

    def key_offsets(self) -> list[int]:
        """``[F + 1]`` positions in ``values`` where each feature starts (cached on the host)."""
        if self.offset_per_key is None:
            b = self.batch_size
            self.offset_per_key = self.offsets[::b].tolist() if b else [0] * (len(self.keys) + 1)
        return self.offset_per_key

    @classmethod
    def from_lengths(
        cls,
        keys: Sequence[str],
        values: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> KeyedJagged:
        """Build from ``lengths [F*B]`` (ids per bag)."""
        keys = tuple(keys)
        if lengths.dim() != 1 or (keys and lengths.numel() % len(keys)):
            raise ValueError(
                f"lengths must be 1-D with a multiple of {len(keys)} entries, "
                f"got shape {tuple(lengths.shape)}"
            )
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError("lengths must be non-negative")
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
        torch.cumsum(lengths.to(torch.int64), 0, out=offsets[1:])
        batch = lengths.numel() // len(keys) if keys else 0
        return cls(keys, values, offsets, batch, weights)

    @classmethod
    def from_dict(
        cls, features: Mapping[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int
    ) -> KeyedJagged:
        """Build from ``{key: (values, offsets)}`` with per-feature offsets of ``B + 1`` entries."""
        keys = tuple(features)
        values, offsets, base = [], [torch.zeros(1, dtype=torch.int64)], 0
        for key in keys:
            v, o = features[key]
            if o.dim() != 1 or o.numel() != batch_size + 1:
                raise ValueError(
                    f"feature {key!r}: offsets must have batch_size + 1 = {batch_size + 1} "
                    f"entries, got shape {tuple(o.shape)}"
                )
            values.append(v.reshape(-1).to(torch.int64))
            offsets.append(o[1:].to(torch.int64).cpu() - int(o[0]) + base)
            base += int(o[-1]) - int(o[0])
        return cls(
            keys,
            torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
            torch.cat(offsets),
            batch_size,
        )

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def feature(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, offsets)`` of one feature, offsets rebased to start at 0 (``B + 1``)."""
        f = self.keys.index(key)
        b = self.batch_size
        o = self.offsets[f * b : (f + 1) * b + 1]
        start = o[:1]
        return self.values[o[0] : o[-1]], o - start

    def select(self, keys: Sequence[str]) -> KeyedJagged:
        """A KeyedJagged of a subset of features, in the given order."""
        if tuple(keys) == self.keys:
            return self
        parts = [self.feature(k) for k in keys]
        weights = None
        if self.weights is not None:
            weights = torch.cat([self._weights_of(k) for k in keys])
        return _concat(tuple(keys), parts, self.batch_size, weights)

    def slice_items(self, start: int, stop: int) -> KeyedJagged:
        """The items ``[start, stop)`` of every feature (a sub-batch)."""
        b = self.batch_size
        parts, weights = [], []
        for f in range(len(self.keys)):
            o = self.offsets[f * b + start : f * b + stop + 1]
            parts.append((self.values[o[0] : o[-1]], o - o[0]))
            if self.weights is not None:
                weights.append(self.weights[o[0] : o[-1]])
        w = torch.cat(weights) if self.weights is not None else None
        return _concat(self.keys, parts, stop - start, w)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> KeyedJagged:
        key_offsets = (
            self.key_offsets() if self.offsets.device.type == "cpu" else self.offset_per_key
        )
        return KeyedJagged(
            self.keys,
            self.values.to(device, non_blocking=non_blocking),
            self.offsets.to(device, non_blocking=non_blocking),
            self.batch_size,
            None if self.weights is None else self.weights.to(device, non_blocking=non_blocking),
            key_offsets,
        )

    def _weights_of(self, key: str) -> torch.Tensor:
        assert self.weights is not None
        f = self.keys.index(key)
        b = self.batch_size
        return self.weights[self.offsets[f * b] : self.offsets[(f + 1) * b]]


def _concat(
    keys: tuple[str, ...],
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    weights: torch.Tensor | None,
) -> KeyedJagged:
    offsets = [torch.zeros(1, dtype=torch.int64, device=parts[0][1].device if parts else "cpu")]
    base = 0
    for values, o in parts:
        offsets.append(o[1:] + base)
        base += values.numel()
    values = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    return KeyedJagged(keys, values, torch.cat(offsets), batch_size, weights)


@dataclass
class Batch:
    """One query: B items, each with dense features and sparse ids.

    ``dense [B, n_dense] float32`` (``n_dense`` may be 0), ``sparse``: one pooled feature per
    table (keyed by table name) plus the model's sequence features.
    """

    dense: torch.Tensor
    sparse: KeyedJagged

    @property
    def batch_size(self) -> int:
        return self.sparse.batch_size

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.dense.to(device, non_blocking=non_blocking),
            self.sparse.to(device, non_blocking=non_blocking),
        )

    def slice_items(self, start: int, stop: int) -> Batch:
        return Batch(self.dense[start:stop], self.sparse.slice_items(start, stop))


def validate_batch(batch: Batch, config: ModelConfig, max_items: int | None = None) -> None:
    """Check a request against a model once, on the host; raise ``ValueError`` naming the field.

    Checks: non-empty batch (and at most ``max_items``), dense shape/dtype/finiteness, the
    feature keys, offsets (start at 0, non-decreasing, end at ``len(values)``), and every id in
    ``[0, rows)`` of its table. Sequence features must not exceed their ``max_len``.
    """
    b = batch.batch_size
    if b <= 0:
        raise ValueError("empty batch: a request must carry at least one item")
    if max_items is not None and b > max_items:
        raise ValueError(f"batch of {b} items is over the limit of {max_items}")
    dense = batch.dense
    if dense.dtype != torch.float32:
        raise ValueError(f"dense: expected float32, got {dense.dtype}")
    if dense.dim() != 2 or dense.shape[0] != b or dense.shape[1] != config.num_dense:
        raise ValueError(
            f"dense: expected shape [{b}, {config.num_dense}], got {list(dense.shape)}"
        )
    if dense.numel() and not _all_finite(dense):
        bad = (~torch.isfinite(dense)).nonzero()[0].tolist()
        raise ValueError(f"dense: non-finite value (NaN or Inf) at item {bad[0]}, column {bad[1]}")
    validate_sparse(batch.sparse, config)


def validate_sparse(sparse: KeyedJagged, config: ModelConfig) -> None:
    """The sparse half of :func:`validate_batch`."""
    expected = config.feature_keys
    if set(sparse.keys) != set(expected) or len(sparse.keys) != len(expected):
        missing = sorted(set(expected) - set(sparse.keys))
        extra = sorted(set(sparse.keys) - set(expected))
        raise ValueError(f"sparse features: missing {missing}, unexpected {extra}")
    values, offsets, b = sparse.values, sparse.offsets, sparse.batch_size
    if values.dtype != torch.int64 or values.dim() != 1:
        raise ValueError(
            f"sparse values: expected 1-D int64, got {values.dtype} {list(values.shape)}"
        )
    n_off = len(sparse.keys) * b + 1
    if offsets.dim() != 1 or offsets.numel() != n_off:
        raise ValueError(f"sparse offsets: expected {n_off} entries, got {list(offsets.shape)}")
    # Every check below on host arrays: numpy's calls on small arrays cost a few microseconds,
    # torch's several times that, and a request is validated on the serving path.
    host = values.device.type == "cpu" and offsets.device.type == "cpu"
    o = offsets.numpy() if host else offsets.cpu().numpy()
    v = values.numpy() if host else values.cpu().numpy()
    if int(o[0]) != 0:
        raise ValueError(f"sparse offsets: must start at 0, starts at {int(o[0])}")
    if int(o[-1]) != v.size:
        raise ValueError(
            f"sparse offsets: must end at len(values) = {v.size}, ends at {int(o[-1])}"
        )
    steps = np.diff(o)
    if steps.size and int(steps.min()) < 0:
        bag = int(np.flatnonzero(steps < 0)[0])
        raise ValueError(
            f"feature {sparse.keys[bag // b]!r}: offsets decrease at item {bag % b} "
            "(offsets must be non-decreasing)"
        )
    if sparse.weights is not None and sparse.weights.shape != values.shape:
        raise ValueError("sparse weights: must have one weight per id")
    keys = sparse.keys
    rows = {t.name: t.num_rows for t in config.tables}
    seqs = {s.name: s for s in config.sequences}
    bounds = (o[::b] if b else o[:1]).astype(np.int64, copy=False)
    nonempty = bounds[1:] > bounds[:-1]
    mins = np.zeros(len(keys), dtype=np.int64)
    maxs = np.zeros(len(keys), dtype=np.int64)
    if v.size:  # one pass per reduction over all ids: each non-empty feature's min and max
        first = bounds[:-1][nonempty]
        mins[nonempty] = np.minimum.reduceat(v, first)
        maxs[nonempty] = np.maximum.reduceat(v, first)
    limits = np.fromiter(
        (rows[seqs[k].table] if k in seqs else rows[k] for k in keys), np.int64, len(keys)
    )
    longest = steps.reshape(len(keys), b).max(axis=1) if seqs and b else None
    bad = nonempty & ((mins < 0) | (maxs >= limits))
    if not bad.any() and longest is None:
        return
    for f, key in enumerate(keys):  # name the first fault
        seq = seqs.get(key)
        if seq is not None and longest is not None and int(longest[f]) > seq.max_len:
            raise ValueError(
                f"sequence {key!r}: length {int(longest[f])} is over its max_len {seq.max_len}"
            )
        if bad[f]:
            if mins[f] < 0:
                raise ValueError(f"feature {key!r}: negative id {int(mins[f])}")
            raise ValueError(
                f"feature {key!r}: id {int(maxs[f])} out of range for {int(limits[f])} rows"
            )


def _all_finite(t: torch.Tensor) -> bool:
    if t.device.type == "cpu":
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())
