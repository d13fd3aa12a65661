"""The DeepRecSys engine in a process of its own, which front ends send requests to directly.

Behind a server, :class:`~recserve.engine.RecEngine`'s loop thread shared the server process's
interpreter lock with the event loop that received every front end's requests and answered
them: each request took both threads' turns under one lock, and the two together capped the
server well below what the same engine serves in a process of its own. :class:`EngineHost`
runs the engine in a child process and listens on a unix socket there; each front end opens a
connection to it (the address comes with the model's signature) and sends its decoded batches
straight to it (:mod:`recserve.server.ipc` frames; the arrays stay in the front end's
shared-memory arena). The engine's loop thread reads those sockets itself (``add_reader``):
a request goes from the socket into the engine's next step, and its answer goes back from the
step that completes it, with no thread hand-off and nothing of it on the server process's
lock. The server process keeps one connection of its own (requests that reach it without a
front end, and engine statistics for ``/metrics``), read by a thread.

Wire: the front end sends ``hello`` (its arena's path and size) once, then ``infer`` frames
(``id``, ``b``, ``n_values`` and either ``shm``: the arena block, or the arrays in the frame);
the host answers each ``id`` with the scores, or with ``error`` / ``message`` (a
:class:`~recserve.server.errors.ServerError` class name), exactly as the server process
answers a front end.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from recserve.config import ModelConfig
from recserve.engine.config import EngineConfig
from recserve.engine.interface import EngineClosed
from recserve.engine.shared import (
    load_shared_model,
    model_nbytes,
    pick_shared_dir,
    save_shared_model,
    unlink_shared_model,
    wait_for_child,
)
from recserve.procname import set_process_name
from recserve.server import ipc
from recserve.server.errors import (
    InvalidArgument,
    ServerError,
    error_frame,
    error_from_frame,
    internal,
    refusal,
)
from recserve.types import Batch, KeyedJagged

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 30.0
"""How long the engine's thread waits for a reader that does not take its answers before it
drops that connection (a stuck front end must not stall the engine)."""


def error_meta(call: int, error: BaseException) -> dict[str, Any]:
    """The reply frame of a failed request (engine refusals and size errors as the server
    answers them; anything else as an internal error)."""
    error = refusal(error)
    if isinstance(error, ValueError):
        error = InvalidArgument(str(error))
    elif not isinstance(error, ServerError):
        log.error("engine request failed", exc_info=error)
        error = internal(error)
    return error_frame(call, error)


def send_frame(sock: socket.socket, meta: dict[str, Any], arrays: tuple[Any, ...] = ()) -> None:
    sock.sendall(b"".join(ipc.frame(meta, arrays)))


def batch_arrays(batch: Batch) -> tuple[np.ndarray, ...]:
    sparse = batch.sparse
    if sparse.weights is not None:
        raise InvalidArgument("per-sample weights cannot go to an engine process")
    return batch.dense.numpy(), sparse.values.numpy(), sparse.offsets.numpy()


def infer_meta(batch: Batch) -> dict[str, Any]:
    """The head of an ``infer`` frame for ``batch`` (the arrays' offsets and the call's ``id``
    are added by the sender)."""
    return {"op": "infer", "b": batch.batch_size, "n_values": batch.sparse.values.numel()}


# ----------------------------------------------------------------------- the engine's side


def batch_from_frame(
    config: ModelConfig, meta: dict[str, Any], data: bytearray | memoryview
) -> Batch:
    """The batch a front end sent: views of the frame's binary part, no copies."""
    keys = config.feature_keys
    try:
        b, n = int(meta["b"]), int(meta["n_values"])
        pos = meta["arrays"]
        values = ipc.array(data, pos[1], "<i8", n)
        offsets = ipc.array(data, pos[2], "<i8", len(keys) * b + 1)
        nd = config.num_dense
        dense = (
            torch.from_numpy(ipc.array(data, pos[0], "<f4", b * nd).reshape(b, nd))
            if nd
            else torch.zeros((b, 0), dtype=torch.float32)
        )
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise InvalidArgument(f"malformed batch from a front-end process: {e}") from None
    sparse = KeyedJagged(keys, torch.from_numpy(values), torch.from_numpy(offsets), b)
    sparse.key_offsets()
    return Batch(dense, sparse)


@dataclass(frozen=True)
class HostSpec:
    model_path: str
    config: EngineConfig
    address: str
    torch_threads: int
    """Torch threads of the engine process (its joins of large batches use them). Few: with
    one per core, the joins' thread teams contended with the front ends and the clients for
    the cores, and a server on 16 cores fell from about 3000 to about 500 QPS."""


class _Listener:
    """The host's unix socket, read on the engine's loop thread."""

    def __init__(self, engine: Any, address: str) -> None:
        self.engine = engine
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(256)
        self.sock.setblocking(False)
        self.links: set[_HostLink] = set()
        engine.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            link = _HostLink(self, conn)
            self.links.add(link)
            self.engine.add_reader(conn.fileno(), link.on_readable)

    def close(self) -> None:
        self.engine.remove_reader(self.sock.fileno())
        self.sock.close()
        for link in list(self.links):
            link.close()


class _HostLink:
    """One connection (a front end's, or the server process's own), on the loop thread."""

    def __init__(self, listener: _Listener, sock: socket.socket) -> None:
        self.listener = listener
        self.engine = listener.engine
        self.config = listener.engine.config
        self.sock = sock
        sock.setblocking(False)  # reads never wait; sends wait at most SEND_TIMEOUT_S
        self.proto = ipc.FrameProtocol(self._on_frame)
        self.arena: ipc.Arena | None = None
        self.region: int | None = None
        self.closed = False

    def on_readable(self) -> None:
        while not self.closed:
            buf = self.proto.get_buffer(-1)
            try:
                n = self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = 0
            if n == 0:
                self.close()
                return
            try:
                self.proto.buffer_updated(n)
            except Exception:
                log.exception("malformed frame on an engine connection; closing it")
                self.close()

    def _on_frame(self, meta: dict[str, Any], data: bytearray) -> None:
        op = meta.get("op")
        if op == "infer":
            self._infer(meta, data)
        elif op == "hello":
            if meta.get("arena"):
                self.arena = ipc.Arena(meta["arena"], int(meta["arena_size"]), create=False)
                # the GPU runner reads (or joins) this front end's requests where they are
                self.region = self.engine.share_memory(
                    self.arena.path, self.arena.address, self.arena.size
                )
        elif op == "stats":
            stats = {**self.engine.stats(), "torch_threads": torch.get_num_threads()}
            self.send({"id": meta["id"], "stats": _jsonable(stats)})
        else:
            log.error("unknown message %r on an engine connection", op)

    def _infer(self, meta: dict[str, Any], data: bytearray) -> None:
        call = meta["id"]
        try:
            if "shm" in meta:
                if self.arena is None:
                    raise InvalidArgument("arena data on a connection without an arena")
                batch = batch_from_frame(self.config, meta, self.arena.view(meta["shm"]))
            else:
                batch = batch_from_frame(self.config, meta, data)
            future = self.engine.admit(batch)
        except Exception as e:
            self.send(error_meta(call, e))
            return
        start = time.perf_counter()
        future.add_done_callback(lambda f: self._reply(call, f, start))

    def _reply(self, call: int, future: Future[torch.Tensor], start: float) -> None:
        error = future.exception() if not future.cancelled() else EngineClosed("cancelled")
        if error is not None:
            self.send(error_meta(call, error))
            return
        scores = future.result().numpy()
        meta = {"id": call, "queue_s": 0.0, "compute_s": time.perf_counter() - start}
        self.send({**meta, "shape": list(scores.shape)}, (scores,))

    def send(self, meta: dict[str, Any], arrays: tuple[Any, ...] = ()) -> None:
        if self.closed:
            return
        try:
            _send_nonblocking(self.sock, b"".join(ipc.frame(meta, arrays)), SEND_TIMEOUT_S)
        except OSError as e:  # gone, or not reading for SEND_TIMEOUT_S
            log.warning("dropping an engine connection: %s", e)
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.engine.remove_reader(self.sock.fileno())
        self.listener.links.discard(self)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.engine.unshare_memory(self.region)
        if self.arena is not None:
            self.arena.close()


def _send_nonblocking(sock: socket.socket, data: bytes, timeout_s: float) -> None:
    """All of ``data`` on a non-blocking socket, waiting for room at most ``timeout_s``."""
    view = memoryview(data)
    deadline = time.monotonic() + timeout_s
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [sock], [], left)[1]:
                raise TimeoutError(f"the reader took no data for {timeout_s:.0f} s") from None


def _jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in stats.items():
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value
        elif isinstance(value, dict):
            out[key] = _jsonable(value)
    return out


def _host_main(spec: HostSpec, conn: Connection) -> None:
    """Entry point of the engine process (``multiprocessing`` spawn)."""
    set_process_name("recserve-engine")
    from recserve.engine.engine import RecEngine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the server decides
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(spec.torch_threads)
    try:
        engine = RecEngine(load_shared_model(spec.model_path), spec.config)
        listener = _Listener(engine, spec.address)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", {"pid": os.getpid()}))
    drain = False
    with contextlib.suppress(EOFError, OSError):  # end of file: the server is gone
        drain = bool(conn.recv())  # the server's word to stop
    engine.close(drain=drain)
    listener.close()
    with contextlib.suppress(OSError):
        conn.send(("stopped", None))


# ----------------------------------------------------------------------- the server's side


class EngineHost:
    """:class:`~recserve.engine.RecEngine` in a child process (the
    :class:`~recserve.engine.interface.InferenceEngine` protocol, from any thread).

    ``address`` is the unix socket front ends connect to. ``model`` is on the CPU; it is
    written once to shared memory, mapped by the child, and the file is removed."""

    coalesces = True
    """The engine joins queued requests itself: hand it requests one by one."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: EngineConfig,
        start_timeout_s: float = 900.0,
        torch_threads: int = 1,
    ) -> None:
        self.config = model.config  # type: ignore[assignment]
        self.engine_config = config
        self._dir = tempfile.mkdtemp(prefix="recserve-engine-")
        self.address = os.path.join(self._dir, "engine.sock")
        path = save_shared_model(model, pick_shared_dir(model_nbytes(model), config.shared_dir))
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_host_main,
            args=(HostSpec(str(path), config, self.address, max(1, torch_threads)), child),
            name=f"recserve-engine-{self.config.name}",
            daemon=False,  # it starts processes of its own; it exits when this one is gone
        )
        try:
            self._proc.start()
            child.close()
            payload = wait_for_child(self._conn, self._proc, start_timeout_s, "the engine process")
            self.pid = int(payload["pid"])
            self._link = _ServerLink(self.address, self.config.name)
        except BaseException:
            self._kill()
            raise
        finally:
            unlink_shared_model(path)
        self._closed = False
        self._stats: dict[str, Any] = {}
        self._stats_at = 0.0
        # Not a daemon, so multiprocessing joins it at exit: close the pipe first (the child
        # stops on end of file) or that join would wait forever.
        atexit.register(self._abandon)

    def _abandon(self) -> None:
        if not self._closed:
            self._closed = True
            self._conn.close()

    def submit(self, batch: Batch) -> Future[torch.Tensor]:
        if self._closed:
            raise EngineClosed("the engine is shutting down and takes no new requests")
        b = batch.batch_size
        if not 0 < b <= self.engine_config.max_query_items:
            raise ValueError(
                f"request of {b} items: must be 1 to {self.engine_config.max_query_items}"
            )
        return self._link.infer(batch)

    def stats(self) -> dict[str, Any]:
        """The engine's counters and gauges (at most 0.5 s old)."""
        now = time.monotonic()
        if now - self._stats_at > 0.5 and not self._closed:
            with contextlib.suppress(Exception):
                self._stats = self._link.stats(timeout_s=2.0)
                self._stats_at = now
        return dict(self._stats)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(drain)
            if self._conn.poll(timeout if timeout is not None else 600.0):
                self._conn.recv()
        self._link.close()
        self._kill()
        atexit.unregister(self._abandon)

    def _kill(self) -> None:
        self._proc.join(5.0)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5.0)
        self._conn.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EngineHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ServerLink:
    """The server process's own connection to an engine process: any thread sends, one
    thread reads the answers and resolves their futures."""

    def __init__(self, address: str, name: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(address)
        self._lock = threading.Lock()
        """Guards the calls; held briefly (the reader takes it for every answer)."""
        self._send_lock = threading.Lock()
        """One frame at a time on the socket. Not ``_lock``: a send that waits for room while
        the engine waits for room to answer must not keep the reader from reading."""
        self._ids = itertools.count()
        self._calls: dict[int, Future[Any]] = {}
        self._gone: BaseException | None = None
        self._proto = ipc.FrameProtocol(self._on_frame)
        self._reader = threading.Thread(
            target=self._read, name=f"recserve-engine-link-{name}", daemon=True
        )
        self._reader.start()

    def infer(self, batch: Batch) -> Future[torch.Tensor]:
        future: Future[torch.Tensor] = Future()
        call = self._call(future)
        future.set_running_or_notify_cancel()
        self._send(call, {**infer_meta(batch), "id": call}, batch_arrays(batch))
        return future

    def stats(self, timeout_s: float) -> dict[str, Any]:
        future: Future[dict[str, Any]] = Future()
        call = self._call(future)
        self._send(call, {"op": "stats", "id": call})
        return future.result(timeout_s)

    def _call(self, future: Future[Any]) -> int:
        with self._lock:
            if self._gone is not None:
                raise EngineClosed(f"the engine process is gone ({self._gone})")
            call = next(self._ids)
            self._calls[call] = future
        return call

    def _send(self, call: int, meta: dict[str, Any], arrays: tuple[Any, ...] = ()) -> None:
        try:
            with self._send_lock:
                send_frame(self.sock, meta, arrays)
        except OSError as e:
            with self._lock:
                self._calls.pop(call, None)
            raise EngineClosed(f"the engine process is gone ({e})") from None

    def _read(self) -> None:
        error: BaseException = EngineClosed("the engine process closed its connection")
        try:
            while True:
                buf = self._proto.get_buffer(-1)
                n = self.sock.recv_into(buf)
                if n == 0:
                    break
                self._proto.buffer_updated(n)
        except OSError as e:
            error = EngineClosed(f"the engine process is gone ({e})")
        except Exception as e:  # a malformed frame: nothing more on this link can be trusted
            log.exception("engine connection failed")
            error = e
        with self._lock:
            self._gone = error
            calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(error)

    def _on_frame(self, meta: dict[str, Any], data: bytearray) -> None:
        with self._lock:
            future = self._calls.pop(meta.get("id", -1), None)
        if future is None:
            return
        if "error" in meta:
            future.set_exception(error_from_frame(meta))
        elif "stats" in meta:
            future.set_result(meta["stats"])
        else:
            shape = [int(n) for n in meta["shape"]]
            scores = ipc.array(data, meta["arrays"][0], "<f4", int(np.prod(shape)))
            future.set_result(torch.from_numpy(scores.reshape(shape)))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5.0)
