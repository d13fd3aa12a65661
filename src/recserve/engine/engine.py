"""RecEngine: the :class:`~recserve.engine.interface.InferenceEngine` servers and loadgen use.

Threads: callers ``submit`` from any thread (admission is checked at once); one loop thread
runs :meth:`EngineCore.step` whenever something happens — a new query, a worker's reply, a GPU
batch done, a coalescing deadline — and sleeps otherwise. CPU workers are processes; the GPU
runner has its own threads. The loop body is the core's ``step``; this file is the plumbing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from torch import nn

from recserve import gcpause
from recserve.config import ModelConfig
from recserve.engine.config import EngineConfig, SchedConfig
from recserve.engine.core import Clock, EngineCore
from recserve.engine.cpu_pool import CpuWorkerPool
from recserve.engine.gpu_process import (
    INPUT_ROUTES,
    GpuProcessRunner,
    RunnerSpec,
    runner_buckets,
)
from recserve.engine.gpu_runner import GpuRunner
from recserve.engine.interface import EngineClosed
from recserve.engine.scheduler import Scheduler
from recserve.engine.shared import (
    ArenaSpec,
    StagingArena,
    model_nbytes,
    pick_shared_dir,
    save_shared_model,
    unlink_shared_model,
)
from recserve.pipeline import runner_model
from recserve.polling import light_load, select_readable
from recserve.types import Batch

log = logging.getLogger(__name__)


class _Waker:
    """A self-pipe: any thread can wake the loop thread out of its wait.

    A wake-up already written and not yet cleared makes further ones free (no write, no
    system call): under load, callers submit far more often than the loop waits."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._armed = False
        """A byte is (or is about to be) in the pipe."""

    def wake(self) -> None:
        if self._armed:
            return
        self._armed = True
        with contextlib.suppress(BlockingIOError):  # a full pipe: the loop will wake anyway
            os.write(self._w, b"x")

    def clear(self) -> None:
        """Drain the pipe, then disarm: a wake-up that lands in between leaves its byte for
        the next wait (a spare wake-up, never a lost one). Disarming first could drain the byte
        of a wake-up that had just armed, and later ones would skip their write."""
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        self._armed = False

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._w)


def resolve_runner_device(device: str) -> torch.device | None:
    if device == "none":
        return None
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def default_ids_per_item(config: ModelConfig) -> int:
    return max(
        1,
        2 * sum(t.lookups for t in config.pooled_tables) + sum(s.max_len for s in config.sequences),
    )


class RecEngine:
    """Serve one model with CPU workers and (optionally) a GPU runner, DeepRecSys-style.

    ``model`` is on the CPU; CPU workers map one shared copy of it, and the GPU runner moves
    ``model`` itself to its device. ``set_schedule`` changes b / T / coalescing while running.
    """

    coalesces = True
    """The engine joins queued queries itself (GPU coalescing up to ``gpu_max_batch``, CPU
    sub-batches over its workers): a server should hand it requests one by one rather than
    join them first (:class:`~recserve.server.batching.DynamicBatcher` does so)."""

    def __init__(
        self,
        model: nn.Module,
        config: EngineConfig | None = None,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.engine_config = config = config or EngineConfig()
        self.config: ModelConfig = model.config  # type: ignore[assignment]
        self.keys = self.config.feature_keys
        self.device = resolve_runner_device(config.device)
        if config.cpu_workers == 0 and self.device is None:
            raise ValueError("an engine needs CPU workers or a runner device")
        ids_per_item = config.max_ids_per_item or default_ids_per_item(self.config)
        self._waker = _Waker()
        self._spin_s = config.busy_poll_us / 1e6
        self._pool: CpuWorkerPool | None = None
        self._gpu: GpuRunner | GpuProcessRunner | None = None
        self._gc = gcpause.monitor()
        try:
            self._start_executors(model, config, ids_per_item)
        except BaseException:
            self._shutdown_executors()
            raise
        if config.gc_freeze:  # started: what is alive now is the libraries', the model's, ours
            gcpause.freeze()
        scheduler = Scheduler(
            config.sched, has_cpu=self._pool is not None, has_gpu=self._gpu is not None
        )
        self.core = EngineCore(scheduler, self._pool, self._gpu, clock, config.queue_capacity)
        self._new_sched: SchedConfig | None = None
        self._sched_applied = threading.Event()
        self._fail_queued = False
        self._stop = False
        self._readers: dict[int, Callable[[], None]] = {}
        self._ready: list[int] = []
        self._loop_cpu_s = 0.0
        """CPU seconds the loop thread has used (read at the end of each pass)."""
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="recserve-engine", daemon=True)
        self._thread.start()

    def _start_executors(self, model: nn.Module, config: EngineConfig, ids_per_item: int) -> None:
        """Share the weights through one file, start the CPU workers and the GPU runner (a
        process, or threads of this one), then unlink the files (the mappings stay): nothing
        is left behind if a process dies."""
        runner_items = max(config.max_query_items, config.sched.gpu_max_batch)
        in_process = self.device is not None and config.gpu_runner == "thread"
        need_file = config.cpu_workers > 0 or (self.device is not None and not in_process)
        if in_process:
            assert self.device is not None
            served, pipeline = runner_model(
                model, self.device, config.gpu_kernels, runner_buckets(runner_items), ids_per_item
            )
            self._gpu = GpuRunner(
                served.eval(),
                self.keys,
                self.config.num_dense,
                self.config.num_tasks,
                runner_items,
                runner_items * ids_per_item,
                self.device,
                config.gpu_max_inflight,
                self._waker.wake,
                pipeline,
                stage_threads=config.stage_threads,
            )
        if not need_file:
            return
        pool_spec = ArenaSpec.for_model(
            self.config,
            config.cpu_queue_depth * config.cpu_workers + 2,
            config.max_query_items,
            ids_per_item,
        )
        runner_spec = ArenaSpec.for_model(
            self.config, config.gpu_max_inflight, runner_items, ids_per_item
        )
        use_process = self.device is not None and not in_process
        nbytes = (
            model_nbytes(model)
            + pool_spec.nbytes * (config.cpu_workers > 0)
            + runner_spec.nbytes * use_process
        )
        folder = pick_shared_dir(nbytes, config.shared_dir)
        path = save_shared_model(model, folder)
        try:
            if use_process:
                assert self.device is not None
                self._gpu = GpuProcessRunner(
                    RunnerSpec(
                        str(path),
                        dataclasses.replace(runner_spec, folder=str(folder)),
                        self.keys,
                        str(self.device),
                        config.gpu_kernels,
                        runner_buckets(runner_items),
                        ids_per_item,
                        config.stage_threads,
                        config.join_on_device,
                        config.gc_freeze,
                    ),
                    self._waker.wake,
                )
            if config.cpu_workers:
                staging = StagingArena(dataclasses.replace(pool_spec, folder=str(folder)))
                try:
                    self._pool = CpuWorkerPool(
                        path,
                        self.config,
                        config.cpu_workers,
                        staging,
                        config.worker_threads,
                        depth=config.cpu_queue_depth,
                        wake=self._waker.wake,
                        gc_freeze=config.gc_freeze,
                    )
                finally:
                    staging.unlink()
            if isinstance(self._gpu, GpuProcessRunner):
                self._gpu.wait_ready()  # started first: builds while the workers start
        finally:
            unlink_shared_model(path)

    # -- the InferenceEngine protocol --------------------------------------------------------

    def share_memory(self, path: str, address: int, size: int) -> int | None:
        """Let the GPU runner read queries in place from the shared file at ``path`` (mapped in
        this process at ``address``, ``size`` bytes): a GPU batch of one query whose dense
        features, ids and offsets all lie there is read in place, and a batch of several such
        queries is joined into the slot by the runner process, not by this one (the server's
        front ends decode requests into such files). Returns a handle for
        :meth:`unshare_memory`, or None where the runner is not a process of its own. The
        file's queries must stay unchanged until they are answered."""
        if isinstance(self._gpu, GpuProcessRunner) and self.engine_config.share_inputs:
            return self._gpu.share_region(path, address, size)
        return None

    def unshare_memory(self, handle: int | None) -> None:
        """Stop reading queries in place from a file given to :meth:`share_memory`."""
        if handle is not None and isinstance(self._gpu, GpuProcessRunner):
            self._gpu.unshare_region(handle)

    def submit(self, batch: Batch) -> Future[torch.Tensor]:
        future = self.admit(batch)
        self._waker.wake()
        return future

    def admit(self, batch: Batch) -> Future[torch.Tensor]:
        """:meth:`submit` without waking the loop thread: for a reader callback (see
        :meth:`add_reader`), which runs on that thread just before its next step."""
        b = batch.batch_size
        if not 0 < b <= self.engine_config.max_query_items:
            raise ValueError(
                f"request of {b} items: must be 1 to {self.engine_config.max_query_items}"
            )
        future: Future[torch.Tensor] = Future()
        self.core.admit(b, batch, future)
        return future

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop thread whenever ``fd`` is readable, before the step
        that follows: requests read there go into that step with no thread hand-off, and
        their futures resolve on the same thread (call from the loop thread, or before any
        request arrives)."""
        self._readers = {**self._readers, fd: callback}  # a new dict: the loop may be reading
        self._waker.wake()

    def remove_reader(self, fd: int) -> None:
        self._readers = {k: v for k, v in self._readers.items() if k != fd}

    def stats(self) -> dict[str, Any]:
        out = self.core.stats()
        out["cpu_workers"] = self._pool.num_workers if self._pool is not None else 0
        out["device"] = str(self.device) if self.device is not None else "none"
        out["schedule"] = self.core.scheduler.config.to_dict()
        out["busy_poll_us"] = self.engine_config.busy_poll_us
        out["busy_poll_max_outstanding"] = self.engine_config.busy_poll_max_outstanding
        out["loop_cpu_s"] = self._loop_cpu_s
        out["gc"] = self._gc.snapshot()
        if isinstance(self._gpu, GpuProcessRunner):
            out["gpu_zero_copy_batches"] = self._gpu.zero_copy_batches
            out["gpu_batches_by_input"] = dict(zip(INPUT_ROUTES, self._gpu.routes, strict=True))
            out["gpu_runner_host_s"] = self._gpu.times.host_s
            out["gpu_runner_device_wait_s"] = self._gpu.times.device_wait_s
        return out

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; answer every accepted one (``drain``) or fail the queued ones
        with :class:`EngineClosed` and wait only for those already running; then stop."""
        if self._stop:
            return
        self.core.close()
        if not drain:
            self._fail_queued = True
        self._waker.wake()
        with self._idle:
            self._idle.wait_for(lambda: self.core.in_system == 0, timeout)
        self._stop = True
        self._waker.wake()
        self._thread.join()
        self.core.fail_all(EngineClosed("the engine stopped before answering"))
        self._shutdown_executors()
        self._waker.close()
        if self.engine_config.gc_freeze:
            gcpause.unfreeze()

    # -- control ------------------------------------------------------------------------------

    def set_schedule(self, sched: SchedConfig) -> None:
        """Use ``sched`` for every request submitted after this returns."""
        if sched.uses_gpu and self._gpu is None and self._pool is not None:
            raise ValueError("this engine has no GPU runner; use gpu_threshold=None")
        if self._gpu is not None and sched.gpu_max_batch > self._gpu.max_items:
            raise ValueError(
                f"gpu_max_batch {sched.gpu_max_batch} is over the runner's buffers "
                f"({self._gpu.max_items} items; set it in EngineConfig.sched at start)"
            )
        self._sched_applied.clear()
        self._new_sched = sched
        self._waker.wake()
        if not self._sched_applied.wait(timeout=10.0):
            raise RuntimeError("the engine loop did not take the new schedule")

    @property
    def gpu_runner(self) -> GpuRunner | GpuProcessRunner | None:
        return self._gpu

    @property
    def cpu_pool(self) -> CpuWorkerPool | None:
        return self._pool

    def __enter__(self) -> RecEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            # Clear first, then read the flags: a flag is set before its wake-up is written, so
            # either this pass sees it or the byte stays for the next wait. (Reading ``_stop``
            # before clearing lost the wake-up of ``close`` when both fell in between, and the
            # loop then slept forever with ``close`` waiting to join it.)
            self._waker.clear()
            if self._stop:
                return
            if self._new_sched is not None:
                self.core.step()  # queries submitted before the change keep the old schedule
                self.core.scheduler.set_config(self._new_sched)
                self._new_sched = None
                self._sched_applied.set()
            if self._fail_queued:
                self.core.fail_waiting(EngineClosed("the engine is shutting down"))
            ready, self._ready = self._ready, []
            for fd in ready:
                callback = self._readers.get(fd)
                if callback is None:
                    continue
                try:
                    callback()
                except Exception:  # a reader's bug must not stop the engine
                    log.exception("engine reader callback failed; removing it")
                    self.remove_reader(fd)
            try:
                self.core.step()
            except Exception as err:  # a bug must not strand callers: fail what is queued
                log.exception("engine step failed")
                self.core.fail_waiting(err)
            if self.core.in_system == 0:
                with self._idle:
                    self._idle.notify_all()
            self._loop_cpu_s = time.thread_time()
            self._wait()

    def _wait(self) -> None:
        deadline = self.core.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - self.core.clock())
        waitables: list[Any] = [self._waker.fd]
        if self._pool is not None:
            waitables += self._pool.waitables()
        if isinstance(self._gpu, GpuProcessRunner):
            waitables += self._gpu.waitables()
        readers = self._readers
        waitables += readers
        busy = light_load(self.core.in_system, self.engine_config.busy_poll_max_outstanding)
        spin = self._spin_s if busy else 0.0
        ready = select_readable(waitables, timeout, spin)
        if readers:
            self._ready = [fd for fd in ready if fd in readers]

    def _shutdown_executors(self) -> None:
        if self._gpu is not None:
            self._gpu.close()
        if self._pool is not None:
            self._pool.close()
