"""KServe v2 over HTTP/REST (aiohttp): health, metadata, config, infer, repository, metrics.

Routes (``/versions/{version}`` may follow ``/v2/models/{name}`` everywhere):

=======  ======================================  ==========================================
GET      ``/v2/health/live``, ``/v2/health/ready``  200, or 503 when not ready
GET      ``/v2``                                 server metadata
GET      ``/v2/models/{name}``                   model metadata (inputs and outputs)
GET      ``/v2/models/{name}/ready``             200 when ready, else 404 / 503
GET      ``/v2/models/{name}/config``            Triton-style model configuration
POST     ``/v2/models/{name}/infer``             inference (JSON or binary tensor data)
POST     ``/v2/repository/index``                models in the repository and their state
POST     ``/v2/repository/models/{name}/load``   load or reload; ``.../unload`` to unload
GET      ``/v2/systemsharedmemory/status``       registered regions (``/region/{name}/status``)
POST     ``/v2/systemsharedmemory/region/{name}/register``  ``{"key", "offset", "byte_size"}``
POST     ``/v2/systemsharedmemory/region/{name}/unregister``  (``/unregister``: all of them)
GET      ``/metrics``                            Prometheus text format
=======  ======================================  ==========================================

Every error is ``{"error": "<message>"}`` with a 4xx status (5xx only for a failing model).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from yarl import URL

from recserve.server.core import ServerCore
from recserve.server.errors import InvalidArgument, PayloadTooLarge, ServerError, internal
from recserve.server.http_codec import (
    HEADER_LENGTH,
    decode_infer_request,
    encode_infer_response,
    load_json_object,
    parse_header_length,
)
from recserve.server.metrics import CONTENT_TYPE
from recserve.server.repository import VERSION, ServedModel

if TYPE_CHECKING:
    from recserve.server.frontend_process import FrontendCore

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(core: ServerCore | FrontendCore, proxy: str | None = None) -> web.Application:
    """The HTTP app; with ``proxy`` (a front-end process), infer is answered here and every
    other route is passed to the server process's own HTTP endpoint at that ``host:port``."""
    app = web.Application(
        client_max_size=core.settings.max_body_bytes, middlewares=[_errors_as_json]
    )
    h = _Handlers(core)
    router = app.router
    if proxy is not None:
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            router.add_post(prefix + "/infer", h.infer)
        forward = _Proxy(proxy)
        app.on_cleanup.append(forward.close)
        router.add_route("*", "/{tail:.*}", forward)
        return app
    router.add_get("/v2/health/live", h.live)
    router.add_get("/v2/health/ready", h.ready)
    router.add_get("/v2", h.server_metadata)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        router.add_get(prefix, h.model_metadata)
        router.add_get(prefix + "/ready", h.model_ready)
        router.add_get(prefix + "/config", h.model_config)
        router.add_post(prefix + "/infer", h.infer)
    router.add_post("/v2/repository/index", h.repository_index)
    router.add_post("/v2/repository/models/{name}/load", h.load)
    router.add_post("/v2/repository/models/{name}/unload", h.unload)
    shm = "/v2/systemsharedmemory"
    router.add_get(shm + "/status", h.shm_status)
    router.add_get(shm + "/region/{name}/status", h.shm_status)
    router.add_post(shm + "/region/{name}/register", h.shm_register)
    router.add_post(shm + "/region/{name}/unregister", h.shm_unregister)
    router.add_post(shm + "/unregister", h.shm_unregister)
    router.add_route("*", "/v2/cudasharedmemory/{tail:.*}", h.cuda_shm)
    router.add_get("/metrics", h.metrics)
    return app


def error_response(status: int, message: str) -> web.Response:
    """``{"error": message}``; overload and shutdown answers say when to retry."""
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServerError as e:
        return error_response(e.http_status, str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, e.text or e.reason)
    except Exception as e:
        log.exception("request %s %s failed", request.method, request.path)
        return error_response(500, str(internal(e)))


class _Handlers:
    def __init__(self, core: ServerCore | FrontendCore) -> None:
        self.core: Any = core

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.core.ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self.core.server_metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self._model(request).metadata())

    async def model_ready(self, request: web.Request) -> web.Response:
        self._model(request)
        return web.Response(status=200)

    async def model_config(self, request: web.Request) -> web.Response:
        return web.json_response(self._model(request).model_config())

    async def repository_index(self, request: web.Request) -> web.Response:
        return web.json_response(self.core.repository.index())

    async def load(self, request: web.Request) -> web.Response:
        self.core.check_model_control()
        await self.core.repository.load(request.match_info["name"])
        return web.json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        self.core.check_model_control()
        await self.core.repository.unload(request.match_info["name"])
        return web.json_response({})

    async def shm_status(self, request: web.Request) -> web.Response:
        regions = self.core.shared_memory.status(request.match_info.get("name"))
        return web.json_response([asdict(r) for r in regions])

    async def shm_register(self, request: web.Request) -> web.Response:
        body = load_json_object(await _read_body(request, self.core.settings.max_body_bytes))
        self.core.shared_memory.register(
            request.match_info["name"],
            body.get("key"),
            body.get("offset", 0),
            body.get("byte_size"),
        )
        return web.json_response({})

    async def shm_unregister(self, request: web.Request) -> web.Response:
        self.core.shared_memory.unregister(request.match_info.get("name"))
        return web.json_response({})

    async def cuda_shm(self, request: web.Request) -> web.Response:
        raise InvalidArgument("CUDA shared memory is not supported; use system shared memory")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.core.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def infer(self, request: web.Request) -> web.Response:
        """KServe v2 infer; ``core`` is the server's :class:`ServerCore`, or a front-end
        process's :class:`~recserve.server.frontend_process.FrontendCore`."""
        start = time.perf_counter()
        core = self.core
        info = request.match_info
        try:
            served = await core.model(info["name"], info.get("version", ""))
        except ServerError as e:
            core.metrics.for_request("", "http").failure(e.reason)
            raise
        metrics = core.metrics.for_request(served.name, "http")
        staging = core.staging()
        try:
            body = await _read_body(request, core.settings.max_body_bytes)
            header_length = parse_header_length(request.headers.get(HEADER_LENGTH), len(body))
            shm = core.shared_memory
            decoded = await core.decode(
                len(body),
                decode_infer_request,
                body,
                header_length,
                served.signature,
                staging,
                shm,
            )
            result = await core.infer(served, decoded.batch, staging)
            payload, json_size = encode_infer_response(
                served.name, VERSION, decoded, result.scores.numpy(), shm
            )
        except ServerError as e:
            metrics.failure(e.reason)
            raise
        except web.HTTPRequestEntityTooLarge:
            metrics.failure(PayloadTooLarge.reason)
            raise
        except Exception:
            metrics.failure(ServerError.reason)
            raise
        finally:
            if staging is not None:
                staging.release()
        metrics.success(
            decoded.batch.batch_size, result.queue_s, result.compute_s, time.perf_counter() - start
        )
        if json_size is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(
            body=payload,
            headers={HEADER_LENGTH: str(json_size), "Content-Type": "application/octet-stream"},
        )

    def _model(self, request: web.Request) -> ServedModel:
        info = request.match_info
        return self.core.repository.get(info["name"], info.get("version", ""))


_HOP_HEADERS = frozenset(
    ("host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade")
)


class _Proxy:
    """Passes a request to the server process's HTTP endpoint as it came, and its answer back
    (front-end processes: everything but infer; bodies and encodings untouched)."""

    def __init__(self, target: str) -> None:
        self.base = f"http://{target}"
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, request: web.Request) -> web.Response:
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        url = URL(self.base + request.raw_path, encoded=True)  # as sent: no normalising of '..'
        async with self._session.request(request.method, url, headers=headers, data=body) as answer:
            data = await answer.read()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
            return web.Response(status=answer.status, body=data, headers=out)

    async def close(self, app: web.Application | None = None) -> None:
        if self._session is not None:
            await self._session.close()


async def _read_body(request: web.Request, limit: int) -> bytes | bytearray:
    """The body, with ``Content-Encoding: gzip|deflate`` undone (as tritonclient compresses).

    The runner turns aiohttp's own decompression off (``auto_decompress=False``): this one is
    bounded by ``limit`` after decompression, and answers a broken stream at once."""
    try:
        body = await _read_raw(request, limit)
    except RequestPayloadError as e:
        raise InvalidArgument(f"cannot read the request body: {e}") from None
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    wbits = {"gzip": 31, "deflate": 15}.get(encoding)
    if wbits is None:
        raise InvalidArgument(f"unsupported Content-Encoding {encoding!r} (gzip, deflate)")
    decompressor = zlib.decompressobj(wbits)
    try:
        out = decompressor.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidArgument(f"cannot read the request body: not valid {encoding}: {e}") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"decompressed body is over the limit of {limit} bytes")
    if not decompressor.eof:
        raise InvalidArgument(f"cannot read the request body: {encoding} stream is truncated")
    return out


async def _read_raw(request: web.Request, limit: int) -> bytes | bytearray:
    """The body as sent; with a Content-Length, read straight into one buffer of that size
    (aiohttp's ``read()`` grows a bytearray and copies it once more into bytes)."""
    size = request.content_length
    if size is None:
        return await request.read()
    if size > limit:
        raise PayloadTooLarge(f"request body of {size} bytes is over the limit of {limit}")
    body = bytearray(size)
    view = memoryview(body)
    stream = request.content
    set_chunk = getattr(stream, "set_read_chunk_size", None)
    if set_chunk is not None:
        set_chunk(max(size, 1 << 16))  # fewer pause/resume cycles for large bodies
    pos = 0
    while pos < size:
        chunk = await stream.readany()
        if not chunk:
            break
        view[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    if pos != size:
        raise InvalidArgument(f"request body ended after {pos} of {size} bytes")
    return body
