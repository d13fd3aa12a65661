"""Small KServe v2 clients that send a :class:`~recserve.types.Batch` as binary tensors.

They speak the same protocol as ``tritonclient`` (which works against the server unchanged) with
less per-call work: one keep-alive ``http.client`` connection, or one gRPC channel, per client,
and no per-element Python. One client per thread; the benchmark and network load generation
use them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from recserve.config import ModelConfig
from recserve.server.grpc_wire import join_infer_request
from recserve.server.http_codec import HEADER_LENGTH
from recserve.server.protocol import DENSE, OFFSETS, OUTPUT, VALUES
from recserve.types import Batch


class InferError(RuntimeError):
    """The server answered an error; ``status`` is the HTTP status or gRPC code name."""

    def __init__(self, status: int | str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def batch_tensors(
    batch: Batch, config: ModelConfig
) -> Iterator[tuple[str, str, list[int], memoryview]]:
    """``(name, datatype, shape, little-endian bytes)`` of every input tensor of ``batch``.

    Values are views of the batch's own ids (no copy); the offsets of all features are rebased
    to start at 0 with one numpy subtraction (host tensors; device ones are copied once)."""
    if config.num_dense:
        dense = batch.dense.detach().cpu().contiguous()
        yield DENSE, "FP32", list(dense.shape), dense.numpy().reshape(-1).view(np.uint8).data
    sparse = batch.sparse
    if sparse.keys != config.feature_keys:
        sparse = sparse.select(config.feature_keys)
    values = sparse.values.detach().cpu().contiguous().numpy()
    offsets = sparse.offsets.detach().cpu().contiguous().numpy()
    b, f = sparse.batch_size, len(config.feature_keys)
    if b:
        starts, ends = offsets[:-1:b][:f], offsets[b::b][:f]
    else:
        starts = ends = np.full(f, offsets[0], dtype=offsets.dtype)
    # every feature's offsets rebased to 0 with one subtraction for all of them
    rebased = np.empty((f, b + 1), dtype=offsets.dtype)
    rebased[:, :b] = offsets[:-1].reshape(f, b) - starts[:, None]
    rebased[:, b] = ends - starts
    ids = values.view(np.uint8)
    size = values.itemsize
    for k, key in enumerate(config.feature_keys):
        lo, hi = int(starts[k]), int(ends[k])
        yield f"{key}.{VALUES}", "INT64", [hi - lo], ids[lo * size : hi * size].data
        yield f"{key}.{OFFSETS}", "INT64", [b + 1], rebased[k].view(np.uint8).data


class _ClientRegion:
    """A client's POSIX shared-memory region for its inputs (system shared memory)."""

    def __init__(self, nbytes: int) -> None:
        self.shm = SharedMemory(f"recserve_{os.getpid()}_{id(self):x}", create=True, size=nbytes)
        self.name = self.shm.name
        self.key = "/" + self.shm.name
        self.nbytes = nbytes

    def place(self, batch: Batch, config: ModelConfig) -> list[tuple[str, str, list[int], dict]]:
        """Write ``batch``'s tensors into the region: ``(name, datatype, shape, parameters)``
        of each input, the parameters naming where it is."""
        buf = np.frombuffer(self.shm.buf, np.uint8)
        out, pos = [], 0
        try:
            for name, datatype, shape, data in batch_tensors(batch, config):
                n = data.nbytes
                if pos + n > buf.size:
                    raise ValueError(f"the query needs more than {buf.size} bytes of shared memory")
                buf[pos : pos + n] = np.frombuffer(data, np.uint8)
                params: dict[str, Any] = {
                    "shared_memory_region": self.name,
                    "shared_memory_byte_size": n,
                }
                if pos:
                    params["shared_memory_offset"] = pos
                out.append((name, datatype, shape, params))
                pos += n + (-n % 64)
        finally:
            del buf
        return out

    def remove(self) -> None:
        self.shm.close()
        with contextlib.suppress(FileNotFoundError):
            self.shm.unlink()


def _request_header(inputs: list[dict[str, Any]]) -> bytes:
    request = {"inputs": inputs, "outputs": [{"name": OUTPUT, "parameters": {"binary_data": True}}]}
    return json.dumps(request).encode()


def http_infer_body(batch: Batch, config: ModelConfig) -> tuple[bytes, list[memoryview]]:
    """The JSON header and binary tensors of an HTTP infer request for ``batch``."""
    inputs, blobs = [], []
    for name, datatype, shape, data in batch_tensors(batch, config):
        params = {"binary_data_size": data.nbytes}
        inputs.append({"name": name, "datatype": datatype, "shape": shape, "parameters": params})
        blobs.append(data)
    return _request_header(inputs), blobs


def grpc_infer_bytes(model: str, batch: Batch, config: ModelConfig) -> bytes:
    """A serialized ``ModelInferRequest`` for ``batch``, its tensors as raw contents."""
    request = service_pb2.ModelInferRequest(model_name=model)
    raw = []
    for name, datatype, shape, data in batch_tensors(batch, config):
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        raw.append(data)
    return join_infer_request(request, raw)


class HTTPClient:
    """KServe v2 HTTP/REST with the binary tensor data extension.

    With ``shared_memory_bytes``, inputs go through a POSIX shared-memory region of that size
    instead (the system shared memory extension, for a client on the server's machine): the
    client makes and registers the region on its first call, writes each query's tensors into
    it, and sends only their names and places; :meth:`close` unregisters and removes it."""

    def __init__(self, url: str, timeout_s: float = 60.0, shared_memory_bytes: int = 0) -> None:
        host, _, port = url.rpartition(":")
        self._conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout_s)
        self._shm_bytes = shared_memory_bytes
        self._shm: _ClientRegion | None = None

    def infer(self, model: str, config: ModelConfig, batch: Batch) -> np.ndarray:
        if self._shm_bytes:
            return self._infer_shm(model, config, batch)
        header, blobs = http_infer_body(batch, config)
        return self._send_infer(model, header, blobs)

    def infer_encoded(self, model: str, body: tuple[bytes, list[Any]]) -> np.ndarray:
        """:meth:`infer` with the request already encoded (``http_infer_body``), as a load
        generator sends the same queries again and again without encoding them each time."""
        return self._send_infer(model, *body)

    def post(self, path: str, header: bytes, blobs: list[Any]) -> bytes:
        """POST a binary-extension body (``header`` JSON, then ``blobs``) to ``path`` as
        :meth:`infer` sends it; the answer's body."""
        status, _, body = self._post_binary(path, header, blobs)
        if status != 200:
            raise InferError(status, body[:200].decode(errors="replace"))
        return body

    def _post_binary(
        self, path: str, header: bytes, blobs: list[Any]
    ) -> tuple[int, dict[str, str], bytes]:
        size = len(header) + sum(memoryview(b).nbytes for b in blobs)
        return self._post(
            path,
            [header, *blobs],
            {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
                HEADER_LENGTH: str(len(header)),
            },
        )

    def _infer_shm(self, model: str, config: ModelConfig, batch: Batch) -> np.ndarray:
        placed = self._region().place(batch, config)
        inputs = [
            {"name": n, "datatype": d, "shape": sh, "parameters": p} for n, d, sh, p in placed
        ]
        return self._send_infer(model, _request_header(inputs), [])

    def _region(self) -> _ClientRegion:
        if self._shm is None:
            region = _ClientRegion(self._shm_bytes)
            body = json.dumps({"key": region.key, "byte_size": region.nbytes}).encode()
            status, _, answer = self._post(
                f"/v2/systemsharedmemory/region/{region.name}/register",
                [body],
                {"Content-Type": "application/json", "Content-Length": str(len(body))},
            )
            if status != 200:
                region.remove()
                raise InferError(status, json.loads(answer).get("error", ""))
            self._shm = region
        return self._shm

    def _send_infer(self, model: str, header: bytes, blobs: list[Any]) -> np.ndarray:
        status, headers, body = self._post_binary(f"/v2/models/{model}/infer", header, blobs)
        if status != 200:
            raise InferError(status, json.loads(body).get("error", ""))
        hlen = int(headers[HEADER_LENGTH])
        meta = json.loads(body[:hlen])["outputs"][0]
        return np.frombuffer(body, dtype="<f4", offset=hlen).reshape(meta["shape"])

    def get_json(self, path: str) -> tuple[int, Any]:
        self._conn.request("GET", path)
        response = self._conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else None

    def close(self) -> None:
        if self._shm is not None:
            region, self._shm = self._shm, None
            with contextlib.suppress(OSError, ConnectionError, http.client.HTTPException):
                path = f"/v2/systemsharedmemory/region/{region.name}/unregister"
                self._post(path, [], {"Content-Length": "0"})
            region.remove()
        self._conn.close()

    def _post(
        self, path: str, chunks: list[Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):
            try:
                conn = self._conn
                conn.putrequest("POST", path, skip_accept_encoding=True)
                for key, value in headers.items():
                    conn.putheader(key, value)
                conn.endheaders()
                assert conn.sock is not None
                send_buffers(conn.sock, chunks)
                response = conn.getresponse()
                return response.status, dict(response.getheaders()), response.read()
            except (ConnectionError, http.client.RemoteDisconnected):
                # A keep-alive connection the server closed while idle; retry once, fresh.
                self._conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")


def send_buffers(sock: socket.socket, buffers: list[Any]) -> None:
    """Send ``buffers`` in order with as few system calls as the kernel allows (``sendmsg``
    gathers them; no joined copy of the body). One ``sendall`` per tensor cost the client
    more than the copy it saved, and sent the server a small segment per tensor."""
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if v.nbytes]
    first = 0
    while first < len(views):
        sent = sock.sendmsg(views[first : first + 512])
        while first < len(views) and sent >= views[first].nbytes:
            sent -= views[first].nbytes
            first += 1
        if sent:
            views[first] = views[first][sent:]


def grpc_channel(url: str, max_message_bytes: int = 256 << 20) -> grpc.Channel:
    """A channel to ``url`` on a connection of its own (see :class:`GRPCClient`) that takes
    messages up to ``max_message_bytes`` both ways."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return grpc.insecure_channel(url, options=options)


class GRPCClient:
    """KServe v2 gRPC with ``raw_input_contents``, serialized with one copy of the tensors
    (:func:`~recserve.server.grpc_wire.join_infer_request`). ``shared_memory_bytes``: inputs
    through a system shared memory region instead, as for :class:`HTTPClient`.

    Each client has a connection of its own, as an :class:`HTTPClient` does. By default
    grpcio lets every channel of a process to the same address share one connection (its
    global subchannel pool), so a process's clients would all reach the same one of the
    server's front-end processes."""

    def __init__(
        self, url: str, max_message_bytes: int = 256 << 20, shared_memory_bytes: int = 0
    ) -> None:
        self._shm_bytes = shared_memory_bytes
        self._shm: _ClientRegion | None = None
        self._channel = grpc_channel(url, max_message_bytes)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._infer = self._channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )

    def infer(
        self, model: str, config: ModelConfig, batch: Batch, timeout_s: float = 60.0
    ) -> np.ndarray:
        try:
            if self._shm_bytes:
                request = service_pb2.ModelInferRequest(model_name=model)
                for name, datatype, shape, params in self._region().place(batch, config):
                    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
                    tensor.parameters["shared_memory_region"].string_param = params[
                        "shared_memory_region"
                    ]
                    for key in ("shared_memory_byte_size", "shared_memory_offset"):
                        if key in params:
                            tensor.parameters[key].int64_param = params[key]
                data = join_infer_request(request, [])
            else:
                data = grpc_infer_bytes(model, batch, config)
        except grpc.RpcError as e:
            raise InferError(e.code().name, e.details() or "") from None
        return self.infer_encoded(data, timeout_s)

    def infer_encoded(self, data: bytes, timeout_s: float = 60.0) -> np.ndarray:
        """:meth:`infer` with the request already serialized (``grpc_infer_bytes``), as a load
        generator sends the same queries again and again without encoding them each time."""
        try:
            response = self._infer(data, timeout=timeout_s)
        except grpc.RpcError as e:
            raise InferError(e.code().name, e.details() or "") from None
        shape = list(response.outputs[0].shape)
        return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(shape)

    def _region(self) -> _ClientRegion:
        if self._shm is None:
            region = _ClientRegion(self._shm_bytes)
            request = service_pb2.SystemSharedMemoryRegisterRequest(
                name=region.name, key=region.key, byte_size=region.nbytes
            )
            try:
                self._stub.SystemSharedMemoryRegister(request)
            except BaseException:
                region.remove()
                raise
            self._shm = region
        return self._shm

    def close(self) -> None:
        if self._shm is not None:
            region, self._shm = self._shm, None
            with contextlib.suppress(grpc.RpcError):
                request = service_pb2.SystemSharedMemoryUnregisterRequest(name=region.name)
                self._stub.SystemSharedMemoryUnregister(request, timeout=10)
            region.remove()
        self._channel.close()
