"""Queries kept in memory the GPU runner reads in place (the in-process callers' arena).

The server's front ends decode requests into shared files the GPU runner maps, so a request's
ids cross to the device with no copy in the engine's process. :class:`QueryMemory` gives
callers of the in-process engine the same: batches written once into a shared file (with each
array aligned to 64 bytes) that the runner maps and page-locks. A GPU batch of one such query
is then copied to the device straight from it, and a batch of several is joined on the device
(:mod:`recserve.kernels.join`), instead of the engine's loop thread copying every byte into
the runner's slot. A load generator that replays a pool of queries puts the pool there once.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from recserve.engine.shared import pick_shared_dir
from recserve.types import Batch, KeyedJagged

if TYPE_CHECKING:
    from recserve.engine.engine import RecEngine

_ALIGN = 64


def _nbytes(batch: Batch) -> int:
    s = batch.sparse
    arrays = [batch.dense, s.values, s.offsets] + ([s.weights] if s.weights is not None else [])
    return sum(-(-t.numel() * t.element_size() // _ALIGN) * _ALIGN + _ALIGN for t in arrays)


class QueryMemory:
    """``batches`` copied into one shared file and offered to ``engine``'s GPU runner.

    ``batches`` (the copies) are what to submit. ``shared`` tells whether the runner reads
    them in place (False where it cannot: no GPU runner process, sharing turned off). Close it
    (or use it as a context manager) after the last of its queries is answered."""

    def __init__(
        self, engine: RecEngine, batches: Sequence[Batch], folder: str | None = None
    ) -> None:
        self._engine = engine
        size = -(-max(1, sum(_nbytes(b) for b in batches)) // mmap.PAGESIZE) * mmap.PAGESIZE
        where = pick_shared_dir(size, folder or engine.engine_config.shared_dir)
        fd, self.path = tempfile.mkstemp(prefix="recserve-queries-", dir=where)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._at = 0
        self.batches = [self._put(b) for b in batches]
        self._pinned = False
        self._handle = engine.share_memory(self.path, self.address, size)

    @property
    def address(self) -> int:
        return int(self._bytes.data_ptr())

    @property
    def shared(self) -> bool:
        return self._handle is not None

    def _array(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        view = self._bytes[self._at : self._at + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        self._at += -(-nbytes // _ALIGN) * _ALIGN + _ALIGN
        return view

    def _put(self, batch: Batch) -> Batch:
        s = batch.sparse
        dense = self._array(batch.dense.contiguous())
        values = self._array(s.values.contiguous())
        offsets = self._array(s.offsets.contiguous())
        weights = None if s.weights is None else self._array(s.weights.contiguous())
        key_offsets = s.key_offsets()
        return Batch(
            dense, KeyedJagged(s.keys, values, offsets, s.batch_size, weights, key_offsets)
        )

    def pin(self) -> bool:
        """Page-lock the file in this process too, so copies to a device made here (a tight
        loop over the same queries, as a baseline) start from it as the runner's do."""
        if self._pinned or not torch.cuda.is_available():
            return self._pinned
        from recserve.storage.host import register_host_memory

        try:
            register_host_memory(self.address, self.size)  # whole pages already
        except Exception:
            return False
        self._pinned = True
        return True

    def close(self) -> None:
        if self._map is None:
            return
        self._engine.unshare_memory(self._handle)
        self._handle = None
        if self._pinned:
            from recserve.storage.host import unregister_host_memory

            with contextlib.suppress(Exception):
                unregister_host_memory(self.address)
            self._pinned = False
        self.batches = []
        del self._bytes
        with contextlib.suppress(BufferError):  # views still held elsewhere: freed with them
            self._map.close()
        self._map = None  # type: ignore[assignment]
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def __enter__(self) -> QueryMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
