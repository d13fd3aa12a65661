"""CPU workers: separate processes, one thread each, sharing one copy of the weights.

The parent stages a query once into a shared slot; each worker gets a small message naming the
slot and its items ``[start, stop)``, slices the query itself, runs the model and writes its
rows of the answer into the slot's shared output. So the GIL is never the limit, no tensor is
pickled, and the parent's per-sub-batch work is one short message each way.

Each worker may hold ``depth`` sub-batches (one running, the rest waiting in its pipe), so a
busy worker starts its next sub-batch the moment it finishes one, without a round trip through
the engine's loop; new work goes to the least-loaded worker, so idle workers are used first.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import select
import time
import traceback
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch

from recserve import gcpause
from recserve.config import ModelConfig
from recserve.engine.request import Completion, Query, SubBatch
from recserve.engine.shared import (
    ArenaSpec,
    StagingArena,
    load_shared_model,
    process_memory,
)
from recserve.procname import set_process_name


class WorkerDied(RuntimeError):
    """A CPU worker process exited while running part of a query."""


class CpuWorkerPool:
    """``workers`` processes fed sub-batches from the engine's loop thread (not thread-safe:
    one thread calls everything but :meth:`memory`)."""

    def __init__(
        self,
        model_path: Path,
        config: ModelConfig,
        workers: int,
        arena: StagingArena,
        threads: int = 1,
        start_timeout: float = 300.0,
        depth: int = 2,
        wake: Callable[[], None] | None = None,
        gc_freeze: bool = True,
    ) -> None:
        if workers < 1:
            raise ValueError("a CPU worker pool needs at least one worker")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if arena.spec.slots < depth * workers + 1:
            raise ValueError("the staging arena needs a slot per queued sub-batch plus one")
        self.depth = depth
        self._wake = wake or (lambda: None)
        """Wakes the loop thread: work refused at dispatch is answered on its next poll."""
        self.keys = config.feature_keys
        self.arena = arena
        ctx = mp.get_context("spawn")
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        for index in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(index, str(model_path), arena.spec, self.keys, child, threads, gc_freeze),
                name=f"recserve-cpu-{index}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        self.pids = self._wait_ready(start_timeout)
        self._queued: list[deque[SubBatch]] = [deque() for _ in range(workers)]
        """Per worker: its sub-batches in the order it runs them (the first is running)."""
        self._dead: set[int] = set()
        self._free_slots: list[int] = list(range(arena.spec.slots))
        self._slot_of: dict[int, tuple[int, int]] = {}
        """query id -> (slot, number of ids)"""
        self._outstanding: dict[int, int] = {}
        """slot -> sub-batches of its query running now"""
        self._errors: list[Completion] = []

    def _wait_ready(self, timeout: float) -> list[int]:
        pids: list[int] = [0] * len(self._conns)
        deadline = time.monotonic() + timeout
        for i, conn in enumerate(self._conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                self.close()
                raise RuntimeError(f"CPU worker {i} did not start within {timeout:.0f} s")
            try:
                kind, payload = conn.recv()
            except EOFError:
                kind, payload = "error", "exited during start-up"
            if kind != "ready":
                self.close()
                raise RuntimeError(f"CPU worker {i} failed to start: {payload}")
            pids[i] = payload
        return pids

    @property
    def num_workers(self) -> int:
        return len(self._procs) - len(self._dead)

    def idle_workers(self) -> int:
        """Sub-batches the pool takes now: free queue places over the live workers."""
        return sum(self.depth - len(q) for i, q in enumerate(self._queued) if i not in self._dead)

    def _least_loaded(self) -> int:
        live = [i for i in range(len(self._queued)) if i not in self._dead]
        return min(live, key=lambda i: len(self._queued[i]))

    def dispatch(self, work: list[SubBatch]) -> None:
        for sub in work:
            try:
                slot, num_values = self._stage(sub.query)
            except ValueError as err:
                self._errors.append(Completion(sub.query, sub.start, sub.stop, error=err))
                self._wake()
                continue
            worker = self._least_loaded()
            self._queued[worker].append(sub)
            self._outstanding[slot] += 1
            b = sub.query.num_items
            self._conns[worker].send((slot, b, num_values, sub.start, sub.stop))

    def _stage(self, query: Query) -> tuple[int, int]:
        staged = self._slot_of.get(query.id)
        if staged is not None:
            return staged
        if query.batch is None:
            raise ValueError(f"query {query.id} has no inputs")
        slot = self._free_slots.pop()
        try:
            num_values = self.arena.stage(slot, query.batch, self.keys)
        except ValueError:
            self._free_slots.append(slot)
            raise
        self._slot_of[query.id] = (slot, num_values)
        self._outstanding[slot] = 0
        query.on_finish = self._on_query_finish
        return slot, num_values

    def _on_query_finish(self, query: Query) -> None:
        staged = self._slot_of.get(query.id)
        if staged is not None and self._outstanding[staged[0]] == 0:
            self._release(query)

    def _release(self, query: Query) -> None:
        slot, _ = self._slot_of.pop(query.id)
        del self._outstanding[slot]
        self._free_slots.append(slot)

    def poll(self) -> list[Completion]:
        out, self._errors = self._errors, []
        busy = {self._conns[w]: w for w, queued in enumerate(self._queued) if queued}
        if not busy:
            return out
        ready, _, _ = select.select(list(busy), [], [], 0)  # one call, not a selector per pipe
        for conn in ready:
            worker = busy[conn]
            queued = self._queued[worker]
            try:
                reply = conn.recv()  # one per step: a second waiting reply wakes the loop again
            except (EOFError, OSError):
                self._dead.add(worker)
                died = WorkerDied(
                    f"CPU worker {worker} exited (code {self._procs[worker].exitcode})"
                )
                while queued:  # everything it held fails; nothing is lost silently
                    out.append(self._finish_part(queued.popleft(), died))
                continue
            out.append(self._finish_part(queued.popleft(), reply))
        return out

    def _finish_part(self, sub: SubBatch, reply: Any) -> Completion:
        query = sub.query
        slot, _ = self._slot_of[query.id]
        self._outstanding[slot] -= 1
        if reply is None:
            done = Completion(
                query, sub.start, sub.stop, self.arena.out[slot, sub.start : sub.stop].clone()
            )
        else:
            error = reply if isinstance(reply, BaseException) else RuntimeError(reply)
            done = Completion(query, sub.start, sub.stop, error=error)
        if query.done and self._outstanding[slot] == 0:
            self._release(query)
        return done

    def waitables(self) -> list[Any]:
        """What the loop thread waits on: replies of busy workers and every process's exit."""
        return [self._conns[w] for w, q in enumerate(self._queued) if q] + [
            p.sentinel for i, p in enumerate(self._procs) if i not in self._dead
        ]

    def memory(self) -> list[dict[str, int]]:
        """RSS / PSS / shared bytes of every live worker."""
        return [process_memory(pid) for i, pid in enumerate(self.pids) if i not in self._dead]

    def touch_weights(self, timeout: float = 600.0) -> None:
        """Make every worker read all of its weights once (so every page is resident in every
        worker: the worst case for memory). Call only while the pool is idle."""
        if any(self._queued):
            raise RuntimeError("touch_weights needs an idle pool")
        live = [i for i in range(len(self._procs)) if i not in self._dead]
        for i in live:
            self._conns[i].send("touch")
        for i in live:
            if not self._conns[i].poll(timeout) or self._conns[i].recv() is not None:
                raise RuntimeError(f"CPU worker {i} failed to read its weights")

    def close(self, timeout: float = 10.0) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):  # already gone
                conn.send(None)
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
        for conn in self._conns:
            conn.close()


def _worker_main(
    index: int,
    model_path: str,
    spec: ArenaSpec,
    keys: tuple[str, ...],
    conn: Connection,
    threads: int,
    gc_freeze: bool = True,
) -> None:
    """A worker's whole life: map the weights and the arena, then answer messages until told
    to stop (``None``) or the parent goes away."""
    set_process_name(f"recserve-cpu{index}")
    try:
        torch.set_num_threads(threads)
        model = load_shared_model(model_path)
        arena = StagingArena(spec)
        if gc_freeze:
            gcpause.freeze()
        conn.send(("ready", os.getpid()))
    except BaseException:
        conn.send(("error", traceback.format_exc(limit=4)))
        return
    with torch.inference_mode():
        while True:
            try:
                wait_any([conn])
                msg = conn.recv()
            except (EOFError, OSError, KeyboardInterrupt):
                return
            if msg is None:
                return
            if msg == "touch":
                for t in model.state_dict().values():
                    t.float().sum()
                conn.send(None)
                continue
            slot, b, num_values, start, stop = msg
            try:
                batch = arena.batch(slot, b, num_values, keys)
                if (start, stop) != (0, b):
                    batch = batch.slice_items(start, stop)
                arena.out[slot, start:stop] = model(batch)
                conn.send(None)
            except Exception as err:  # reported to the engine, which fails the query
                conn.send(f"worker {index}: {type(err).__name__}: {err}")
