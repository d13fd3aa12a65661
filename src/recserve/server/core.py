"""What the HTTP and gRPC front ends share: repository, metrics, liveness, the infer path."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

import torch

import recserve
from recserve.server.batching import Result
from recserve.server.errors import InvalidArgument, Unavailable
from recserve.server.metrics import ServerMetrics
from recserve.server.repository import (
    EngineFactory,
    ModelRepository,
    ServedModel,
    local_engine_factory,
)
from recserve.server.settings import ServerSettings
from recserve.server.shm import SystemSharedMemory
from recserve.types import Batch

T = TypeVar("T")

EXTENSIONS = (
    "binary_tensor_data",
    "model_repository",
    "model_configuration",
    "system_shared_memory",
)


class ServerCore:
    """Protocol-independent server state; every method runs on the server's event loop."""

    def __init__(
        self, settings: ServerSettings, engine_factory: EngineFactory = local_engine_factory
    ) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            settings.decode_threads,
            thread_name_prefix="recserve-decode",
            initializer=torch.set_num_threads,
            initargs=(1,),  # validation is memory-bound; one OpenMP team per thread is plenty
        )
        self.repository = ModelRepository(
            settings.repository, settings.serving, self.metrics, self.executor, engine_factory
        )
        self.shared_memory = SystemSharedMemory()
        """Registered system shared memory regions (front ends read the same registry)."""
        self.ready = False
        """Ready for requests: start-up loading done, not shutting down."""
        self.draining = False

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "recserve", "version": recserve.__version__, "extensions": list(EXTENSIONS)}

    def check_model_control(self) -> None:
        if not self.settings.model_control:
            raise InvalidArgument("model control is disabled on this server (--no-model-control)")

    async def model(self, name: str, version: str = "") -> ServedModel:
        """The loaded model ``name`` (``NotFound`` otherwise)."""
        return self.repository.get(name, version)

    async def decode(self, nbytes: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: inline for small bodies, on a worker thread for large ones."""
        if nbytes < self.settings.offload_bytes:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def staging(self) -> None:
        """Where a request is decoded into: arrays of its own here (see
        :meth:`~recserve.server.frontend_process.FrontendCore.staging`)."""
        return None

    async def infer(self, served: ServedModel, batch: Batch, staging: Any = None) -> Result:
        return await self.submit(served, batch)

    def submit(self, served: ServedModel, batch: Batch) -> asyncio.Future[Result]:
        """:meth:`infer` as a future (refusals raise at once), for callers on the loop that
        answer from a callback rather than a task of their own."""
        if self.draining:
            raise Unavailable("server is shutting down")
        return served.batcher.submit(batch)

    async def close(self) -> None:
        await self.repository.close()
        self.executor.shutdown(wait=True)
        self.shared_memory.close()
