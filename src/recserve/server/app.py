"""The server process: both protocols on one event loop, start-up loading, graceful shutdown.

:class:`InferenceServer` is the asyncio object (``await start()``, ``await stop()``);
:class:`ServerThread` runs one on a background thread with its own loop, for tests, benchmarks
and embedding in a program that is not asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import grpc.aio
import torch
from aiohttp import web

from recserve.server.core import ServerCore
from recserve.server.frontend import FrontendHub, listen
from recserve.server.frontend_process import format_address
from recserve.server.grpc_service import build_server
from recserve.server.http_service import build_app
from recserve.server.repository import EngineFactory, local_engine_factory
from recserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


class InferenceServer:
    """KServe v2 over HTTP and gRPC in front of a model repository."""

    def __init__(
        self, settings: ServerSettings, engine_factory: EngineFactory = local_engine_factory
    ) -> None:
        self.settings = settings
        self.core = ServerCore(settings, engine_factory)
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._hub: FrontendHub | None = None

    async def start(self, models: Mapping[str, torch.nn.Module] | None = None) -> None:
        """Load the start-up models (and serve ``models``, in memory), then listen."""
        settings, repository = self.settings, self.core.repository
        names = settings.models if settings.models is not None else repository.available()
        for name in names:
            await repository.load(name)
        for name, model in (models or {}).items():
            await repository.add(name, model)
        # With front-end processes, this process's own endpoints move to loopback ports of
        # their own (the front ends pass everything but infer to them).
        fronted = settings.frontends > 0
        host = "127.0.0.1" if fronted else settings.host
        if settings.http_port is not None:
            self._runner = web.AppRunner(
                build_app(self.core),
                access_log=None,
                shutdown_timeout=settings.grace_s,
                auto_decompress=False,
            )
            await self._runner.setup()
            sock = listen(host, 0 if fronted else settings.http_port)
            self.http_port = sock.getsockname()[1]
            await web.SockSite(self._runner, sock).start()
        if settings.grpc_port is not None:
            self._grpc = build_server(self.core)
            self.grpc_port = self._grpc.add_insecure_port(
                format_address(host, 0 if fronted else settings.grpc_port)
            )
            await self._grpc.start()
        if fronted:
            private_http = format_address(host, self.http_port) if self.http_port else None
            private_grpc = format_address(host, self.grpc_port) if self.grpc_port else None
            self._hub = FrontendHub(self.core, settings)
            self.http_port, self.grpc_port = await self._hub.start(
                settings.http_port, settings.grpc_port, private_http, private_grpc
            )
        self.core.ready = True
        log.info("serving %s", ", ".join(repository.models) or "no models")

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish (up to ``grace_s``), drain the models."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        self.core.ready = False
        if self._hub is not None:  # front ends finish their requests through this process
            await self._hub.stop(self.settings.grace_s)
        closing = []
        if self._grpc is not None:
            closing.append(self._grpc.stop(self.settings.grace_s))
        if self._runner is not None:
            closing.append(self._runner.cleanup())
        await asyncio.gather(*closing)
        self.core.draining = True
        await self.core.close()
        log.info("stopped")


class ServerThread:
    """An :class:`InferenceServer` on a background thread; a context manager."""

    def __init__(
        self,
        settings: ServerSettings,
        engine_factory: EngineFactory = local_engine_factory,
        models: Mapping[str, torch.nn.Module] | None = None,
    ) -> None:
        self.server = InferenceServer(settings, engine_factory)
        self._models = models
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (what ``tritonclient.http`` takes)."""
        return format_address(self.server.settings.host, self.server.http_port)

    @property
    def grpc_url(self) -> str:
        return format_address(self.server.settings.host, self.server.grpc_port)

    def start(self, timeout_s: float = 120.0) -> ServerThread:
        self._thread = threading.Thread(target=self._run, name="recserve-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"server did not start within {timeout_s} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the server's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def stop(self, timeout_s: float | None = 120.0) -> None:
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            return
        try:
            self.call(self.server.stop(), timeout_s)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.server.start(self._models))
        except BaseException as e:
            self._error = e
            loop.run_until_complete(self.server.stop())
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
