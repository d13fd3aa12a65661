"""A minimal :class:`~recserve.engine.interface.InferenceEngine`: a bounded FIFO and worker
threads that call ``model(batch)``.

It stands in for the real engine (scheduler, CPU workers, GPU runner) where that is not wired
in, and is the in-process baseline the server benchmark compares against. On a CUDA device each
worker thread runs a recommendation model through its own
:class:`~recserve.pipeline.GPUPipeline` (tables in the Triton backend, the forward replayed as
CUDA graphs); ``pipeline=False`` calls the model as given.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from recserve.config import ModelConfig
from recserve.embedding import TorchBackend
from recserve.engine.engine import default_ids_per_item
from recserve.engine.interface import EngineClosed, Overloaded
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.base import RecModel
from recserve.pipeline import GPUPipeline, device_model
from recserve.types import Batch

_STOP = None


class LocalEngine:
    """Runs ``model(batch)`` on ``workers`` threads, FIFO, under ``torch.inference_mode``, each
    with ``intra_op_threads`` torch threads."""

    def __init__(
        self,
        model: Callable[[Batch], torch.Tensor],
        config: ModelConfig | None = None,
        *,
        workers: int = 1,
        max_queue: int = 64,
        device: torch.device | str | None = None,
        intra_op_threads: int | None = None,
        pipeline: bool = True,
        prepare: bool = True,
    ) -> None:
        found = config if config is not None else getattr(model, "config", None)
        if not isinstance(found, ModelConfig):
            raise ValueError("LocalEngine needs a ModelConfig (model.config or config=)")
        self.config = found
        self.model = model
        self.device = torch.device(device) if device is not None else _model_device(model)
        self._fast: RecModel | None = None
        if pipeline and self.device.type == "cuda" and isinstance(model, RecModel):
            backend = model.sparse.backend
            if backend.graph_safe:
                self._fast = model
            elif isinstance(backend, TorchBackend):  # the same rows in the Triton backend
                self._fast = device_model(model, self.device)
            else:  # host or tiered tables: the dense part is still graphed
                self._fast = model
        self._local = threading.local()
        self._prepare = prepare and self._fast is not None
        self._started = [threading.Event() for _ in range(workers)]
        self._start_error: BaseException | None = None
        self._queue: queue.Queue[tuple[Batch, Future[torch.Tensor]] | None] = queue.Queue(max_queue)
        # torch.set_num_threads is per thread (OpenMP): each worker sets its own, by default the
        # creating thread's count.
        self._intra_op_threads = intra_op_threads or torch.get_num_threads()
        self._lock = threading.Lock()
        self._closed = False
        self._counts = {"requests": 0, "items": 0, "failures": 0, "busy_workers": 0}
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"local-engine-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()
        for started in self._started:  # graphs captured (and kernels compiled) up front
            started.wait()
        if self._start_error is not None:
            self.close()
            raise RuntimeError("preparing the GPU pipeline failed") from self._start_error

    def submit(self, batch: Batch) -> Future[torch.Tensor]:
        future: Future[torch.Tensor] = Future()
        with self._lock:
            if self._closed:
                raise EngineClosed(f"engine of {self.config.name!r} is closed")
            try:
                self._queue.put_nowait((batch, future))
            except queue.Full:
                raise Overloaded(
                    f"engine queue of {self.config.name!r} is full ({self._queue.maxsize})"
                ) from None
        return future

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self._counts,
                "queue_depth": self._queue.qsize(),
                "workers": len(self._threads),
            }

    def close(self, drain: bool = True) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not drain:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None and item[1].set_running_or_notify_cancel():
                    item[1].set_exception(EngineClosed("engine closed before running the request"))
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join()

    def _work(self, index: int) -> None:
        torch.set_num_threads(self._intra_op_threads)
        try:
            if self._prepare:
                pipe = self._pipeline()
                assert pipe is not None
                factory = QueryFactory(self.config, "uniform", seed=index)
                pipe.prepare(factory.make, default_ids_per_item(self.config))
        except BaseException as e:  # reported by the constructor
            self._start_error = e
        finally:
            self._started[index].set()
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, future = item
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._counts["busy_workers"] += 1
            try:
                with torch.inference_mode():
                    pipe = self._pipeline()
                    if pipe is not None:  # copies its own inputs from the host
                        scores = pipe(batch)
                    else:
                        scores = self.model(batch.to(self.device, non_blocking=True))
                    result = scores.float().cpu()
            except Exception as e:
                with self._lock:
                    self._counts["failures"] += 1
                future.set_exception(e)
            else:
                future.set_result(result)
            finally:
                with self._lock:
                    self._counts["busy_workers"] -= 1
                    self._counts["requests"] += 1
                    self._counts["items"] += batch.batch_size

    def _pipeline(self) -> GPUPipeline | None:
        """This worker thread's pipeline (graphs are per thread: a pipeline is not shared)."""
        if self._fast is None:
            return None
        pipe = getattr(self._local, "pipe", None)
        if pipe is None:
            pipe = self._local.pipe = GPUPipeline(self._fast)
        return pipe


def _model_device(model: object) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")
