"""Coalescing whole queries into one batch, optionally straight into (pinned) buffers."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from recserve.types import Batch, KeyedJagged

_PARALLEL_COPY = 1 << 17
"""Ids from which a join into new tensors copies with PyTorch (multi-threaded) rather than
numpy (one core, but a few microseconds less per call)."""


Join = tuple[np.ndarray, Sequence[np.ndarray]]
"""``(dst, parts)``: ``parts`` laid back to back along ``dst``'s first axis, from its start."""


class Copier:
    """Joins of many arrays spread over a few threads (numpy releases the interpreter lock
    while it copies), for joins of megabytes: one core copies about 5 GB/s, and a GPU batch of
    dlrm-rmc1 queries is tens of megabytes of ids.

    :meth:`join` returns once every copy is done. Each thread makes one ``np.concatenate``
    call per destination it writes to, whatever the number of parts: a join of sixteen wnd
    queries is 880 parts of 2 KB, and a Python call per part (each taking the interpreter lock
    back) cost more than the copy, the more so with many other threads in the process. Below
    ``min_bytes`` in all, or with one thread, the calling thread joins alone. Measured on the
    H200 machine: four threads joined 20 MB of dlrm-rmc2 ids in 3.8 ms where one took 6.8 ms
    (``probe_gpu_coalescing``), but made a 1.3 MB dlrm-rmc1 query slower, and an in-process
    engine joining wnd queries (up to 16 of 0.6 MB, 64 callers) served 3868-4013 QPS with four
    threads against 4123-4599 with one (``probe_stage_threads``): the hand-offs cost more than
    the copy saves, hence 16 MB. Parts are cut where a thread's share ends, so that one big
    query spreads too. Safe to call from one thread at a time."""

    def __init__(self, threads: int = 4, min_bytes: int = 16 << 20) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.min_bytes = min_bytes
        self._pool = (
            ThreadPoolExecutor(threads - 1, thread_name_prefix="recserve-copy")
            if threads > 1
            else None
        )
        self._lock = threading.Lock()

    def copy(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        """``np.copyto(dst, src)`` for every ``(dst, src)`` (same shapes)."""
        self.join([(dst, [src]) for dst, src in pairs])

    def join(self, jobs: Sequence[Join]) -> None:
        """For every ``(dst, parts)``: ``dst[:rows]`` = ``np.concatenate(parts)``."""
        total = sum(p.nbytes for _, parts in jobs for p in parts)
        if self._pool is None or total < self.min_bytes:
            for dst, parts in jobs:
                _join_into(dst, parts)
            return
        groups = self._split(jobs, total)
        with self._lock:
            futures: list[Future[None]] = [self._pool.submit(_join_all, g) for g in groups[1:]]
            _join_all(groups[0])
            for f in futures:
                f.result()

    def _split(self, jobs: Sequence[Join], total: int) -> list[list[Join]]:
        """``threads`` groups of about equal bytes, in order, each a list of flat ``(dst
        slice, parts)`` runs; parts cut where a group ends."""
        share = -(-total // self.threads)
        groups: list[list[Join]] = [[]]
        room = share
        for dst, parts in jobs:
            flat = dst.reshape(-1)  # dst is contiguous: a view
            start = at = 0  # where the open run starts in flat, and how far it reaches
            run: list[np.ndarray] = []
            for part in parts:
                s = part.reshape(-1)  # a copy only where a part is not contiguous
                item = max(1, s.itemsize)
                while s.size:
                    if room < item and len(groups) < self.threads:
                        if run:
                            groups[-1].append((flat[start:at], run))
                        groups.append([])
                        run, start, room = [], at, share
                    last = len(groups) == self.threads  # takes whatever rounding left over
                    take = s.size if last else min(s.size, max(1, room // item))
                    run.append(s[:take])
                    s = s[take:]
                    at += take
                    room -= take * item
            if run:
                groups[-1].append((flat[start:at], run))
        return [g for g in groups if g]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _join_into(dst: np.ndarray, parts: Sequence[np.ndarray]) -> None:
    if len(parts) == 1:
        np.copyto(dst[: parts[0].shape[0]], parts[0])
    elif parts:
        np.concatenate(parts, out=dst[: sum(p.shape[0] for p in parts)])


def _join_all(jobs: list[Join]) -> None:
    for dst, parts in jobs:
        _join_into(dst, parts)


_ONE_THREAD = Copier(1)
"""What joins into buffers copy with when no :class:`Copier` is given."""


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
    batches: Sequence[Batch],
    keys: tuple[str, ...],
    out: HostBuffers | None = None,
    copier: Copier | None = None,
) -> Batch:
    """One batch holding every item of ``batches`` in order (features in ``keys`` order).

    Written into ``out`` when given (it must be large enough); the result's ``offset_per_key``
    is filled on the host, so the batch can go to a GPU without a device sync later. Host
    batches are joined with numpy views: one slice per (feature, batch) and one cumulative sum
    for all offsets, so joining costs microseconds, not a torch call per slice. Into ``out``,
    the dense features and ids are copied by ``copier``'s threads (the calling thread alone
    when none is given).
    """
    sparses = [b.sparse if b.sparse.keys == keys else b.sparse.select(keys) for b in batches]
    total = sum(b.batch_size for b in batches)
    if len(batches) == 1:
        if out is None:
            return Batch(batches[0].dense, sparses[0])
        return _copy_one(batches[0].dense, sparses[0], out, copier or _ONE_THREAD)
    nf = len(keys)
    values = [_host(sp.values) for sp in sparses]
    offsets = [_host(sp.offsets) for sp in sparses]
    starts = [o[:: sp.batch_size] if sp.batch_size else np.zeros(nf + 1, np.int64)
              for o, sp in zip(offsets, sparses, strict=True)]  # fmt: skip
    weighted = [sp.weights is not None for sp in sparses]
    if any(weighted) and not all(weighted):
        raise ValueError("cannot coalesce queries with and without per-sample weights")
    pieces = [v[s[f] : s[f + 1]] for f in range(nf) for v, s in zip(values, starts, strict=True)]
    per_key = np.concatenate([[0], np.cumsum(sum(np.diff(s) for s in starts))]).tolist()
    n = per_key[-1]
    dense = [b.dense for b in batches]
    if out is None:
        dense_out = torch.cat(dense)
        flat = torch.empty(n, dtype=torch.int64)
        joined = torch.empty(nf * total + 1, dtype=torch.int64)
        if n >= _PARALLEL_COPY:  # megabytes of ids: PyTorch's copies use every core
            torch.cat([torch.from_numpy(p) for p in pieces], out=flat)
        else:
            np.concatenate(pieces, out=flat.numpy())
    else:
        if not out.fits(total, n):
            raise ValueError(f"batch of {total} items and {n} ids does not fit the buffers")
        dense_out = out.dense[:total]
        flat = out.values[:n]
        joined = out.offsets[: nf * total + 1]
        (copier or _ONE_THREAD).join(
            [(dense_out.numpy(), [_host(d) for d in dense]), (flat.numpy(), pieces)]
        )
    lengths = np.concatenate(
        [np.diff(o).reshape(nf, sp.batch_size) for o, sp in zip(offsets, sparses, strict=True)],
        axis=1,
    )
    joined_np = joined.numpy()
    joined_np[0] = 0
    np.cumsum(lengths.reshape(-1), out=joined_np[1:])
    weights = None
    if all(weighted):
        w = [_host(sp.weights) for sp in sparses]  # type: ignore[arg-type]
        weights = torch.from_numpy(
            np.concatenate(
                [x[s[f] : s[f + 1]] for f in range(nf) for x, s in zip(w, starts, strict=True)]
            )
        )
    sparse = KeyedJagged(keys, flat, joined, total, weights, per_key)
    return Batch(dense_out, sparse)


def _copy_one(dense: torch.Tensor, sparse: KeyedJagged, out: HostBuffers, copier: Copier) -> Batch:
    """One query into ``out``: its layout is already the batch's, so three flat copies."""
    b, n = sparse.batch_size, sparse.values.numel()
    if not out.fits(b, n):
        raise ValueError(f"batch of {b} items and {n} ids does not fit the buffers")
    head = len(sparse.keys) * b + 1
    copier.copy(
        [
            (out.dense[:b].numpy(), _host(dense)),
            (out.values[:n].numpy(), _host(sparse.values)),
            (out.offsets[:head].numpy(), _host(sparse.offsets)),
        ]
    )
    weights = sparse.weights
    if weights is not None:
        weights = torch.from_numpy(_host(weights).copy())
    per_key = sparse.key_offsets()
    return Batch(
        out.dense[:b],
        KeyedJagged(sparse.keys, out.values[:n], out.offsets[:head], b, weights, per_key),
    )


def _host(t: torch.Tensor) -> np.ndarray:
    return (t if t.device.type == "cpu" else t.cpu()).numpy()
