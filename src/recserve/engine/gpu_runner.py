"""The batch-level runner: whole (coalesced) queries on the GPU, consecutive batches overlapped.

A launcher thread coalesces each batch's queries straight into a pinned host buffer, copies it
to a device buffer on a copy stream, and launches the model on a compute stream that waits only
for that copy; a completion thread waits for each batch's output copy and hands the answers to
the engine. With ``max_inflight`` buffer sets, batch i+1 is staged and copied while batch i
computes. On a machine without a GPU (``device="cpu"``), the launcher runs the model itself:
the same engine and scheduler run there, for tests and CPU-only hosts.

Given a :class:`~recserve.pipeline.GPUPipeline`, the launcher hands it each coalesced batch
(still in the pinned buffers, which the pipeline copies from in place): the whole forward then
replays as one CUDA graph per batch-size bucket instead of being launched op by op.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from recserve.engine.batching import Copier, HostBuffers, concat_batches
from recserve.engine.request import Completion, Query
from recserve.pipeline import GPUPipeline
from recserve.types import Batch, KeyedJagged


@dataclass
class _Slot:
    """One buffer set: pinned inputs, device inputs, pinned output, and their events."""

    host: HostBuffers
    device: HostBuffers
    out: torch.Tensor
    copied: torch.cuda.Event | None = None
    computed: torch.cuda.Event | None = None


class GpuRunner:
    """Runs GPU batches for the engine's loop thread (``dispatch``/``poll`` from that thread)."""

    def __init__(
        self,
        model: nn.Module,
        keys: tuple[str, ...],
        num_dense: int,
        num_tasks: int,
        max_items: int,
        max_values: int,
        device: torch.device,
        max_inflight: int = 2,
        on_done: Callable[[], None] | None = None,
        pipeline: GPUPipeline | None = None,
        stage_threads: int = 4,
    ) -> None:
        self.model = model
        self._copier = Copier(stage_threads)
        self.pipeline = pipeline if device.type == "cuda" else None
        self.keys = keys
        self.device = device
        self.max_items = max_items
        self.max_inflight = max_inflight
        self._on_done = on_done or (lambda: None)
        self._inflight = 0
        self._inbox: queue.SimpleQueue[list[Query] | None] = queue.SimpleQueue()
        self._done: deque[list[Completion]] = deque()
        self._cuda = device.type == "cuda"
        self._threads = [
            threading.Thread(target=self._launch_loop, name="recserve-gpu-launch", daemon=True)
        ]
        if self._cuda:
            dims = (max_items, max_values, len(keys), num_dense)
            self._slots = [
                _Slot(
                    HostBuffers.allocate(*dims, pin=True),
                    HostBuffers.allocate(*dims, device=device),
                    torch.empty((max_items, num_tasks), pin_memory=True),
                )
                for _ in range(max_inflight)
            ]
            self._copy_stream = torch.cuda.Stream(device)
            self._compute_stream = torch.cuda.Stream(device)
            self._pending: queue.SimpleQueue[tuple[list[Query], _Slot, int] | None] = (
                queue.SimpleQueue()
            )
            self._threads.append(
                threading.Thread(target=self._sync_loop, name="recserve-gpu-sync", daemon=True)
            )
        for t in self._threads:
            t.start()

    def free_slots(self) -> int:
        return self.max_inflight - self._inflight

    def dispatch(self, queries: list[Query]) -> None:
        self._inflight += 1
        self._inbox.put(queries)

    def poll(self) -> list[Completion]:
        out: list[Completion] = []
        while self._done:
            out.extend(self._done.popleft())
            self._inflight -= 1
        return out

    def close(self) -> None:
        self._inbox.put(None)
        for t in self._threads:
            t.join(timeout=30)
        self._copier.close()

    def _finish(self, done: list[Completion]) -> None:
        self._done.append(done)
        self._on_done()

    def _fail(self, queries: list[Query], err: BaseException) -> None:
        self._finish([Completion(q, 0, q.num_items, error=err) for q in queries])

    def _launch_loop(self) -> None:
        k = 0
        with torch.inference_mode():
            while (queries := self._inbox.get()) is not None:
                try:
                    if self._cuda:
                        self._launch(queries, self._slots[k % len(self._slots)])
                    else:
                        self._run_here(queries)
                except Exception as err:  # answered as the queries' error, never lost
                    self._fail(queries, err)
                k += 1
        if self._cuda:
            self._pending.put(None)

    def _run_here(self, queries: list[Query]) -> None:
        batch = concat_batches([q.batch for q in queries if q.batch is not None], self.keys)
        self._finish(split_output(queries, self.model(batch), copy=False))

    def _launch(self, queries: list[Query], slot: _Slot) -> None:
        if slot.copied is not None:
            slot.copied.synchronize()  # the pinned inputs of this slot's last batch were read
        host = concat_batches(
            [q.batch for q in queries if q.batch is not None], self.keys, slot.host, self._copier
        )
        if host.sparse.weights is not None:
            raise ValueError("the GPU runner does not take per-sample weights")
        if self.pipeline is not None:
            self._launch_pipeline(queries, slot, host)
            return
        b, n = host.batch_size, host.sparse.values.numel()
        f = len(self.keys)
        with torch.cuda.stream(self._copy_stream):
            if slot.computed is not None:  # the last batch in this slot finished reading it
                self._copy_stream.wait_event(slot.computed)
            dev = slot.device
            dev.dense[:b].copy_(host.dense, non_blocking=True)
            dev.values[:n].copy_(host.sparse.values, non_blocking=True)
            dev.offsets[: f * b + 1].copy_(host.sparse.offsets, non_blocking=True)
            slot.copied = torch.cuda.Event()
            slot.copied.record(self._copy_stream)
        sparse = KeyedJagged(
            self.keys, dev.values[:n], dev.offsets[: f * b + 1], b, None, host.sparse.offset_per_key
        )
        with torch.cuda.stream(self._compute_stream):
            self._compute_stream.wait_event(slot.copied)
            out = self.model(Batch(dev.dense[:b], sparse))
            slot.out[:b].copy_(out, non_blocking=True)
            slot.computed = torch.cuda.Event()
            slot.computed.record(self._compute_stream)
        self._pending.put((queries, slot, b))

    def _launch_pipeline(self, queries: list[Query], slot: _Slot, host: Batch) -> None:
        assert self.pipeline is not None
        b = host.batch_size
        with torch.cuda.stream(self._compute_stream):
            out = self.pipeline(host)
            slot.copied = self.pipeline.inputs_read  # None: staged, the buffers are free now
            slot.out[:b].copy_(out, non_blocking=True)
            slot.computed = torch.cuda.Event()
            slot.computed.record(self._compute_stream)
        self._pending.put((queries, slot, b))

    def _sync_loop(self) -> None:
        while (item := self._pending.get()) is not None:
            queries, slot, b = item
            try:
                assert slot.computed is not None
                slot.computed.synchronize()
                self._finish(split_output(queries, slot.out[:b], copy=True))
            except Exception as err:
                self._fail(queries, err)


def split_output(queries: list[Query], out: torch.Tensor, copy: bool) -> list[Completion]:
    """One completion per query; ``copy`` when ``out`` is a buffer that will be reused."""
    done, start = [], 0
    for q in queries:
        rows = out[start : start + q.num_items]
        done.append(Completion(q, 0, q.num_items, rows.clone() if copy else rows))
        start += q.num_items
    return done
