"""The GPU inference pipeline: request on the host → probabilities on the device.

Per batch, with no host synchronisation inside it:

1. ids/offsets and dense features are staged in pinned host buffers and copied to the device
   asynchronously on a copy stream (sparse first, then dense);
2. the embedding stage (one launch for all tables, where the backend has table-batched
   kernels) starts as soon as the sparse copy lands, while the dense copy is still in flight;
3. the dense part (bottom MLP, interaction, top MLP, attention/GRU) replays a CUDA graph
   captured for the smallest size bucket that holds the batch (items past B are padding whose
   outputs are dropped; items are independent in every model, so padding changes nothing).

With ``full_graph`` (the default) steps 2 and 3 are one CUDA graph per size bucket: the whole
forward, embedding launch included, is captured over static device inputs (offsets padded to
the bucket with empty bags, ids in a buffer of fixed capacity), so a batch costs the host a few
copies into pinned memory, one or two asynchronous copies and one graph replay. Each bucket has
two such graphs with their own inputs, used in turn, so the copy of the next batch overlaps the
replay of this one. Backends whose lookups depend on host state fall back to step 2 + 3.

``autocast`` (e.g. ``torch.bfloat16``) runs the dense part in that precision (mixed precision);
the default keeps fp32 throughout, equal to the eager model to float tolerance.

On a CPU device the same object runs the model eagerly, so callers need no special case.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from recserve.embedding import SparseOutput
from recserve.models.base import RecModel
from recserve.types import Batch, KeyedJagged

DEFAULT_BUCKETS: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)

log = logging.getLogger(__name__)


def pad_offsets(offsets: torch.Tensor, num_keys: int, batch: int, size: int) -> torch.Tensor:
    """KeyedJagged offsets ``[F*B + 1]`` of ``batch`` items re-laid out for ``size >= batch``
    items: items ``B..size`` of every feature get empty bags, so the same ``values`` can be
    read as a batch of ``size`` (what a graph captured for ``size`` items expects)."""
    if size < batch:
        raise ValueError(f"cannot pad {batch} items down to {size}")
    out = torch.empty(num_keys * size + 1, dtype=offsets.dtype, device=offsets.device)
    _pad_offsets_into(out, offsets, num_keys, batch, size)
    return out


def _pad_offsets_into(
    out: torch.Tensor, offsets: torch.Tensor, num_keys: int, batch: int, size: int
) -> None:
    if out.device.type == "cpu" and offsets.device.type == "cpu":
        # numpy on host memory: the same four steps at a tenth of torch's per-call cost,
        # which is most of a small batch's host time in the runner
        _pad_offsets_np(out.numpy(), offsets.numpy(), num_keys, batch, size)
        return
    grid = out[: num_keys * size].view(num_keys, size)
    grid[:, :batch].copy_(offsets[:-1].view(num_keys, batch))
    if size > batch:  # each feature's padding bags start (and end) where its ids end
        grid[:, batch:].copy_(offsets[batch::batch].unsqueeze(1).expand(num_keys, size - batch))
    out[num_keys * size] = offsets[-1]


def _pad_offsets_np(
    out: np.ndarray, offsets: np.ndarray, num_keys: int, batch: int, size: int
) -> None:
    grid = out[: num_keys * size].reshape(num_keys, size)
    grid[:, :batch] = offsets[:-1].reshape(num_keys, batch)
    if size > batch:
        grid[:, batch:] = offsets[batch::batch, None]
    out[num_keys * size] = offsets[-1]


@dataclass
class _Graph:
    """One captured dense part: static inputs, the graph, its static output."""

    size: int
    dense: torch.Tensor
    pooled: torch.Tensor
    sequences: dict[str, tuple[torch.Tensor, torch.Tensor]]
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor


@dataclass
class _FullGraph:
    """The whole forward captured for ``size`` items: static inputs, the graph, its output.

    ``sparse`` holds ``[offsets (F*size + 1) | ids (capacity)]`` so one copy fills both.
    """

    size: int
    capacity: int
    sparse: torch.Tensor
    weights: torch.Tensor | None
    dense: torch.Tensor
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor
    free: torch.cuda.Event = field(default_factory=torch.cuda.Event)
    """Recorded after each replay: the inputs may be overwritten once it has passed."""


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
        n = sum(p.numel() for p in parts)
        buf = self.buffer(name, n, parts[0].dtype)
        start = 0
        for p in parts:
            buf[start : start + p.numel()].copy_(p.reshape(-1))
            start += p.numel()
        return buf.view(parts[0].shape) if len(parts) == 1 else buf

    def buffer(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A pinned buffer of ``n`` elements of ``dtype`` in the current set (for the caller
        to fill), once the copies that last read this set are done."""
        done = self._done[self._turn]
        if done is not None:
            done.synchronize()
            self._done[self._turn] = None
        bufs = self._buffers[self._turn]
        buf = bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.zeros(max(n, 1024) * 2, dtype=dtype, pin_memory=True)
            bufs[name] = buf
        return buf[:n]

    def flip(self, copies_done: torch.cuda.Event) -> None:
        """Mark the current set busy until ``copies_done`` and switch to the other set."""
        self._done[self._turn] = copies_done
        self._turn ^= 1


class GPUPipeline:
    """Runs a :class:`RecModel` on CUDA with async input copies and CUDA-graphed dense parts.

    ``buckets`` are the batch sizes graphs are captured for (lazily, on first use); a batch
    larger than the largest bucket runs eagerly (embedding launch, then the dense part).
    ``full_graph`` captures the embedding stage in the graph too (see the module's doc).
    """

    def __init__(
        self,
        model: RecModel,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        use_graphs: bool = True,
        full_graph: bool = True,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.model = model.eval()
        self.device = _model_device(model)
        self.on_cuda = self.device.type == "cuda"
        self.use_graphs = use_graphs and self.on_cuda
        self.full_graph = (
            full_graph and self.use_graphs and getattr(model.sparse.backend, "graph_safe", False)
        )
        self.autocast = autocast
        self.buckets = tuple(sorted(buckets))
        self.keys = model.sparse.keys
        self._graphs: dict[int, _Graph] = {}
        self._full: dict[int, list[_FullGraph]] = {}
        self._turns: dict[int, int] = {}
        self.inputs_read: torch.cuda.Event | None = None
        """After a call: recorded once the copies from the caller's pinned tensors are done."""
        self.join_refusal = ""
        """Why the last :meth:`call_joined` that returned None did."""
        self._stage = _PinnedStage()
        self._copy_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def __call__(self, batch: Batch, out: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities ``[B, num_tasks]`` on the model's device (not synchronised); with
        ``out`` (``[B, num_tasks]`` float32, e.g. page-locked host memory), copied there on the
        current stream instead, and ``out`` returned: one copy fewer than copying the result."""
        if not torch.is_inference_mode_enabled():  # a runner is in it already: no re-entry
            with torch.inference_mode():
                return self(batch, out)
        self.inputs_read = None
        if not self.on_cuda:
            with self._precision():
                return _into(self.model(batch).float(), out)
        b = batch.sparse.batch_size
        size = next((x for x in self.buckets if x >= b), None)
        if self.full_graph and size is not None and batch.sparse.values.device.type == "cpu":
            try:
                return self._run_full(batch, size, out)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:  # a backend that cannot be captured: graph the dense part
                log.warning("whole-forward capture failed (%s); graphing the dense part only", e)
                self.full_graph = False
                torch.cuda.synchronize(self.device)
        sparse, dense = self._copy_in(batch)
        with self._precision():
            emb = self.model.sparse(sparse)
            torch.cuda.current_stream(self.device).wait_event(dense[1])
            return _into(self._dense(dense[0], emb).float(), out)

    def _precision(self) -> contextlib.AbstractContextManager[object]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    # ------------------------------------------------------------------ whole-forward graphs

    def _run_full(self, batch: Batch, size: int, out: torch.Tensor | None) -> torch.Tensor:
        s = batch.sparse
        if s.keys != self.keys:
            s = s.select(self.keys)
        b, f, n = s.batch_size, len(self.keys), s.values.numel()
        head = f * size + 1
        g = self._next_graph(batch, s, size, n)
        stage, stream = self._stage, self._copy_stream
        assert stream is not None
        # Inputs already in pinned memory (e.g. a runner's coalescing buffers) are copied from
        # where they are; the rest is staged. ``inputs_read`` tells the caller when its pinned
        # tensors may be reused.
        direct = s.values.is_pinned()
        host = stage.buffer("sparse", head + (0 if direct else n), torch.int64)
        _pad_offsets_into(host[:head], s.offsets, f, b, size)
        if not direct:
            host[head:].copy_(s.values)
        weights = s.weights
        if weights is not None and not weights.is_pinned():
            weights = stage.stage("weights", weights)
        dense = batch.dense if batch.dense.is_pinned() else stage.stage("dense", batch.dense)
        stream.wait_event(g.free)  # this graph's inputs are no longer read by its last replay
        with torch.cuda.stream(stream):
            if direct:
                g.sparse[:head].copy_(host, non_blocking=True)
                g.sparse[head : head + n].copy_(s.values, non_blocking=True)
            else:
                g.sparse[: head + n].copy_(host, non_blocking=True)
            if weights is not None:
                assert g.weights is not None
                g.weights[:n].copy_(weights, non_blocking=True)
            g.dense[:b].copy_(dense, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return self._replay(g, ready, b, out)

    def _next_graph(self, batch: Batch, s: KeyedJagged, size: int, n: int) -> _FullGraph:
        """The graph of bucket ``size`` to fill next (the pair's two in turn), captured anew
        (from ``batch``) when there is none with room for ``n`` ids and the same weighting."""
        pair = self._full.get(size)
        if pair is None or pair[0].capacity < n or (s.weights is None) != (pair[0].weights is None):
            pair = self._capture_full(batch, s, size, n)
        turn = self._turns.get(size, 0)
        self._turns[size] = turn ^ 1
        return pair[turn]

    def _replay(
        self, g: _FullGraph, ready: torch.cuda.Event, b: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Once the copy stream's ``ready`` has passed, replay ``g``; its first ``b`` rows
        (copied into ``out`` when given)."""
        self.inputs_read = ready
        self._stage.flip(ready)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        g.graph.replay()
        # A copy: the graph's output is overwritten by its next replay.
        if out is None:
            out = g.out[:b].to(torch.float32, copy=True)
        else:
            out.copy_(g.out[:b], non_blocking=True)
        g.free.record(current)
        return out

    @torch.inference_mode()
    def call_joined(
        self, parts: Sequence[Batch], out: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Probabilities for the items of ``parts`` in order, the queries joined on the device
        (:mod:`recserve.kernels.join`): one launch reads them over PCIe where they are and
        writes the graph's inputs, so no host thread copies their bytes. Every array of
        ``parts`` must lie in page-locked memory the device can read (the GPU runner's shared
        regions) and be element-aligned. None when this pipeline cannot take them that way
        (no whole-forward graphs, no bucket large enough, per-sample weights, other
        features): the caller joins them on the host and calls the pipeline."""
        self.inputs_read = None
        if not (self.full_graph and parts):
            self.join_refusal = "no whole-forward graphs"
            return None
        if any(p.sparse.keys != self.keys or p.sparse.weights is not None for p in parts):
            self.join_refusal = "features in another order, or per-sample weights"
            return None
        b = sum(p.batch_size for p in parts)
        n = sum(p.sparse.values.numel() for p in parts)
        size = next((x for x in self.buckets if x >= b), None)
        if size is None:
            self.join_refusal = f"{b} items: more than the largest graph bucket"
            return None
        from recserve.kernels.join import PLAN_COLUMNS, join_plan, join_queries

        g = self._next_graph(parts[0], parts[0].sparse, size, n)
        stream = self._copy_stream
        assert stream is not None
        plan = torch.from_numpy(join_plan(parts, size)).reshape(-1)
        plan = self._stage.stage("join", plan).view(-1, PLAN_COLUMNS)
        head = len(self.keys) * size + 1
        stream.wait_event(g.free)
        with torch.cuda.stream(stream):
            join_queries(parts, plan, g.sparse[:head], g.sparse[head:], g.dense)
            ready = torch.cuda.Event()
            ready.record(stream)
        return self._replay(g, ready, b, out)

    def prepare(self, make_batch: Callable[[int], Batch], ids_per_item: int = 0) -> None:
        """Capture every bucket now (not on its first batch), with room for ``ids_per_item``
        ids per item; ``make_batch(size)`` gives a valid batch of ``size`` items."""
        if not self.full_graph:
            return
        with torch.inference_mode():
            for size in self.buckets:
                batch = make_batch(size)
                s = (
                    batch.sparse
                    if batch.sparse.keys == self.keys
                    else batch.sparse.select(self.keys)
                )
                n = max(s.values.numel(), size * ids_per_item)
                self._capture_full(batch, s, size, n)
            # compile the device-side join now, not on the first joined batch
            one = make_batch(1)
            one = Batch(
                one.dense.pin_memory(),
                KeyedJagged(
                    one.sparse.keys,
                    one.sparse.values.pin_memory(),
                    one.sparse.offsets.pin_memory(),
                    1,
                ),
            )
            if one.sparse.keys == self.keys and self.call_joined([one, one]) is not None:
                torch.cuda.synchronize(self.device)

    def _capture_full(self, batch: Batch, s: KeyedJagged, size: int, n: int) -> list[_FullGraph]:
        """Two graphs of the whole forward for ``size`` items and at least ``n`` ids."""
        old = self._full.get(size)
        capacity = max(1024, 1 << max(n - 1, 1).bit_length(), old[0].capacity if old else 0)
        n = s.values.numel()
        torch.cuda.synchronize(self.device)
        f, b = len(self.keys), s.batch_size
        head = f * size + 1
        key_offsets = s.key_offsets() if s.offsets.device.type == "cpu" else s.offset_per_key
        pair = []
        for _ in range(2):
            sparse = torch.zeros(head + capacity, dtype=torch.int64, device=self.device)
            sparse[:head].copy_(pad_offsets(s.offsets, f, b, size))
            sparse[head : head + n].copy_(s.values)
            weights = None
            if s.weights is not None:
                weights = torch.zeros(capacity, dtype=s.weights.dtype, device=self.device)
                weights[:n].copy_(s.weights)
            dense = torch.zeros(size, *batch.dense.shape[1:], device=self.device)
            dense[:b].copy_(batch.dense)
            static = Batch(
                dense,
                KeyedJagged(self.keys, sparse[head:], sparse[:head], size, weights, key_offsets),
            )
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), self._precision():  # lazy inits outside the capture
                for _ in range(2):
                    self.model(static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool), self._precision():
                out = self.model(static)
            pair.append(_FullGraph(size, capacity, sparse, weights, dense, graph, out))
        torch.cuda.synchronize(self.device)
        self._full[size] = pair
        self._turns[size] = 0
        return pair

    def graph_sizes(self) -> dict[str, list[int]]:
        """Bucket sizes with captured graphs (whole forward / dense part only)."""
        return {"full": sorted(self._full), "dense": sorted(self._graphs)}

    # ------------------------------------------------------------------ dense-part graphs

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


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``result``, or ``out`` once ``result`` is copied into it (on the current stream)."""
    if out is None:
        return result
    return out.copy_(result, non_blocking=True)


def triton_model(model: RecModel, row_dtype: str | None = None) -> RecModel:
    """The same model (shared dense layers) with its tables in the table-batched Triton
    backend; the model's own tables can be dropped afterwards. ``row_dtype`` (``fp16``,
    ``bf16``, ``int8``) stores every fp32 table in that type instead (mixed precision)."""
    from recserve.storage.hbm import TritonBackend

    backend = model.sparse.backend
    if row_dtype is None:
        return model.with_backend(TritonBackend.from_backend(backend))
    tables = tuple(replace(t, dtype=row_dtype) if t.dtype == "fp32" else t for t in backend.tables)
    weights = [backend.dense_weight(i) for i in range(len(tables))]
    device = weights[0].device
    return model.with_backend(TritonBackend.from_weights(tables, weights, device))


def device_model(model: RecModel, device: torch.device | str) -> RecModel:
    """A copy of ``model`` on ``device`` with its tables in the Triton backend, built from the
    rows where they are (no second copy of the tables on the device); ``model`` is unchanged."""
    import copy

    from recserve.storage.hbm import TritonBackend

    device = torch.device(device)
    backend = TritonBackend.from_backend(model.sparse.backend, device=device)
    fast = model.with_backend(backend)
    for name, module in list(fast.named_children()):
        if name != "sparse":
            fast._modules[name] = copy.deepcopy(module).to(device)
    return fast


def runner_model(
    model: torch.nn.Module,
    device: torch.device,
    kernels: str = "triton",
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    ids_per_item: int = 0,
    copy: bool = True,
) -> tuple[torch.nn.Module, GPUPipeline | None]:
    """What a batch runner serves on ``device``, and the pipeline that runs it: a recserve
    model with the Triton tables, its whole forward captured now for every bucket (``kernels
    == "triton"``), else a copy of the model as given, launched op by op. Off CUDA the model
    itself, run as it is. ``model`` is left where it is unless ``copy`` is false (a caller
    whose model is its own may have it moved instead of copied)."""
    import copy as copying

    from recserve.loadgen.synthetic import QueryFactory
    from recserve.models.base import RecModel

    if device.type != "cuda":
        return model, None
    if kernels == "torch" or not isinstance(model, RecModel):
        return (copying.deepcopy(model) if copy else model).to(device), None
    fast = device_model(model, device)
    pipeline = GPUPipeline(fast, buckets=buckets)
    pipeline.prepare(QueryFactory(fast.config, "uniform", seed=0).make, ids_per_item)
    return fast, pipeline


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
