"""The GPU inference pipeline: request on the host → probabilities on the device.

Per batch, with no host synchronisation inside it:

1. ids/offsets and dense features are staged in pinned host buffers and copied to the device
   asynchronously on a copy stream (sparse first, then dense);
2. the embedding stage (one launch for all tables, where the backend has table-batched
   kernels) starts as soon as the sparse copy lands, while the dense copy is still in flight;
3. the dense part (bottom MLP, interaction, top MLP, attention/GRU) replays a CUDA graph
   captured for the smallest size bucket that holds the batch (items past B are padding whose
   outputs are dropped; items are independent in every model, so padding changes nothing).

On a CPU device the same object runs the model eagerly, so callers need no special case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from recserve.embedding import SparseOutput
from recserve.models.base import RecModel
from recserve.types import Batch, KeyedJagged

DEFAULT_BUCKETS: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class _Graph:
    """One captured dense part: static inputs, the graph, its static output."""

    size: int
    dense: torch.Tensor
    pooled: torch.Tensor
    sequences: dict[str, tuple[torch.Tensor, torch.Tensor]]
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor


class _PinnedStage:
    """Growable pinned host buffers, reused across batches (one set per pipeline).

    Two sets alternate so a batch can be staged while the previous one is still copying; a
    set is reused only after the copies that read it have finished (a wait on that copy alone,
    which happens only when the device runs two batches behind the host).
    """

    def __init__(self) -> None:
        self._buffers: list[dict[str, torch.Tensor]] = [{}, {}]
        self._done: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def stage(self, name: str, *parts: torch.Tensor) -> torch.Tensor:
        """Copy ``parts`` (one dtype) back to back into pinned buffer ``name``; a 1-D view of
        them (or the single part's shape)."""
        done = self._done[self._turn]
        if done is not None:
            done.synchronize()
            self._done[self._turn] = None
        bufs = self._buffers[self._turn]
        buf = bufs.get(name)
        n = sum(p.numel() for p in parts)
        if buf is None or buf.numel() < n or buf.dtype != parts[0].dtype:
            buf = torch.empty(max(n, 1024) * 2, dtype=parts[0].dtype, pin_memory=True)
            bufs[name] = buf
        start = 0
        for p in parts:
            buf[start : start + p.numel()].copy_(p.reshape(-1))
            start += p.numel()
        return buf[:n].view(parts[0].shape) if len(parts) == 1 else buf[:n]

    def flip(self, copies_done: torch.cuda.Event) -> None:
        """Mark the current set busy until ``copies_done`` and switch to the other set."""
        self._done[self._turn] = copies_done
        self._turn ^= 1


class GPUPipeline:
    """Runs a :class:`RecModel` on CUDA with async input copies and CUDA-graphed dense parts.

    ``buckets`` are the batch sizes graphs are captured for (lazily, on first use); a batch
    larger than the largest bucket runs its dense part eagerly.
    """

    def __init__(
        self,
        model: RecModel,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        use_graphs: bool = True,
    ) -> None:
        self.model = model.eval()
        self.device = _model_device(model)
        self.on_cuda = self.device.type == "cuda"
        self.use_graphs = use_graphs and self.on_cuda
        self.buckets = tuple(sorted(buckets))
        self._graphs: dict[int, _Graph] = {}
        self._stage = _PinnedStage()
        self._copy_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> torch.Tensor:
        """Probabilities ``[B, num_tasks]`` on the model's device (not synchronised)."""
        if not self.on_cuda:
            return self.model(batch)
        sparse, dense = self._copy_in(batch)
        emb = self.model.sparse(sparse)
        torch.cuda.current_stream(self.device).wait_event(dense[1])
        return self._dense(dense[0], emb)

    def _copy_in(self, batch: Batch) -> tuple[KeyedJagged, tuple[torch.Tensor, torch.cuda.Event]]:
        s = batch.sparse
        key_offsets = s.key_offsets() if s.offsets.device.type == "cpu" else s.offset_per_key
        if s.values.device.type == "cuda":  # already on the device
            ev = torch.cuda.Event()
            ev.record()
            return s, (batch.dense, ev)
        stage, stream = self._stage, self._copy_stream
        assert stream is not None
        # ids and offsets travel in one copy (both int64), dense features in another.
        ids = stage.stage("ids", s.values, s.offsets)
        weights = None if s.weights is None else stage.stage("weights", s.weights)
        dense = stage.stage("dense", batch.dense)
        n = s.values.numel()
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            d_ids = ids.to(self.device, non_blocking=True)
            d_values, d_offsets = d_ids[:n], d_ids[n:]
            d_weights = None if weights is None else weights.to(self.device, non_blocking=True)
            sparse_ready = torch.cuda.Event()
            sparse_ready.record(stream)
            d_dense = dense.to(self.device, non_blocking=True)
            dense_ready = torch.cuda.Event()
            dense_ready.record(stream)
        stage.flip(dense_ready)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(sparse_ready)
        for t in (d_ids, d_weights):
            if t is not None:  # the copy stream's memory is used on this stream
                t.record_stream(current)
        d_dense.record_stream(current)
        sparse = KeyedJagged(s.keys, d_values, d_offsets, s.batch_size, d_weights, key_offsets)
        return sparse, (d_dense, dense_ready)

    def _dense(self, dense: torch.Tensor, emb: SparseOutput) -> torch.Tensor:
        b = dense.shape[0]
        size = next((x for x in self.buckets if x >= b), None)
        if not self.use_graphs or size is None:
            return self.model.dense_forward(dense, emb)
        g = self._graphs.get(size) or self._capture(size, dense, emb)
        g.dense[:b].copy_(dense)
        g.pooled[:b].copy_(emb.pooled)
        for name, (rows, mask) in emb.sequences.items():
            g.sequences[name][0][:b].copy_(rows)
            g.sequences[name][1][:b].copy_(mask)
        g.graph.replay()
        # The graph's output buffer is overwritten by the next replay: hand out a copy.
        return g.out[:b].clone()

    def _capture(self, size: int, dense: torch.Tensor, emb: SparseOutput) -> _Graph:
        """Capture the dense part for ``size`` items, with static inputs shaped like these."""
        static_dense = torch.zeros(size, *dense.shape[1:], device=self.device)
        static_pooled = torch.zeros(size, *emb.pooled.shape[1:], device=self.device)
        static_seqs = {
            name: (
                torch.zeros(size, *rows.shape[1:], device=self.device),
                torch.zeros(size, *mask.shape[1:], dtype=mask.dtype, device=self.device),
            )
            for name, (rows, mask) in emb.sequences.items()
        }
        static_emb = SparseOutput(static_pooled, static_seqs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up (lazy inits, cuDNN plans) outside the capture
            for _ in range(2):
                self.model.dense_forward(static_dense, static_emb)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model.dense_forward(static_dense, static_emb)
        g = _Graph(size, static_dense, static_pooled, static_seqs, graph, out)
        self._graphs[size] = g
        return g


def triton_model(model: RecModel) -> RecModel:
    """The same model (shared dense layers) with its tables in the table-batched Triton
    backend; the model's own tables can be dropped afterwards."""
    from recserve.storage.hbm import TritonBackend

    return model.with_backend(TritonBackend.from_backend(model.sparse.backend))


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
