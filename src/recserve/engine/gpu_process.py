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
import dataclasses
import logging
import mmap
import multiprocessing as mp
import os
import queue
import socket
import struct
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from recserve import gcpause
from recserve.engine.batching import Copier, HostBuffers, concat_batches
from recserve.engine.gpu_runner import split_output
from recserve.engine.request import Completion, Query
from recserve.engine.shared import ArenaSpec, StagingArena, load_shared_model, wait_for_child
from recserve.polling import prompt_lock_handoff
from recserve.procname import set_process_name
from recserve.types import Batch, KeyedJagged

log = logging.getLogger(__name__)


_REQUEST = struct.Struct("<qqqqqqq")
"""Engine -> runner: slot, items, ids, then where the inputs are: region -1 (staged in the
slot) or a shared region's id and the byte offsets of its dense features, ids and offsets.
Region -2: several queries in shared regions, to be joined into the slot by the runner; their
count is the next field and one ``_PART`` record each follows. Slot -1: stop. Slot -2: map a
region (items: its id, ids: its size; the path's length in the third field, the path after the
record). Slot -3: unmap region ``items``."""
_PART = struct.Struct("<qqqqqq")
"""One query of a batch the runner joins: region, dense, ids and offsets byte offsets, items,
ids."""
_STOP, _MAP, _UNMAP = -1, -2, -3
SLOW_GC_MS = 5.0
"""The runner logs a garbage collection longer than this (every batch in flight waits)."""
_JOINED = -2
_REPLY = struct.Struct("<qqqqq")
"""Runner -> engine: slot, how its inputs were read (one of :data:`INPUT_ROUTES`), the
runner's host time for the batch and its wait for the device (nanoseconds, see
:class:`RunnerTimes`), then the length of an error text that follows (0: answered)."""
INPUT_ROUTES = ("slot", "in_place", "host_join", "device_join")
"""How the runner read a batch: staged in its slot by the engine, one shared query read where
it is, shared queries joined into the slot by the runner's threads, or joined on the device."""


@dataclass
class RunnerTimes:
    """Where the runner's time went, summed over batches: ``host_s``, its launching thread's
    work from a request in hand to the batch started on the device (reading or joining the
    inputs, the launch itself; on the CPU, the whole forward); ``device_wait_s``, its
    completing thread's wait for the device to finish a batch it had launched."""

    host_s: float = 0.0
    device_wait_s: float = 0.0


def take_replies(buf: bytearray) -> list[tuple[int, int, str | None, int, int]]:
    """The complete reply records at the head of ``buf`` (removed from it), as ``(slot, input
    route, error text or None, host ns, device wait ns)``; a partial record stays for the next
    read."""
    replies: list[tuple[int, int, str | None, int, int]] = []
    start = 0
    while len(buf) - start >= _REPLY.size:
        slot, route, host_ns, wait_ns, length = _REPLY.unpack_from(buf, start)
        end = start + _REPLY.size + length
        if len(buf) < end:
            break
        text = bytes(buf[start + _REPLY.size : end]).decode() if length else None
        replies.append((slot, route, text, host_ns, wait_ns))
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
    stage_threads: int = 4
    """Threads that join queries into a slot (``EngineConfig``'s), in the engine's process and
    in the runner's."""
    join_on_device: bool = True
    """Join batches of queries in page-locked shared regions on the device (``EngineConfig``'s)."""
    gc_freeze: bool = True
    """Freeze the garbage collector's view once built (``EngineConfig``'s)."""


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
    ) -> None:
        self.spec = spec
        self._copier = Copier(spec.stage_threads)
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
        self._send_lock = threading.Lock()
        """Records go out whole: regions may be shared from another thread than the loop's."""
        self._regions: dict[int, tuple[int, int]] = {}
        """Shared regions the runner has mapped: id -> (address here, size)."""
        self._next_region = 0
        self.zero_copy_batches = 0
        """Batches this process did not copy: one query the runner read where it was, or
        several the runner joined into the slot itself."""
        self.routes = [0] * len(INPUT_ROUTES)
        """Batches answered, by how the runner read their inputs (:data:`INPUT_ROUTES`)."""
        self.times = RunnerTimes()
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
        if (record := self._shared_record(slot, queries)) is not None:
            if self._send(record, slot, queries):
                self._inflight.append((slot, queries, sum(q.num_items for q in queries)))
                self.zero_copy_batches += 1
            return
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
        if self._send(_REQUEST.pack(slot, b, n, -1, 0, 0, 0), slot, queries):
            self._inflight.append((slot, queries, b))

    def _send(self, record: bytes, slot: int, queries: list[Query]) -> bool:
        try:
            with self._send_lock:
                self._sock.sendall(record)
        except OSError as err:
            self._free.append(slot)
            self._fail(queries, RunnerDied(f"the GPU runner process is gone ({err})"))
            return False
        return True

    # -- shared regions: inputs the runner reads where they are ----------------------------

    def share_region(self, path: str, address: int, size: int) -> int | None:
        """Have the runner map the shared file at ``path`` (mapped here at ``address``, ``size``
        bytes): a query whose arrays all lie in it is then read from there, not joined into a
        slot first (one copy less on the engine's loop thread). Returns the region's id, or
        None when the runner is gone."""
        if self._dead or not self.info:
            return None
        region = self._next_region
        self._next_region += 1
        name = path.encode()
        try:
            with self._send_lock:
                self._sock.sendall(_REQUEST.pack(_MAP, region, size, len(name), 0, 0, 0) + name)
        except OSError:
            return None
        self._regions = {**self._regions, region: (address, size)}  # readers see old or new
        return region

    def unshare_region(self, region: int) -> None:
        """Stop reading queries from ``region`` (those sent before are still read from it: the
        runner unmaps it after they are done)."""
        if region not in self._regions:
            return
        self._regions = {k: v for k, v in self._regions.items() if k != region}
        if self._dead:
            return
        with contextlib.suppress(OSError), self._send_lock:
            self._sock.sendall(_REQUEST.pack(_UNMAP, region, 0, 0, 0, 0, 0))

    def _shared_record(self, slot: int, queries: list[Query]) -> bytes | None:
        """The record for a batch whose queries all lie in shared regions: one query is read
        by the runner where it is; several are joined into the slot by the runner (the copy
        leaves this process). None when any query is elsewhere or the join would not fit."""
        if not self._regions:
            return None
        where = [self._locate(q) for q in queries]
        if any(w is None for w in where):
            return None
        sizes = [(q.batch.batch_size, q.batch.sparse.values.numel()) for q in queries]  # type: ignore[union-attr]
        b, n = sum(x for x, _ in sizes), sum(y for _, y in sizes)
        if len(queries) == 1:
            return _REQUEST.pack(slot, b, n, *where[0])  # type: ignore[misc]
        if not self._views[slot].fits(b, n):
            return None  # the join in this process says what does not fit
        parts = b"".join(
            _PART.pack(*w, bq, nq)  # type: ignore[misc]
            for w, (bq, nq) in zip(where, sizes, strict=True)
        )
        return _REQUEST.pack(slot, b, n, _JOINED, len(queries), 0, 0) + parts

    def _locate(self, query: Query) -> tuple[int, int, int, int] | None:
        """``(region, dense, ids, offsets byte offsets)`` when the query's arrays all lie in
        one shared region in the layout the runner reads, else None."""
        batch = query.batch
        if not self._regions or batch is None:
            return None
        s = batch.sparse
        if s.keys != self.keys or s.weights is not None or batch.batch_size > self.max_items:
            return None
        arrays = (batch.dense, s.values, s.offsets)
        if (
            s.values.dtype != torch.int64
            or s.offsets.dtype != torch.int64
            or batch.dense.dtype != torch.float32
            or not all(t.is_contiguous() and t.device.type == "cpu" for t in arrays)
        ):
            return None
        for region, (base, size) in self._regions.items():
            offs = [t.data_ptr() - base for t in arrays]
            if batch.dense.numel() == 0:
                offs[0] = 0  # nothing to read
            if offs[0] % 4 or offs[1] % 8 or offs[2] % 8:
                continue  # the runner reads typed views of the region: elements aligned
            spans = zip(offs, (t.numel() * t.element_size() for t in arrays), strict=True)
            if all(off >= 0 and off + nbytes <= size for off, nbytes in spans):
                return (region, *offs)  # type: ignore[return-value]
        return None

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
        for slot, route, error, host_ns, wait_ns in take_replies(self._buf):
            if 0 <= route < len(INPUT_ROUTES):
                self.routes[route] += 1
            self.times.host_s += host_ns * 1e-9
            self.times.device_wait_s += wait_ns * 1e-9
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
                self._sock.sendall(_REQUEST.pack(_STOP, 0, 0, 0, 0, 0, 0))
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
    # The launching thread stays busy under load, and its reads of the next request return at
    # once; the completing thread must still get the lock to answer each batch.
    switch_interval = prompt_lock_handoff()
    try:
        torch.set_num_threads(1)
        device = torch.device(spec.device)
        with torch.inference_mode():
            model, pipeline = _build(spec, device)
        arena = StagingArena(spec.arena)
        registered = device.type == "cuda" and _register(arena)
        gcpause.monitor(slow_ms=SLOW_GC_MS)  # a long pause here stalls every batch: say so
        if spec.gc_freeze:
            gcpause.freeze()
        conn.send(
            (
                "ready",
                {
                    "pid": os.getpid(),
                    "pipeline": pipeline is not None,
                    "registered": registered,
                    "switch_interval_s": switch_interval,
                },
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


@dataclass(frozen=True)
class _Request:
    """A batch to run: its slot (answers go there), size, and where its inputs are."""

    slot: int
    items: int
    ids: int
    region: int
    dense: int
    values: int
    offsets: int
    parts: tuple[_Request, ...] = ()
    """A batch the runner joins: its queries (each with its own region and offsets)."""


class _Regions:
    """The shared files the engine asked this runner to map (inputs read where they are);
    page-locked for the device on CUDA, so copies go straight from them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._maps: dict[int, tuple[mmap.mmap, torch.Tensor, bool]] = {}
        self._typed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """Each region as int64 and float32 (one slice per array, not a slice and a view)."""
        self._locked: dict[int, int] = {}
        """Bytes of each region page-locked for the device (0: none)."""

    def map(self, region: int, path: str, size: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        data = torch.frombuffer(mapping, dtype=torch.uint8)
        registered = False
        if self.device.type == "cuda":
            from recserve.storage.host import register_host_memory

            try:
                register_host_memory(data.data_ptr(), size - size % mmap.PAGESIZE)
                registered = True
            except Exception as err:  # still correct: the pipeline stages what is not pinned
                log.warning("could not page-lock shared region %s (%s)", path, err)
        self._maps[region] = (mapping, data, registered)
        self._locked[region] = size - size % mmap.PAGESIZE if registered else 0
        whole = data[: size - size % 8]
        self._typed[region] = (whole.view(torch.int64), whole.view(torch.float32))

    def pinned(self, parts: tuple[_Request, ...], num_keys: int, num_dense: int) -> bool:
        """Whether every array of every part lies in the page-locked span of its region (a
        region's last partial page is not locked: the device must not read it)."""
        for p in parts:
            end = max(
                p.dense + 4 * p.items * num_dense, p.values + 8 * p.ids,
                p.offsets + 8 * (num_keys * p.items + 1),
            )  # fmt: skip
            if end > self._locked.get(p.region, 0):
                return False
        return True

    def unmap(self, region: int) -> None:
        entry = self._maps.pop(region, None)
        self._typed.pop(region, None)
        self._locked.pop(region, None)
        if entry is None:
            return
        mapping, data, registered = entry
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy still reads it
            if registered:
                from recserve.storage.host import unregister_host_memory

                with contextlib.suppress(Exception):
                    unregister_host_memory(data.data_ptr())
        del data
        with contextlib.suppress(BufferError):  # a view still held: it goes with the view
            mapping.close()

    def batch(self, r: _Request, keys: tuple[str, ...], num_dense: int) -> Batch:
        """Views of the request's arrays in its region (no copy; the engine sends only
        offsets aligned to their arrays' elements)."""
        b = r.items
        i64, f32 = self._typed[r.region]
        values = i64[r.values >> 3 : (r.values >> 3) + r.ids]
        offsets = i64[r.offsets >> 3 : (r.offsets >> 3) + len(keys) * b + 1]
        dense = f32[r.dense >> 2 : (r.dense >> 2) + b * num_dense]
        return Batch(dense.view(b, num_dense), KeyedJagged(keys, values, offsets, b))

    def close(self) -> None:
        for region in list(self._maps):
            self.unmap(region)


def _next_request(sock: socket.socket, regions: _Regions) -> _Request | None:
    """The next batch to run (maps and unmaps regions on the way), or None when told to stop
    or the engine is gone."""
    while True:
        try:
            data = sock.recv(_REQUEST.size, socket.MSG_WAITALL)
            if len(data) < _REQUEST.size:
                return None
            r = _Request(*_REQUEST.unpack(data))
            if r.slot == _MAP:
                path = sock.recv(r.region, socket.MSG_WAITALL).decode()
                regions.map(r.items, path, r.ids)
                continue
        except (OSError, KeyboardInterrupt):
            return None
        if r.slot == _UNMAP:
            regions.unmap(r.items)
            continue
        if r.slot >= 0 and r.region == _JOINED:
            try:
                data = sock.recv(_PART.size * r.dense, socket.MSG_WAITALL)
            except (OSError, KeyboardInterrupt):
                return None
            if len(data) < _PART.size * r.dense:
                return None
            parts = []
            for k in range(r.dense):
                region, d, v, o, b, n = _PART.unpack_from(data, k * _PART.size)
                parts.append(_Request(r.slot, b, n, region, d, v, o))
            r = dataclasses.replace(r, parts=tuple(parts))
        return None if r.slot < 0 else r


def pack_reply(
    slot: int, error: str | None, route: int = 0, host_ns: int = 0, wait_ns: int = 0
) -> bytes:
    """The runner's reply record for ``slot``: answered (``error`` None) or failed, how its
    inputs were read (an index into :data:`INPUT_ROUTES`), and its times (:class:`RunnerTimes`,
    in nanoseconds)."""
    text = (error or "").encode()
    return _REPLY.pack(slot, route, host_ns, wait_ns, len(text)) + text


def _describe(err: BaseException) -> str:
    """An error's text as the engine reports it for the batch's queries."""
    return f"GPU runner: {type(err).__name__}: {err}"


def _reply(
    sock: socket.socket,
    slot: int,
    error: str | None,
    route: int = 0,
    host_ns: int = 0,
    wait_ns: int = 0,
) -> None:
    sock.sendall(pack_reply(slot, error, route, host_ns, wait_ns))


def _route(r: _Request) -> int:
    """How a request's inputs are read when they are not joined on the device."""
    if r.parts:
        return INPUT_ROUTES.index("host_join")
    return INPUT_ROUTES.index("slot" if r.region < 0 else "in_place")


def _inputs(
    r: _Request, spec: RunnerSpec, arena: StagingArena, regions: _Regions, copier: Copier
) -> Batch:
    """The request's batch: staged in its slot, read in a shared region, or joined into the
    slot here from queries in shared regions."""
    nd = arena.dense.shape[-1]
    if r.parts:
        parts = [regions.batch(p, spec.keys, nd) for p in r.parts]
        views = HostBuffers(arena.dense[r.slot], arena.values[r.slot], arena.offsets[r.slot])
        return concat_batches(parts, spec.keys, views, copier)
    if r.region < 0:
        return arena.batch(r.slot, r.items, r.ids, spec.keys)
    return regions.batch(r, spec.keys, nd)


def _cpu_loop(spec: RunnerSpec, sock: socket.socket, model: Any, arena: StagingArena) -> None:
    regions, copier = _Regions(torch.device("cpu")), Copier(spec.stage_threads)
    try:
        while (r := _next_request(sock, regions)) is not None:
            error, began = None, time.perf_counter_ns()
            try:
                arena.out[r.slot, : r.items] = model(_inputs(r, spec, arena, regions, copier))
            except Exception as err:  # reported to the engine, which fails the batch's queries
                error = _describe(err)
            try:
                _reply(sock, r.slot, error, _route(r), time.perf_counter_ns() - began)
            except OSError:
                return
    finally:
        regions.close()
        copier.close()


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
        self.pending: queue.SimpleQueue[tuple[int, int, Any, str | None, int, int] | None] = (
            queue.SimpleQueue()
        )
        self.refusals: set[str] = set()

    def run(self) -> None:
        done = threading.Thread(target=self._complete, name="recserve-gpu-done", daemon=True)
        done.start()
        regions, copier = _Regions(self.device), Copier(self.spec.stage_threads)
        # This thread launches on the runner's stream only: set once, not per batch.
        torch.cuda.set_stream(self.stream)
        try:
            while (r := _next_request(self.sock, regions)) is not None:
                route, nd = _route(r), self.arena.dense.shape[-1]
                began, event, error = time.perf_counter_ns(), None, None
                try:
                    if (
                        r.parts
                        and self.pipeline is not None
                        and self.spec.join_on_device
                        and regions.pinned(r.parts, len(self.spec.keys), nd)
                    ):
                        parts = [regions.batch(p, self.spec.keys, nd) for p in r.parts]
                        event = self._launch(r.slot, r.items, parts)
                        if event is None:
                            self._refused(self.pipeline.join_refusal)
                        else:
                            route = INPUT_ROUTES.index("device_join")
                    if event is None:
                        batch = _inputs(r, self.spec, self.arena, regions, copier)
                        event = self._launch(r.slot, r.items, batch)
                except Exception as err:
                    event, error = None, _describe(err)
                host_ns = time.perf_counter_ns() - began
                self.pending.put((r.slot, r.items, event, error, route, host_ns))
        finally:
            self.pending.put(None)
            done.join(timeout=30)
            regions.close()
            copier.close()

    def _launch(self, slot: int, b: int, batch: Batch | list[Batch]) -> torch.cuda.Event | None:
        """Start ``batch`` (or queries in shared regions to join on the device: None when the
        pipeline cannot, and nothing was started). Runs on the runner's stream, the
        thread's current one."""
        if isinstance(batch, list):
            if self.pipeline.call_joined(batch, out=self.out[slot, :b]) is None:
                return None
        elif self.pipeline is not None:
            self.pipeline(batch, out=self.out[slot, :b])
        else:
            out = self.model(batch.to(self.device, non_blocking=True))
            self.out[slot, :b].copy_(out, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def _refused(self, reason: str) -> None:
        """Say once per reason why joined batches are joined on the host instead."""
        if reason not in self.refusals:
            self.refusals.add(reason)
            log.warning("GPU runner: joining batches on the host: %s", reason)

    def _complete(self) -> None:
        while (item := self.pending.get()) is not None:
            slot, b, event, error, route, host_ns = item
            wait_ns = 0
            if error is None:
                try:
                    began = time.perf_counter_ns()
                    event.synchronize()
                    wait_ns = time.perf_counter_ns() - began
                    if not self.registered:
                        self.arena.out[slot, :b].copy_(self.out[slot, :b])
                except Exception as err:
                    error = _describe(err)
            try:
                _reply(self.sock, slot, error, route, host_ns, wait_ns)
            except OSError:
                return
