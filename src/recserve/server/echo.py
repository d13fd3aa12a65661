"""A bare echo server on the front ends' protocol stacks: the latency floor of a server.

It runs aiohttp and ``grpc.aio`` on one asyncio event loop (the default one, no busy polling),
in a process of its own, as a front end does, and does nothing with a request but read it and
answer a fixed reply of the size of a 256-item answer. ``recserve bench server`` times the
same requests against it, encoded by the same clients: the round trip that no server built on
these stacks could beat, to set against the measured overhead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
from aiohttp import web

from recserve.procname import set_process_name
from recserve.server.client import grpc_channel

SERVICE, METHOD = "recserve.Echo", "Call"
PATH = f"/{SERVICE}/{METHOD}"
REPLY_BYTES = 1024
"""The answer to a 256-item query: 256 fp32 scores."""


def _serve(conn: Any, max_bytes: int) -> None:
    set_process_name("recserve-echo")
    reply = bytes(REPLY_BYTES)
    header = json.dumps({"outputs": [{"name": "echo", "shape": [REPLY_BYTES // 4]}]}).encode()

    async def main() -> None:
        async def echo(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=header + reply)

        app = web.Application(client_max_size=max_bytes)
        app.router.add_post("/echo", echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        http_port = runner.addresses[0][1]

        async def call(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return reply

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
            ]
        )
        handler = grpc.unary_unary_rpc_method_handler(call)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
        )
        grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send((http_port, grpc_port))
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # told to stop
        await server.stop(0)
        await runner.cleanup()

    asyncio.run(main())


class EchoServer:
    """The echo server in a child process (a context manager): ``http_url`` and ``grpc_url``."""

    def __init__(self, max_bytes: int = 256 << 20, start_timeout_s: float = 60.0) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, max_bytes), daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(start_timeout_s):
            self.close()
            raise RuntimeError("the echo server did not start")
        http_port, grpc_port = self._conn.recv()
        self.http_url = f"127.0.0.1:{http_port}"
        self.grpc_url = f"127.0.0.1:{grpc_port}"

    @property
    def pid(self) -> int:
        """The server process's id (for reading its CPU time)."""
        return self._proc.pid or 0

    def close(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send("stop")
            self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def grpc_echo_call(url: str, max_bytes: int = 256 << 20) -> tuple[Callable[[bytes], bytes], Any]:
    """A call of the gRPC echo over a connection of its own, and the channel (to close)."""
    channel = grpc_channel(url, max_bytes)
    return channel.unary_unary(PATH), channel
