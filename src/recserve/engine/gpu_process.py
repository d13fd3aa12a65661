"""The batch-level runner in a process of its own: the GPU's host work off the engine's GIL.

In one process, every thread that touches the GPU shares the interpreter lock with the engine
loop and the callers: each PyTorch call releases and retakes it, so the runner's host work
(staging, graph replay, copies) and the engine's bookkeeping serialise and hand the lock back
and forth. Here the runner is a process, like a CPU worker: the engine stages each coalesced
batch once into a shared slot (:class:`~recserve.engine.shared.StagingArena`, page-locked in
the runner so copies go straight from it to the device and back), sends one short message, and
reads the answer rows from the slot when the runner's one-line reply arrives. The runner
process launches batch i+1 while batch i computes (a launch thread and a completion thread),
through the same :class:`~recserve.pipeline.GPUPipeline` (one CUDA graph per batch-size bucket)
as the in-process runner.

On a machine without a GPU (``device="cpu"``) the runner process calls the model itself, so the
same engine path runs in tests.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import socket
import struct
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from recserve.engine.batching import Copier, HostBuffers, concat_batches
from recserve.engine.gpu_runner import split_output
from recserve.engine.request import Completion, Query
from recserve.engine.shared import ArenaSpec, StagingArena, load_shared_model, wait_for_child
from recserve.procname import set_process_name

log = logging.getLogger(__name__)


_REQUEST = struct.Struct("<qqq")
"""Engine -> runner: slot, items, ids of a staged batch (slot -1: stop)."""
_REPLY = struct.Struct("<qq")
"""Runner -> engine: slot, then the length of an error text that follows (0: answered)."""


def take_replies(buf: bytearray) -> list[tuple[int, str | None]]:
    """The complete reply records at the head of ``buf`` (removed from it), as ``(slot, error
    text or None)``; a partial record stays for the next read."""
    replies: list[tuple[int, str | None]] = []
    start = 0
    while len(buf) - start >= _REPLY.size:
        slot, length = _REPLY.unpack_from(buf, start)
        end = start + _REPLY.size + length
        if len(buf) < end:
            break
        text = bytes(buf[start + _REPLY.size : end]).decode() if length else None
        replies.append((slot, text))
        start = end
    del buf[:start]
    return replies


class RunnerDied(RuntimeError):
    """The GPU runner process exited while batches were in it."""


@dataclass(frozen=True)
class RunnerSpec:
    """What the runner process needs to build its model (picklable: sent at spawn)."""

    model_path: str
    arena: ArenaSpec
    keys: tuple[str, ...]
    device: str
    kernels: str
    buckets: tuple[int, ...]
    ids_per_item: int


def runner_buckets(top: int) -> tuple[int, ...]:
    """Batch-size buckets the runner captures graphs for: 16, 32, ... up to ``top`` or above."""
    buckets = [16]
    while buckets[-1] < top:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


class GpuProcessRunner:
    """The engine's :class:`~recserve.engine.core.GpuExecutor` backed by a runner process (not
    thread-safe: the engine's loop thread calls everything)."""

    def __init__(
        self,
        spec: RunnerSpec,
        wake: Callable[[], None] | None = None,
        start_timeout: float = 600.0,
        stage_threads: int = 4,
    ) -> None:
        self.spec = spec
        self._copier = Copier(stage_threads)
        """Joins queued queries into a slot with a few threads (megabytes of ids)."""
        self._wake = wake or (lambda: None)
        """Wakes the loop thread: work refused at dispatch is answered on its next poll."""
        self.keys = spec.keys
        self.max_items = spec.arena.max_items
        self.max_inflight = spec.arena.slots
        self.arena = StagingArena(spec.arena)
        self._views = [
            HostBuffers(self.arena.dense[s], self.arena.values[s], self.arena.offsets[s])
            for s in range(spec.arena.slots)
        ]
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_runner_main, args=(spec, child), name="recserve-gpu-runner", daemon=True
        )
        self._proc.start()
        child.close()
        self._free: list[int] = list(range(spec.arena.slots))
        self._inflight: deque[tuple[int, list[Query], int]] = deque()
        self._errors: list[Completion] = []
        self._dead = False
        self.info: dict[str, Any] = {}
        self._start_timeout = start_timeout

    def wait_ready(self) -> None:
        """Block until the runner has built its model (graphs captured); raise if it failed."""
        if self.info:
            return
        try:
            payload = wait_for_child(self._conn, self._proc, self._start_timeout, "the GPU runner")
        except RuntimeError:
            self.close()
            raise
        self.info = payload
        self.pid = int(payload["pid"])
        # From here on, fixed-size records straight on the socket (no pickling, and a
        # non-blocking read instead of Connection.poll's selector per call).
        self._sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        self._buf = bytearray()

    @property
    def pipeline(self) -> bool:
        """Whether the runner serves through whole-forward CUDA graphs."""
        return bool(self.info.get("pipeline"))

    # -- the GpuExecutor protocol (loop thread) -------------------------------------------

    def free_slots(self) -> int:
        # A dead runner takes work at once, to answer it with the error (nothing waits forever).
        return self.max_inflight if self._dead else len(self._free)

    def dispatch(self, queries: list[Query]) -> None:
        if self._dead:
            self._fail(queries, RunnerDied("the GPU runner process is gone"))
            return
        slot = self._free.pop()
        try:
            batch = concat_batches(
                [q.batch for q in queries if q.batch is not None],
                self.keys,
                self._views[slot],
                self._copier,
            )
            if batch.sparse.weights is not None:
                raise ValueError("the GPU runner does not take per-sample weights")
        except ValueError as err:
            self._free.append(slot)
            self._fail(queries, err)
            return
        b, n = batch.batch_size, batch.sparse.values.numel()
        try:
            self._sock.sendall(_REQUEST.pack(slot, b, n))
        except OSError as err:
            self._free.append(slot)
            self._fail(queries, RunnerDied(f"the GPU runner process is gone ({err})"))
            return
        self._inflight.append((slot, queries, b))

    def poll(self) -> list[Completion]:
        out, self._errors = self._errors, []
        if self._dead:
            return out
        try:
            data = self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return out
        except OSError:
            data = b""
        if not data:  # end of file: the runner is gone
            self._die(out)
            return out
        self._buf += data
        for slot, error in take_replies(self._buf):
            head, queries, b = self._inflight.popleft()
            assert head == slot, f"runner answered slot {slot}, expected {head}"
            if error is None:
                out.extend(split_output(queries, self.arena.out[slot, :b], copy=True))
            else:
                out.extend(
                    Completion(q, 0, q.num_items, error=RuntimeError(error)) for q in queries
                )
            self._free.append(slot)
        return out

    def waitables(self) -> list[Any]:
        """What the loop thread waits on: the runner's socket (replies, or end of file when the
        process exits)."""
        return [] if self._dead else [self._sock]

    def close(self, timeout: float = 30.0) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.info:
                self._sock.sendall(_REQUEST.pack(-1, 0, 0))
                self._sock.close()
            else:
                self._conn.send(None)
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5.0)
        self._conn.close()
        self.arena.unlink()
        self._copier.close()

    # -- helpers --------------------------------------------------------------------------

    def _fail(self, queries: list[Query], err: BaseException) -> None:
        self._errors.extend(Completion(q, 0, q.num_items, error=err) for q in queries)
        self._wake()

    def _die(self, out: list[Completion]) -> None:
        self._dead = True
        died = RunnerDied(f"the GPU runner process exited (code {self._proc.exitcode})")
        while self._inflight:  # everything it held fails; nothing is lost silently
            slot, queries, _ = self._inflight.popleft()
            out.extend(Completion(q, 0, q.num_items, error=died) for q in queries)
            self._free.append(slot)


# -- the runner process ---------------------------------------------------------------------


def _build(spec: RunnerSpec, device: torch.device) -> tuple[Any, Any]:
    """``(model, pipeline)`` on ``device`` (see :func:`~recserve.pipeline.runner_model`)."""
    from recserve.pipeline import runner_model

    mapped = load_shared_model(spec.model_path)  # this process's own: moved, not copied
    return runner_model(mapped, device, spec.kernels, spec.buckets, spec.ids_per_item, copy=False)


def _register(arena: StagingArena) -> bool:
    """Page-lock the shared slots for the device (copies then go straight from and to them)."""
    from recserve.storage.host import register_host_memory

    try:
        for t in (arena.dense, arena.values, arena.offsets, arena.out):
            if t.numel():
                nbytes = -(-t.numel() * t.element_size() // 4096) * 4096
                register_host_memory(t.data_ptr(), nbytes)
    except Exception as err:  # still correct: inputs are staged, outputs copied once more
        log.warning("could not page-lock the runner's staging slots (%s)", err)
        return False
    return True


def _runner_main(spec: RunnerSpec, conn: Connection) -> None:
    """The runner's whole life: build the model, then run batches until told to stop (``None``)
    or the engine goes away."""
    set_process_name("recserve-gpu")
    try:
        torch.set_num_threads(1)
        device = torch.device(spec.device)
        with torch.inference_mode():
            model, pipeline = _build(spec, device)
        arena = StagingArena(spec.arena)
        registered = device.type == "cuda" and _register(arena)
        conn.send(
            (
                "ready",
                {"pid": os.getpid(), "pipeline": pipeline is not None, "registered": registered},
            )
        )
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc(limit=6)))
        return
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    with torch.inference_mode():
        if device.type == "cuda":
            _CudaLoop(spec, sock, model, pipeline, arena, registered, device).run()
        else:
            _cpu_loop(spec, sock, model, arena)


def _next_request(sock: socket.socket) -> tuple[int, int, int] | None:
    """The next batch to run, or None when told to stop or the engine is gone."""
    try:
        data = sock.recv(_REQUEST.size, socket.MSG_WAITALL)
    except (OSError, KeyboardInterrupt):
        return None
    if len(data) < _REQUEST.size:
        return None
    slot, b, n = _REQUEST.unpack(data)
    return None if slot < 0 else (slot, b, n)


def pack_reply(slot: int, error: str | None) -> bytes:
    """The runner's reply record for ``slot``: answered (``error`` None) or failed."""
    text = (error or "").encode()
    return _REPLY.pack(slot, len(text)) + text


def _describe(err: BaseException) -> str:
    """An error's text as the engine reports it for the batch's queries."""
    return f"GPU runner: {type(err).__name__}: {err}"


def _reply(sock: socket.socket, slot: int, error: str | None) -> None:
    sock.sendall(pack_reply(slot, error))


def _cpu_loop(spec: RunnerSpec, sock: socket.socket, model: Any, arena: StagingArena) -> None:
    while (request := _next_request(sock)) is not None:
        slot, b, n = request
        error = None
        try:
            arena.out[slot, :b] = model(arena.batch(slot, b, n, spec.keys))
        except Exception as err:  # reported to the engine, which fails the batch's queries
            error = _describe(err)
        try:
            _reply(sock, slot, error)
        except OSError:
            return


class _CudaLoop:
    """Launch thread (this one) and completion thread of the runner process."""

    def __init__(
        self,
        spec: RunnerSpec,
        sock: socket.socket,
        model: Any,
        pipeline: Any,
        arena: StagingArena,
        registered: bool,
        device: torch.device,
    ) -> None:
        self.spec, self.sock, self.model, self.pipeline = spec, sock, model, pipeline
        self.arena, self.registered, self.device = arena, registered, device
        self.stream = torch.cuda.Stream(device)
        self.out = (
            arena.out
            if registered
            else torch.empty(tuple(arena.out.shape), dtype=torch.float32, pin_memory=True)
        )
        self.pending: queue.SimpleQueue[tuple[int, int, Any, str | None] | None] = (
            queue.SimpleQueue()
        )

    def run(self) -> None:
        done = threading.Thread(target=self._complete, name="recserve-gpu-done", daemon=True)
        done.start()
        try:
            while (request := _next_request(self.sock)) is not None:
                slot, b, n = request
                try:
                    self.pending.put((slot, b, self._launch(slot, b, n), None))
                except Exception as err:
                    self.pending.put((slot, b, None, _describe(err)))
        finally:
            self.pending.put(None)
            done.join(timeout=30)

    def _launch(self, slot: int, b: int, n: int) -> torch.cuda.Event:
        batch = self.arena.batch(slot, b, n, self.spec.keys)
        with torch.cuda.stream(self.stream):
            if self.pipeline is not None:
                out = self.pipeline(batch)
            else:
                out = self.model(batch.to(self.device, non_blocking=True))
            self.out[slot, :b].copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def _complete(self) -> None:
        while (item := self.pending.get()) is not None:
            slot, b, event, error = item
            if error is None:
                try:
                    event.synchronize()
                    if not self.registered:
                        self.arena.out[slot, :b].copy_(self.out[slot, :b])
                except Exception as err:
                    error = _describe(err)
            try:
                _reply(self.sock, slot, error)
            except OSError:
                return
