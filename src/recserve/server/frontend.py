"""Front-end processes: more than one event loop reading, decoding and validating requests.

One Python process answers requests on one event loop, and that loop shares the GIL with the
engine's threads; past a few hundred requests per second, parsing HTTP and gRPC and decoding
tens of tensors per request is the limit, not the model. With ``ServerSettings.frontends = N``
the server process starts N front-end processes that take the public ports' connections: the
server process accepts each HTTP connection and hands it to the front ends in turn (its file
descriptor, over a socket pair), and the front ends share the gRPC port (``SO_REUSEPORT``: the
kernel spreads connections over them by a hash). Each front end decodes and
validates its infer requests exactly as the server process would, then hands the decoded batch
(dense, ids, offsets: three arrays) to the server process over a unix socket
(:mod:`recserve.server.ipc`); the server process runs it through the model's dynamic batcher
and engine and sends the scores back. Every other route and RPC (health, metadata, config,
repository load/unload, ``/metrics``) is passed through to the server process's own endpoints,
which listen on loopback ports of their own, so there is one repository and one set of metrics.

A front end caches each model's signature (config and item limit) with the load generation it
came from; the server process refuses a batch decoded against an older load (503, retry) and
the front end fetches the signature again. On shutdown the server process asks every front end
to stop accepting and finish its in-flight requests, which it keeps answering, before it drains
its own engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
from collections import Counter
from typing import Any

from recserve.server import ipc
from recserve.server.batching import Result
from recserve.server.engine_host import batch_from_frame
from recserve.server.errors import (
    InvalidArgument,
    NotFound,
    ServerError,
    Unavailable,
    error_frame,
    internal,
)
from recserve.server.frontend_process import FrontendSpec, frontend_main
from recserve.server.settings import ServerSettings

log = logging.getLogger(__name__)


def listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024, reuse_port=reuse_port)


def _hold_port(host: str, port: int) -> socket.socket:
    """A bound, not listening, ``SO_REUSEPORT`` socket: fixes the port (``0``: a free one) for
    the front ends to bind too, and never receives a connection itself."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# ----------------------------------------------------------------------------- server side


class FrontendHub:
    """The server process's side: starts the front ends and answers them."""

    def __init__(self, core: Any, settings: ServerSettings) -> None:
        self.core = core  # ServerCore (not imported: core imports the repository, which is heavy)
        self.settings = settings
        self.processes: list[Any] = []
        """The front-end processes (``multiprocessing.Process``), by index."""
        self.restarts = 0
        self._specs: list[FrontendSpec] = []
        self._replacing: set[asyncio.Task[None]] = set()
        self._http: socket.socket | None = None
        self._accepting: asyncio.Future[None] | None = None
        self._handoff: list[socket.socket] = []
        self._ready_indices: set[int] = set()
        self.handed: Counter[int] = Counter()
        """HTTP connections handed to each front end."""
        self._links: list[_Link] = []
        self._ready = 0
        self._changed = asyncio.Event()
        self._dir: str | None = None
        self._arenas: str | None = None
        self._ipc: asyncio.AbstractServer | None = None
        self._stopping = False

    async def start(
        self,
        http_port: int | None,
        grpc_port: int | None,
        private_http: str | None,
        private_grpc: str | None,
        timeout_s: float = 300.0,
    ) -> tuple[int | None, int | None]:
        """Start the front ends on the public ports; returns those ports (``0`` resolved)."""
        host, count = self.settings.host, self.settings.frontends
        holders = []
        try:
            if http_port is not None:
                self._http = listen(host, http_port)
                self._http.setblocking(False)
                http_port = self._http.getsockname()[1]
            if grpc_port is not None:
                holders.append(_hold_port(host, grpc_port))
                grpc_port = holders[-1].getsockname()[1]
            self._dir = tempfile.mkdtemp(prefix="recserve-")
            path = os.path.join(self._dir, "frontends.sock")
            shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            self._arenas = tempfile.mkdtemp(prefix="recserve-", dir=shm)
            loop = asyncio.get_running_loop()
            self._ipc = await loop.create_unix_server(lambda: _Link(self).proto, path)
            for index in range(count):
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                ours.setblocking(False)
                self._handoff.append(ours)
                spec = FrontendSpec(
                    index, path, self.settings, http_port is not None, grpc_port,
                    private_http, private_grpc, theirs, self._arenas,
                    self.core.shared_memory.folder,
                )  # fmt: skip
                self._specs.append(spec)
                self.processes.append(_spawn(spec))
                theirs.close()  # the child has its own copy
            deadline = time.monotonic() + timeout_s
            while self._ready < count:
                for index, proc in enumerate(self.processes):
                    if not proc.is_alive():
                        raise RuntimeError(
                            f"front-end process {index} exited with code {proc.exitcode} "
                            "before it was ready (see its log above)"
                        )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"front-end processes not ready within {timeout_s} s")
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.2)
        except BaseException:
            await self.stop(0.0)
            raise
        finally:
            for sock in holders:
                sock.close()
        if self._http is not None:
            self._accepting = asyncio.ensure_future(self._accept(self._http))
        return http_port, grpc_port

    async def _accept(self, listener: socket.socket) -> None:
        """Hand each HTTP connection to the next front end in turn (``SCM_RIGHTS``): a few
        long-lived client connections spread evenly, which ``SO_REUSEPORT``'s hashing does not
        promise."""
        loop = asyncio.get_running_loop()
        turn = 0
        while True:
            conn, _ = await loop.sock_accept(listener)
            with conn:
                for _ in range(len(self._handoff)):
                    index = turn % len(self._handoff)
                    turn += 1
                    if index in self._ready_indices:
                        try:
                            socket.send_fds(self._handoff[index], [b"c"], [conn.fileno()])
                            self.handed[index] += 1
                        except OSError as e:
                            log.warning("cannot hand a connection to front end %d: %s", index, e)
                            continue
                        break

    async def stop(self, grace_s: float) -> None:
        """Ask every front end to stop accepting and finish its requests; wait for them."""
        self._stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._http is not None:
            self._http.close()
        if self._replacing:
            await asyncio.gather(*self._replacing, return_exceptions=True)
        for link in self._links:
            link.proto.send({"op": "stop", "grace_s": grace_s})

        def join() -> None:
            deadline = time.monotonic() + grace_s + 15
            for proc in self.processes:
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.is_alive():
                    log.warning("front-end process %s did not stop; terminating it", proc.name)
                    proc.terminate()
                    proc.join(5)

        await asyncio.to_thread(join)
        if self._ipc is not None:
            self._ipc.close()
            await self._ipc.wait_closed()
            self._ipc = None
        for folder in (self._dir, self._arenas):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        self._dir = self._arenas = None
        for sock in self._handoff:
            sock.close()
        self._handoff.clear()

    def _on_ready(self, link: _Link, index: int) -> None:
        link.index = index
        self._ready_indices.add(index)
        self._ready += 1
        self._changed.set()

    def _on_lost(self, link: _Link) -> None:
        if link.arena is not None:
            link.arena.close()
        if link in self._links:
            self._links.remove(link)
        self._changed.set()
        if self._stopping or link.index is None:
            return
        self._ready -= 1
        self._ready_indices.discard(link.index)
        task = asyncio.ensure_future(self._replace(link.index))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self, index: int) -> None:
        """A front end died (its connection closed while serving): start another in its place;
        the others keep the ports open meanwhile."""
        old = self.processes[index]
        await asyncio.to_thread(old.join, 10)
        log.error("front-end process %d exited (code %s); starting a new one", index, old.exitcode)
        if not self._stopping:
            self.restarts += 1
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.setblocking(False)
            self._handoff[index].close()
            self._handoff[index] = ours
            spec = dataclasses.replace(self._specs[index], handoff=theirs)
            self._specs[index] = spec
            self.processes[index] = _spawn(spec)
            theirs.close()


class _Link:
    """One front end's connection, on the server process's event loop."""

    def __init__(self, hub: FrontendHub) -> None:
        self.hub = hub
        self.proto = ipc.FrameProtocol(self._on_frame, lambda: hub._on_lost(self))
        hub._links.append(self)
        self.index: int | None = None
        self.arena: ipc.Arena | None = None

    def _on_frame(self, meta: dict[str, Any], data: bytearray) -> None:
        op = meta.get("op")
        if op == "infer":
            self._infer(meta, data)
        elif op == "stat":
            metrics = self.hub.core.metrics.for_request(meta["model"], meta["protocol"])
            if meta["ok"]:
                metrics.success(meta["items"], meta["queue_s"], meta["compute_s"], meta["total_s"])
            else:
                metrics.failure(meta["reason"])
        elif op == "model":
            self._model(meta)
        elif op == "ready":
            if meta.get("arena"):
                self.arena = ipc.Arena(meta["arena"], int(meta["arena_size"]), create=False)
            self.hub._on_ready(self, int(meta["index"]))
        else:
            log.error("unknown message %r from a front-end process", op)

    def _model(self, meta: dict[str, Any]) -> None:
        try:
            served = self.hub.core.repository.get(meta["model"], meta["version"])
        except ServerError as e:
            self.proto.send(_error_meta(meta["id"], e))
            return
        self.proto.send(
            {
                "id": meta["id"],
                "name": served.name,
                "config": served.config.to_dict(),
                "max_items": served.serving.max_items,
                "generation": served.generation,
                "engine": getattr(served.engine, "address", None),
            }
        )

    def _infer(self, meta: dict[str, Any], data: bytearray) -> None:
        """Decode the front end's batch and queue it; the answer goes back from a callback
        (no task per request: this loop carries every front end's requests)."""
        call = meta["id"]
        try:
            core = self.hub.core
            served = core.repository.get(meta["model"], meta["version"])
            if served.generation != meta["generation"]:
                raise _Stale(
                    f"model {served.name!r} was reloaded while the request was being decoded; retry"
                )
            if "shm" in meta:  # the arrays are in the front end's arena, not in the frame
                if self.arena is None:
                    raise InvalidArgument("a front end sent arena data without an arena")
                view = self.arena.view(meta["shm"])
                batch = batch_from_frame(served.config, meta, view)
            else:
                batch = batch_from_frame(served.config, meta, data)
            future = core.submit(served, batch)
        except Exception as e:
            self._reply_error(call, e)
            return
        future.add_done_callback(lambda f: self._reply(call, f))

    def _reply(self, call: int, future: asyncio.Future[Result]) -> None:
        if future.cancelled():
            self._reply_error(call, Unavailable("the request was cancelled"))
            return
        error = future.exception()
        if error is not None:
            self._reply_error(call, error)
            return
        result = future.result()
        try:
            scores = result.scores.numpy()
            reply = {"id": call, "queue_s": result.queue_s, "compute_s": result.compute_s}
            self.proto.send({**reply, "shape": list(scores.shape)}, [scores])
        except Exception as e:
            self._reply_error(call, e)

    def _reply_error(self, call: int, error: BaseException) -> None:
        if not isinstance(error, ServerError):
            log.error("infer from a front-end process failed", exc_info=error)
            error = internal(error)
        self.proto.send(_error_meta(call, error))


def _spawn(spec: FrontendSpec) -> Any:
    proc = mp.get_context("spawn").Process(
        target=frontend_main, args=(spec,), name=f"recserve-frontend-{spec.index}", daemon=True
    )
    proc.start()
    return proc


class _Stale(Unavailable):
    """The front end decoded against a load of the model that is gone."""


def _error_meta(call: int, error: ServerError) -> dict[str, Any]:
    return {**error_frame(call, error), "stale": isinstance(error, (_Stale, NotFound))}
