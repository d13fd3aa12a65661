"""KServe v2 over gRPC (``grpc.aio``), with the official protobuf definitions.

The messages come from ``tritonclient.grpc`` (Triton's ``grpc_service.proto`` and
``model_config.proto``, a superset of KServe's ``grpc_predict_v2.proto`` with the repository and
model-config RPCs), so ``tritonclient.grpc`` and any client generated from those protos work
unchanged. The handlers are registered by hand rather than through the generated
``add_GRPCInferenceServiceServicer_to_server`` for one reason: ``ModelInfer`` takes the request's
bytes and keeps its ``raw_input_contents`` as views (:mod:`recserve.server.grpc_wire`) instead
of letting protobuf copy megabytes of ids. RPCs not listed in :data:`RPCS` answer UNIMPLEMENTED.
Tensors travel as ``raw_input_contents`` / ``raw_output_contents`` (little-endian bytes, one entry
per tensor); typed ``contents`` (``int64_contents``, ``fp32_contents``) are accepted too.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2

from recserve.server.core import ServerCore
from recserve.server.errors import InvalidArgument, ServerError, internal
from recserve.server.grpc_wire import split_infer_request
from recserve.server.http_codec import shm_source
from recserve.server.protocol import (
    ModelSignature,
    Staging,
    WireTensor,
    tensor_from_bytes,
    tensor_from_list,
)
from recserve.server.repository import VERSION
from recserve.types import Batch

if TYPE_CHECKING:
    from recserve.server.frontend_process import FrontendCore
    from recserve.server.shm import SystemSharedMemory

Request = TypeVar("Request")
Response = TypeVar("Response")

log = logging.getLogger(__name__)

_CONTENTS = {"INT64": "int64_contents", "FP32": "fp32_contents"}


SERVICE = "inference.GRPCInferenceService"
RPCS = (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
    "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
)  # fmt: skip
"""RPCs with protobuf requests; ``ModelInfer`` comes on top, with its request as bytes."""


def _shm_params(params: Any, name: str) -> tuple[str, int, int] | None:
    """``(region, offset, byte_size)`` of a tensor placed in shared memory by its parameters
    (a protobuf ``map<string, InferParameter>``), else None."""
    if "shared_memory_region" not in params:
        return None
    values = {k: getattr(v, v.WhichOneof("parameter_choice") or "bool_param") for k, v in
              params.items()}  # fmt: skip
    return shm_source(values, name)


def decode_infer_request(
    request: service_pb2.ModelInferRequest,
    raw: Sequence[bytes | memoryview],
    signature: ModelSignature,
    out: Staging | None = None,
    shm: SystemSharedMemory | None = None,
    may_use_shared_memory: bool = True,
) -> tuple[Batch, list[str]]:
    """The batch of a ModelInferRequest (raw contents apart) and the outputs it asks for (the
    common layout's arrays written where ``out`` says, when given). Inputs placed in a
    registered shared memory region are read from ``shm``; ``raw_input_contents`` then holds
    one entry per other input, in order. ``may_use_shared_memory=False`` (from
    :func:`~recserve.server.grpc_wire.split_infer_request`) skips looking for them."""
    raw = list(raw or request.raw_input_contents)
    inputs = request.inputs
    sources = [_shm_params(t.parameters, t.name) for t in inputs] if may_use_shared_memory else []
    if any(sources):
        if shm is None:
            raise InvalidArgument("this endpoint takes no shared memory")
        if raw and len(raw) != sum(src is None for src in sources):
            raise InvalidArgument(
                f"raw_input_contents has {len(raw)} entries for "
                f"{sum(src is None for src in sources)} inputs not in shared memory"
            )
        it = iter(raw)
        if raw or all(sources):
            raw = [
                shm.view(*src, t.name) if src is not None else next(it)
                for t, src in zip(request.inputs, sources, strict=True)
            ]
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs "
            "(one per input, in order)"
        )
    outputs = [o.name for o in request.outputs] or list(signature.output_names())
    for name in outputs:
        if name not in signature.output_names():
            raise InvalidArgument(
                f"unknown output {name!r}; the model's outputs are {list(signature.output_names())}"
            )
    if raw:
        names, datatypes, shapes = [], [], []
        for t in inputs:  # one pass: each step makes a wrapper of the tensor's message
            names.append(t.name)
            datatypes.append(t.datatype)
            shapes.append(t.shape)
        batch = signature.fast_batch(names, datatypes, shapes, raw, out)
        if batch is not None:
            return batch, outputs
    tensors: dict[str, WireTensor] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        shape = signature.check_input(name, tensor.datatype, tuple(tensor.shape))
        if name in tensors:
            raise InvalidArgument(f"input {name!r} is given twice")
        if raw:
            tensors[name] = tensor_from_bytes(name, tensor.datatype, shape, raw[i])
        else:
            field = _CONTENTS[tensor.datatype]
            data = np.asarray(getattr(tensor.contents, field))
            tensors[name] = tensor_from_list(name, tensor.datatype, shape, data)
    return signature.to_batch(tensors), outputs


def _rpc(
    method: Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
    """Answer a :class:`ServerError` with its status code and message, and anything else
    (a failing model, a bug) with INTERNAL and what went wrong, as HTTP answers 500 (gRPC
    itself would say UNKNOWN)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except ServerError as e:
            await context.abort(grpc.StatusCode[e.grpc_code], str(e))
            raise AssertionError("unreachable") from e
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            log.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, str(internal(e)))
            raise AssertionError("unreachable") from e

    return wrapper


class KServeServicer:
    """The GRPCInferenceService RPCs recserve implements."""

    def __init__(self, core: ServerCore | FrontendCore) -> None:
        self.core: Any = core

    async def ServerLive(self, request: Any, context: Any) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=self.core.ready)

    async def ModelReady(self, request: Any, context: Any) -> service_pb2.ModelReadyResponse:
        try:
            self.core.repository.get(request.name, request.version)
        except ServerError:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    @_rpc
    async def ServerMetadata(
        self, request: Any, context: Any
    ) -> service_pb2.ServerMetadataResponse:
        return json_format.ParseDict(
            self.core.server_metadata(), service_pb2.ServerMetadataResponse()
        )

    @_rpc
    async def ModelMetadata(self, request: Any, context: Any) -> service_pb2.ModelMetadataResponse:
        served = self.core.repository.get(request.name, request.version)
        return json_format.ParseDict(served.metadata(), service_pb2.ModelMetadataResponse())

    @_rpc
    async def ModelConfig(self, request: Any, context: Any) -> service_pb2.ModelConfigResponse:
        served = self.core.repository.get(request.name, request.version)
        config = json_format.ParseDict(served.model_config(), model_config_pb2.ModelConfig())
        return service_pb2.ModelConfigResponse(config=config)

    @_rpc
    async def RepositoryIndex(
        self, request: Any, context: Any
    ) -> service_pb2.RepositoryIndexResponse:
        return json_format.ParseDict(
            {"models": self.core.repository.index()}, service_pb2.RepositoryIndexResponse()
        )

    @_rpc
    async def RepositoryModelLoad(
        self, request: Any, context: Any
    ) -> service_pb2.RepositoryModelLoadResponse:
        self.core.check_model_control()
        await self.core.repository.load(request.model_name)
        return service_pb2.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(
        self, request: Any, context: Any
    ) -> service_pb2.RepositoryModelUnloadResponse:
        self.core.check_model_control()
        await self.core.repository.unload(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()

    @_rpc
    async def SystemSharedMemoryStatus(
        self, request: Any, context: Any
    ) -> service_pb2.SystemSharedMemoryStatusResponse:
        response = service_pb2.SystemSharedMemoryStatusResponse()
        for r in self.core.shared_memory.status(request.name or None):
            response.regions[r.name].CopyFrom(
                service_pb2.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
                )
            )
        return response

    @_rpc
    async def SystemSharedMemoryRegister(
        self, request: Any, context: Any
    ) -> service_pb2.SystemSharedMemoryRegisterResponse:
        self.core.shared_memory.register(
            request.name, request.key, request.offset, request.byte_size
        )
        return service_pb2.SystemSharedMemoryRegisterResponse()

    @_rpc
    async def SystemSharedMemoryUnregister(
        self, request: Any, context: Any
    ) -> service_pb2.SystemSharedMemoryUnregisterResponse:
        self.core.shared_memory.unregister(request.name or None)
        return service_pb2.SystemSharedMemoryUnregisterResponse()

    @_rpc
    async def ModelInfer(self, data: bytes, context: Any) -> service_pb2.ModelInferResponse:
        start = time.perf_counter()
        core = self.core
        try:
            request, raw, may_use_shm = split_infer_request(data)
            served = await core.model(request.model_name, request.model_version)
        except ServerError as e:
            core.metrics.for_request("", "grpc").failure(e.reason)
            raise
        metrics = core.metrics.for_request(served.name, "grpc")
        staging = core.staging()
        try:
            shm = core.shared_memory
            targets = (
                {o.name: _shm_params(o.parameters, o.name) for o in request.outputs}
                if may_use_shm
                else {}
            )
            batch, outputs = await core.decode(
                len(data), decode_infer_request, request, raw, served.signature, staging, shm,
                may_use_shm,
            )  # fmt: skip
            result = await core.infer(served, batch, staging)
            scores = result.scores.numpy()
            response = service_pb2.ModelInferResponse(
                model_name=served.name, model_version=VERSION, id=request.id
            )
            for name in outputs:
                meta = response.outputs.add(name=name, datatype="FP32", shape=list(scores.shape))
                target = targets.get(name)
                if target is None:
                    response.raw_output_contents.append(scores.tobytes())
                    continue
                raw_scores = scores.tobytes()
                shm.write(target[0], target[1], raw_scores, target[2], name)
                meta.parameters["shared_memory_region"].string_param = target[0]
                meta.parameters["shared_memory_byte_size"].int64_param = len(raw_scores)
                if target[1]:
                    meta.parameters["shared_memory_offset"].int64_param = target[1]
        except ServerError as e:
            metrics.failure(e.reason)
            raise
        except Exception:
            metrics.failure(ServerError.reason)
            raise
        finally:
            if staging is not None:
                staging.release()
        metrics.success(
            batch.batch_size, result.queue_s, result.compute_s, time.perf_counter() - start
        )
        return response


def build_server(
    core: ServerCore | FrontendCore, forward: grpc.aio.Channel | None = None
) -> grpc.aio.Server:
    """The gRPC server; with ``forward`` (a front-end process), ModelInfer is answered here and
    every other RPC is passed, as bytes, to the server process over that channel. Front ends
    share their port (``SO_REUSEPORT``); the server process's own port is not shared."""
    limit = core.settings.max_body_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0 if forward is None else 1),
        ]
    )
    servicer = KServeServicer(core)
    if forward is not None:
        handlers = {name: _forwarder(forward, name) for name in RPCS}
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfer,
            request_deserializer=None,
            response_serializer=service_pb2.ModelInferResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        return server
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=getattr(service_pb2, f"{name}Request").FromString,
            response_serializer=getattr(service_pb2, f"{name}Response").SerializeToString,
        )
        for name in RPCS
    }
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=None,  # bytes: see grpc_wire
        response_serializer=service_pb2.ModelInferResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    return server


def _forwarder(channel: grpc.aio.Channel, name: str) -> grpc.RpcMethodHandler:
    call = channel.unary_unary(f"/{SERVICE}/{name}")  # bytes in, bytes out

    async def forward(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await call(data)
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "")
            raise AssertionError("unreachable") from e

    return grpc.unary_unary_rpc_method_handler(forward)
