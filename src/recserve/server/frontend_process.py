"""The front-end process's side: reading, decoding and validating requests (see
:mod:`recserve.server.frontend` for how the server process starts and feeds these processes).

:class:`FrontendCore` is what the HTTP and gRPC handlers call in a front end: it decodes a
request (into a block of the front end's shared-memory arena, :class:`ArenaStaging`), sends
the batch to the model's engine process or to the server process over :class:`_Channel`, and
reports each outcome to the server process for the metrics. :func:`frontend_main` is the
process's entry point.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from recserve import gcpause
from recserve.config import ModelConfig
from recserve.polling import PollingSelector, light_load
from recserve.procname import set_process_name
from recserve.server import ipc
from recserve.server.batching import Result
from recserve.server.engine_host import infer_meta
from recserve.server.errors import (
    NotFound,
    ServerError,
    Unavailable,
    error_from_frame,
)
from recserve.server.protocol import ModelSignature
from recserve.server.settings import ServerSettings
from recserve.server.shm import SystemSharedMemory
from recserve.types import Batch

log = logging.getLogger(__name__)

T = TypeVar("T")


def format_address(host: str, port: int | None) -> str:
    """``host:port``, the host in brackets when it is an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class FrontendSpec:
    """What one front-end process is started with."""

    index: int
    ipc_path: str
    settings: ServerSettings
    http: bool
    """Whether to serve HTTP: connections come over ``handoff``, accepted by the server
    process."""
    grpc_port: int | None
    private_http: str | None
    """``host:port`` of the server process's own HTTP endpoint (everything but infer)."""
    private_grpc: str | None
    handoff: socket.socket | None = None
    arena_dir: str | None = None
    """Where to create the shared-memory arena requests' arrays go through."""
    shm_registry: str | None = None
    """The server's registry of system shared memory regions (:mod:`recserve.server.shm`)."""


@dataclass
class RemoteModel:
    """What a front end knows of a served model: enough to decode and validate its requests."""

    name: str
    signature: ModelSignature
    generation: int
    version: str = ""
    engine: str | None = None
    """The address of the model's engine process, when it takes requests directly
    (:mod:`recserve.server.engine_host`); None: through the server process."""


class ArenaStaging:
    """A request's arrays decoded straight into a block of the front end's arena
    (:data:`~recserve.server.protocol.Staging`): one copy from the request's bytes instead of
    one into a buffer of the decoder's and one more into the arena. ``release()`` gives the
    block back (the handler calls it once the engine has answered, or the decode failed)."""

    def __init__(self, arena: ipc.Arena) -> None:
        self.arena = arena
        self.placed: tuple[tuple[int, int], list[int]] | None = None
        self.writer: concurrent.futures.Future[Any] | None = None
        """The decode writing into the block on a worker thread, if any: the block is given
        back only once it is done (a cancelled request must not free memory still written)."""

    def __call__(
        self, b: int, num_dense: int, n_values: int, n_offsets: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if self.placed is not None:
            raise RuntimeError("a request's staging is used once")
        placed = self.arena.place([4 * b * num_dense, 8 * n_values, 8 * n_offsets])
        if placed is None:  # full for now: the decoder's own arrays, sent in the frame
            return None
        self.placed = placed
        block, (d, v, o) = placed
        arena = self.arena
        dense = arena.array(block, d, "<f4", b * num_dense).reshape(b, num_dense)
        return (
            dense,
            arena.array(block, v, "<i8", n_values),
            arena.array(block, o, "<i8", n_offsets),
        )

    def release(self) -> None:
        writer = self.writer
        if writer is not None and not writer.done():
            writer.add_done_callback(lambda _: self._free())  # at once if done meanwhile
            return
        self._free()

    def _free(self) -> None:
        placed, self.placed = self.placed, None
        if placed is not None:
            self.arena.free(placed[0])


class _RemoteRequestMetrics:
    def __init__(self, core: FrontendCore, model: str, protocol: str) -> None:
        self.core, self.model, self.protocol = core, model, protocol

    def success(self, items: int, queue_s: float, compute_s: float, total_s: float) -> None:
        stat = {"items": items, "queue_s": queue_s, "compute_s": compute_s, "total_s": total_s}
        self.core.send(
            {"op": "stat", "model": self.model, "protocol": self.protocol, "ok": True, **stat}
        )

    def failure(self, reason: str) -> None:
        meta = {"op": "stat", "model": self.model, "protocol": self.protocol, "ok": False}
        self.core.send({**meta, "reason": reason})


class _RemoteMetrics:
    def __init__(self, core: FrontendCore) -> None:
        self.core = core

    def for_request(self, model: str, protocol: str) -> _RemoteRequestMetrics:
        return _RemoteRequestMetrics(self.core, model, protocol)


class _Channel:
    """Calls over one framed connection (to the server process, or to an engine process):
    each request gets an ``id``, its answer resolves the future of that id."""

    def __init__(
        self,
        on_other: Callable[[dict[str, Any]], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        peer: str = "the server process",
    ) -> None:
        self.peer = peer
        self.proto = ipc.FrameProtocol(self._on_frame, self._on_lost)
        self._calls: dict[int, asyncio.Future[tuple[dict[str, Any], bytearray]]] = {}
        self._ids = itertools.count()
        self._on_other = on_other
        self._on_lost_cb = on_lost

    async def connect(self, path: str) -> None:
        await asyncio.get_running_loop().create_unix_connection(lambda: self.proto, path)

    def send(self, meta: dict[str, Any], arrays: tuple[np.ndarray, ...] = ()) -> bool:
        return self.proto.send(meta, arrays)

    async def call(
        self, meta: dict[str, Any], arrays: tuple[np.ndarray, ...] = (), stale: bool = False
    ) -> tuple[dict[str, Any], bytearray]:
        """Send one request and wait for its answer; a failed one raises its error, marked
        ``stale`` when it is ``Unavailable`` and ``stale`` is set (the caller may refetch
        the model and retry)."""
        call = next(self._ids)
        future: asyncio.Future[tuple[dict[str, Any], bytearray]]
        future = asyncio.get_running_loop().create_future()
        self._calls[call] = future
        if not self.send({**meta, "id": call}, arrays):
            self._calls.pop(call, None)
            error = Unavailable(f"{self.peer} is gone")
            error.stale = stale  # type: ignore[attr-defined]
            raise error
        try:
            reply, data = await future
        except Unavailable as e:
            e.stale = stale  # type: ignore[attr-defined]
            raise
        if "error" in reply:
            error = error_from_frame(reply)
            error.stale = reply.get("stale", False) or (  # type: ignore[attr-defined]
                stale and isinstance(error, Unavailable)
            )
            raise error
        return reply, data

    def _on_frame(self, meta: dict[str, Any], data: bytearray) -> None:
        future = self._calls.pop(meta.get("id", -1), None)
        if future is not None:
            if not future.done():
                future.set_result((meta, data))
        elif self._on_other is not None:
            self._on_other(meta)

    def _on_lost(self) -> None:
        for future in self._calls.values():
            if not future.done():
                future.set_exception(Unavailable(f"{self.peer} is gone"))
                future.exception()  # its caller may be gone too (shutdown): nothing to log
        self._calls.clear()
        if self._on_lost_cb is not None:
            self._on_lost_cb()

    def close(self) -> None:
        if self.proto.transport is not None:
            self.proto.transport.close()


class FrontendCore:
    """What the infer handlers use in a front end (the same calls as
    :class:`~recserve.server.core.ServerCore`): decode here, infer in the server process, or
    in the model's engine process when it has one."""

    def __init__(
        self,
        settings: ServerSettings,
        arena: ipc.Arena | None = None,
        shm_registry: str | None = None,
    ) -> None:
        self.settings = settings
        self.arena = arena
        self.shared_memory = SystemSharedMemory(shm_registry)
        """The server's registered shared memory regions (read here, written by the server)."""
        self.metrics = _RemoteMetrics(self)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="recserve-decode"
        )
        self.stopping = asyncio.Event()
        self.grace_s = settings.grace_s
        self._models: dict[tuple[str, str], RemoteModel] = {}
        self._server: _Channel | None = None
        self._engines: dict[str, _Channel] = {}
        self._opening: dict[str, asyncio.Future[_Channel]] = {}
        self.outstanding = 0
        """Requests sent to the server or an engine process and not answered yet (busy
        polling polls only while there are some)."""

    async def connect(self, path: str) -> None:
        channel = _Channel(self._on_control, self._on_server_lost)
        await channel.connect(path)
        self._server = channel

    def _on_server_lost(self) -> None:
        self._server = None
        self.grace_s = 0.0
        self.stopping.set()

    def send(self, meta: dict[str, Any], arrays: tuple[np.ndarray, ...] = ()) -> bool:
        return self._server is not None and self._server.send(meta, arrays)

    async def model(self, name: str, version: str = "") -> RemoteModel:
        found = self._models.get((name, version))
        return found if found is not None else await self._fetch(name, version)

    async def _fetch(self, name: str, version: str) -> RemoteModel:
        meta, _ = await self._call({"op": "model", "model": name, "version": version})
        config = ModelConfig.from_dict(meta["config"])
        found = RemoteModel(
            meta["name"],
            ModelSignature(config, meta["max_items"]),
            meta["generation"],
            version,
            meta.get("engine"),
        )
        self._models[(name, version)] = found
        return found

    async def decode(self, nbytes: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: inline for small bodies, on a worker thread for large ones (an
        :class:`ArenaStaging` among ``args`` learns of that thread)."""
        if nbytes < self.settings.offload_bytes:
            return fn(*args)
        future = self.executor.submit(fn, *args)
        for arg in args:
            if isinstance(arg, ArenaStaging):
                arg.writer = future
        return await asyncio.wrap_future(future)

    def staging(self) -> ArenaStaging | None:
        """Where one request is decoded into: a block of this front end's arena, so its arrays
        are copied once from the request's bytes (the handler releases it when answered)."""
        return None if self.arena is None else ArenaStaging(self.arena)

    async def infer(
        self, served: RemoteModel, batch: Batch, staging: ArenaStaging | None = None
    ) -> Result:
        """Run ``batch`` (decoded against ``served``, into ``staging`` when its block holds
        it) in the server process or the model's engine process. When the model was reloaded
        meanwhile with the same signature, the batch is still valid and goes again."""
        try:
            return await self._infer(served, batch, staging)
        except ServerError as e:
            if not getattr(e, "stale", False):
                raise
            self._models = {k: m for k, m in self._models.items() if m is not served}
            if isinstance(e, NotFound):
                raise
        fresh = await self._fetch(served.name, served.version)
        old, new = served.signature, fresh.signature
        if old.config != new.config or old.max_items != new.max_items:
            raise Unavailable(f"model {served.name!r} was reloaded with a new signature; retry")
        return await self._infer(fresh, batch, staging)

    async def _infer(
        self, served: RemoteModel, batch: Batch, staging: ArenaStaging | None
    ) -> Result:
        sparse = batch.sparse
        meta = infer_meta(batch)
        if served.engine is None:
            channel = self._server
            meta.update(model=served.name, version=served.version, generation=served.generation)
        else:
            channel = await self._engine(served.engine)
        if channel is None:
            raise Unavailable("the server process is gone")
        direct = served.engine is not None
        arrays = (batch.dense.numpy(), sparse.values.numpy(), sparse.offsets.numpy())
        arena = self.arena
        own = None  # a block taken here, given back here
        if staging is not None and staging.placed is not None:
            placed: tuple[tuple[int, int], list[int]] | None = staging.placed
        else:
            placed = own = arena.write(arrays) if arena is not None else None
        self.outstanding += 1
        try:
            if placed is None:  # no arena, or it is full: the arrays go in the frame
                reply, data = await channel.call(meta, arrays, stale=direct)
            else:
                block, offsets = placed
                reply, data = await channel.call(
                    {**meta, "shm": block, "arrays": offsets}, stale=direct
                )
        finally:
            self.outstanding -= 1
            if own is not None:  # answered (or gone): the block is read no more
                assert arena is not None
                arena.free(own[0])
        scores = ipc.array(data, reply["arrays"][0], "<f4", int(np.prod(reply["shape"])))
        return Result(
            torch.from_numpy(scores.reshape(reply["shape"])), reply["queue_s"], reply["compute_s"]
        )

    async def _engine(self, address: str) -> _Channel:
        """The connection to the engine process at ``address`` (opened on first use)."""
        channel = self._engines.get(address)
        if channel is not None:
            return channel
        opening = self._opening.get(address)
        if opening is None:
            opening = asyncio.ensure_future(self._open_engine(address))
            self._opening[address] = opening
            opening.add_done_callback(lambda _: self._opening.pop(address, None))
        return await asyncio.shield(opening)

    async def _open_engine(self, address: str) -> _Channel:
        def forget() -> None:
            if self._engines.get(address) is channel:
                del self._engines[address]

        channel = _Channel(on_lost=forget, peer="the model's engine process")
        try:
            await channel.connect(address)
        except OSError as e:
            error = Unavailable(f"the model's engine process cannot be reached ({e})")
            error.stale = True  # type: ignore[attr-defined]
            raise error from None
        if self.arena is not None:
            channel.send({"op": "hello", "arena": self.arena.path, "arena_size": self.arena.size})
        self._engines[address] = channel
        return channel

    async def _call(
        self, meta: dict[str, Any], arrays: tuple[np.ndarray, ...] = ()
    ) -> tuple[dict[str, Any], bytearray]:
        if self._server is None:
            raise Unavailable("the server process is gone")
        return await self._server.call(meta, arrays)

    def _on_control(self, meta: dict[str, Any]) -> None:
        if meta.get("op") == "stop":
            self.grace_s = float(meta.get("grace_s", self.grace_s))
            self.stopping.set()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for channel in self._engines.values():
            channel.close()
        self.executor.shutdown(wait=False)
        self.shared_memory.close()
        if self.arena is not None:
            self.arena.close()
            with contextlib.suppress(OSError):
                os.unlink(self.arena.path)


def frontend_main(spec: FrontendSpec) -> None:
    """Entry point of a front-end process (``multiprocessing`` spawn)."""
    set_process_name(f"recserve-fe{spec.index}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the server decides
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    spin_s = spec.settings.serving.busy_poll_us / 1e6
    selector = PollingSelector(spin_s)
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
        runner.run(_serve_frontend(spec, selector))


async def _serve_frontend(spec: FrontendSpec, selector: PollingSelector | None = None) -> None:
    import grpc.aio
    from aiohttp import web

    from recserve.server.grpc_service import build_server
    from recserve.server.http_service import build_app

    settings = spec.settings
    arena = None
    if spec.arena_dir is not None:
        path = os.path.join(spec.arena_dir, f"arena-{spec.index}-{os.getpid()}")
        arena = ipc.Arena(path, max(16 << 20, 2 * settings.max_body_bytes))
    core = FrontendCore(settings, arena, spec.shm_registry)
    if selector is not None:
        limit = settings.serving.busy_poll_max_outstanding
        selector.busy = lambda: light_load(core.outstanding, limit)
    await core.connect(spec.ipc_path)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, core.stopping.set)
    runner, server, channel = None, None, None
    if spec.http:
        assert spec.private_http is not None and spec.handoff is not None
        runner = web.AppRunner(
            build_app(core, proxy=spec.private_http),
            access_log=None,
            shutdown_timeout=settings.grace_s,
            auto_decompress=False,
        )
        await runner.setup()
        _take_connections(spec.handoff, runner)
    if spec.grpc_port is not None:
        assert spec.private_grpc is not None
        limit = settings.max_body_bytes
        channel = grpc.aio.insecure_channel(
            spec.private_grpc,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        )
        server = build_server(core, forward=channel)
        server.add_insecure_port(format_address(settings.host, spec.grpc_port))
        await server.start()
    ready: dict[str, Any] = {"op": "ready", "index": spec.index}
    if arena is not None:
        ready.update(arena=arena.path, arena_size=arena.size)
    gcpause.freeze()  # full collections while serving skip the libraries' objects
    core.send(ready)
    await core.stopping.wait()
    closing = []
    if server is not None:
        closing.append(server.stop(core.grace_s))
    if runner is not None:
        closing.append(runner.cleanup())
    await asyncio.gather(*closing)
    if channel is not None:
        await channel.close()
    core.close()


def _take_connections(handoff: socket.socket, runner: Any) -> None:
    """Serve every connection the server process hands over on ``handoff`` with ``runner``'s
    HTTP server (as if this process had accepted it)."""
    loop = asyncio.get_running_loop()
    handoff.setblocking(False)
    pending: set[asyncio.Task[Any]] = set()

    def receive() -> None:
        try:
            _, fds, _, _ = socket.recv_fds(handoff, 64, 32)
        except BlockingIOError:
            return
        except OSError:
            fds = []
        if not fds:  # the server process closed its end
            loop.remove_reader(handoff)
            return
        for fd in fds:
            sock = socket.socket(fileno=fd)
            if runner.server is None:  # shutting down
                sock.close()
                continue
            sock.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(runner.server, sock))
            pending.add(task)
            task.add_done_callback(pending.discard)

    loop.add_reader(handoff, receive)
