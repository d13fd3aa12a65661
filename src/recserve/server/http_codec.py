"""KServe v2 HTTP/REST inference bodies: JSON, and the binary tensor data extension.

With the binary extension a body is a JSON header of ``Inference-Header-Content-Length``
bytes followed by the raw tensors, back to back in the order of the inputs that declare
``"parameters": {"binary_data_size": n}``; the response is built the same way for outputs
asked for with ``"binary_data": true`` (or all outputs with the request parameter
``"binary_data_output": true``, as ``tritonclient`` sends by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from recserve.server.errors import InvalidArgument
from recserve.server.protocol import (
    ModelSignature,
    Staging,
    WireTensor,
    tensor_from_bytes,
    tensor_from_list,
)
from recserve.types import Batch

if TYPE_CHECKING:
    from recserve.server.shm import SystemSharedMemory

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class InferRequest:
    """A decoded inference request: the batch, and how the caller wants its outputs."""

    batch: Batch
    request_id: str | None = None
    outputs: list[tuple[str, bool]] = field(default_factory=list)
    """Requested outputs as ``(name, binary)``."""
    shm_outputs: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    """Outputs to write into a registered shared memory region: ``name -> (region, offset,
    byte_size)``."""


def parse_header_length(value: str | None, body_size: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidArgument(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None
    if not 0 <= length <= body_size:
        raise InvalidArgument(f"{HEADER_LENGTH} is {length}, outside the body of {body_size} bytes")
    return length


def decode_infer_request(
    body: bytes | bytearray,
    header_length: int | None,
    signature: ModelSignature,
    out: Staging | None = None,
    shm: SystemSharedMemory | None = None,
) -> InferRequest:
    """Decode and validate an HTTP infer body into a :class:`InferRequest` (the common layout's
    arrays written where ``out`` says, when given; inputs in registered shared memory regions
    read from ``shm``)."""
    size = len(body) if header_length is None else header_length
    request = load_json_object(memoryview(body)[:size])
    binary = memoryview(body)[size:]
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("request must have a non-empty 'inputs' list")
    batch = _fast_batch(inputs, binary, signature, out, shm)
    if batch is None:
        batch = _general_batch(inputs, binary, signature, shm)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidArgument("'id' must be a string")
    outputs, shm_outputs = _requested_outputs(request, signature, shm is not None)
    return InferRequest(batch, request_id, outputs, shm_outputs)


def shm_source(params: dict[str, Any], name: Any) -> tuple[str, int, int] | None:
    """``(region, offset, byte_size)`` when a tensor's parameters place it in a shared memory
    region, else None."""
    region = params.get("shared_memory_region")
    if region is None:
        return None
    size, offset = params.get("shared_memory_byte_size"), params.get("shared_memory_offset", 0)
    for key, value in (("shared_memory_byte_size", size), ("shared_memory_offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgument(f"tensor {name!r}: {key} must be an integer >= 0")
    if not isinstance(region, str) or not region:
        raise InvalidArgument(f"tensor {name!r}: shared_memory_region must be a name")
    return region, offset, size


def _fast_batch(
    inputs: list[Any],
    binary: memoryview,
    signature: ModelSignature,
    out: Staging | None,
    shm: SystemSharedMemory | None,
) -> Batch | None:
    """The common case, every input binary or in shared memory: its batch, or None for the
    general path."""
    names, datatypes, shapes, buffers = [], [], [], []
    pos = 0
    for item in inputs:
        if type(item) is not dict or "data" in item:
            return None
        params = item.get("parameters")
        shape = item.get("shape")
        if type(params) is dict and "shared_memory_region" in params and type(shape) is list:
            source = shm_source(params, item.get("name"))
            if shm is None or source is None:
                return None
            region, offset, size = source
            buffers.append(shm.view(region, offset, size, str(item.get("name"))))
        else:
            nbytes = params.get("binary_data_size") if type(params) is dict else None
            if type(nbytes) is not int or nbytes < 0 or type(shape) is not list:
                return None
            buffers.append(binary[pos : pos + nbytes])
            pos += nbytes
        names.append(item.get("name"))
        datatypes.append(item.get("datatype"))
        shapes.append(shape)
    if pos != len(binary):
        return None
    return signature.fast_batch(names, datatypes, shapes, buffers, out)


def _general_batch(
    inputs: list[Any],
    binary: memoryview,
    signature: ModelSignature,
    shm: SystemSharedMemory | None = None,
) -> Batch:
    """Any form the protocol allows, tensor by tensor, each problem named."""
    tensors: dict[str, WireTensor] = {}
    pos = 0
    for item in inputs:
        if not isinstance(item, dict):
            raise InvalidArgument("each entry of 'inputs' must be an object")
        name, params = item.get("name"), _parameters(item, "input")
        shape = item.get("shape")
        if not isinstance(shape, list):
            raise InvalidArgument(f"input {name!r}: 'shape' must be a list of integers")
        dims = signature.check_input(name, item.get("datatype"), shape)
        assert isinstance(name, str)
        if name in tensors:
            raise InvalidArgument(f"input {name!r} is given twice")
        nbytes = params.get("binary_data_size")
        source = shm_source(params, name)
        if source is not None:
            if shm is None:
                raise InvalidArgument(f"input {name!r}: this endpoint takes no shared memory")
            if nbytes is not None or "data" in item:
                raise InvalidArgument(f"input {name!r}: has data as well as shared memory")
            data = shm.view(source[0], source[1], source[2], name)
            tensors[name] = tensor_from_bytes(name, item["datatype"], dims, data)
        elif nbytes is not None:
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
                raise InvalidArgument(f"input {name!r}: binary_data_size must be an integer >= 0")
            if "data" in item:
                raise InvalidArgument(f"input {name!r}: has both 'data' and binary_data_size")
            if pos + nbytes > len(binary):
                raise InvalidArgument(
                    f"input {name!r}: binary data is truncated: needs {nbytes} bytes, "
                    f"{len(binary) - pos} remain in the body"
                )
            tensors[name] = tensor_from_bytes(
                name, item["datatype"], dims, binary[pos : pos + nbytes]
            )
            pos += nbytes
        elif "data" in item:
            tensors[name] = tensor_from_list(name, item["datatype"], dims, item["data"])
        else:
            raise InvalidArgument(
                f"input {name!r}: no data (give 'data' or parameters.binary_data_size)"
            )
    if pos != len(binary):
        raise InvalidArgument(
            f"{len(binary) - pos} bytes of binary data follow the last binary input"
        )
    return signature.to_batch(tensors)


def encode_infer_response(
    model_name: str,
    version: str,
    request: InferRequest,
    scores: np.ndarray,
    shm: SystemSharedMemory | None = None,
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, its JSON header length (outputs
    asked for in shared memory are written there through ``shm``)."""
    outputs, blobs = [], []
    for name, binary in request.outputs:
        meta: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(scores.shape)}
        target = request.shm_outputs.get(name)
        if target is not None:
            assert shm is not None
            raw = scores.tobytes()
            shm.write(target[0], target[1], raw, target[2], name)
            meta["parameters"] = {
                "shared_memory_region": target[0],
                "shared_memory_byte_size": len(raw),
            }
            if target[1]:
                meta["parameters"]["shared_memory_offset"] = target[1]
        elif binary:
            raw = scores.tobytes()
            meta["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            meta["data"] = scores.reshape(-1).tolist()
        outputs.append(meta)
    response: dict[str, Any] = {
        "model_name": model_name,
        "model_version": version,
        "outputs": outputs,
    }
    if request.request_id is not None:
        response["id"] = request.request_id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def load_json_object(data: bytes | memoryview, what: str = "request") -> dict[str, Any]:
    """Parse a JSON object, answering any failure with :class:`InvalidArgument`."""
    try:
        value = json.loads(bytes(data))
    except (ValueError, RecursionError) as e:
        raise InvalidArgument(f"{what} body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} body must be a JSON object")
    return value


def _parameters(item: dict[str, Any], what: str) -> dict[str, Any]:
    params = item.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument(f"{what} {item.get('name')!r}: 'parameters' must be an object")
    return params


def _requested_outputs(
    request: dict[str, Any], signature: ModelSignature, shm: bool
) -> tuple[list[tuple[str, bool]], dict[str, tuple[str, int, int]]]:
    params = request.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be an object")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidArgument("parameter 'binary_data_output' must be a boolean")
    requested = request.get("outputs")
    if requested is None:
        return [(name, default_binary) for name in signature.output_names()], {}
    if not isinstance(requested, list):
        raise InvalidArgument("'outputs' must be a list")
    outputs, in_shm = [], {}
    for item in requested:
        if not isinstance(item, dict):
            raise InvalidArgument("each entry of 'outputs' must be an object")
        name = item.get("name")
        if name not in signature.output_names():
            raise InvalidArgument(
                f"unknown output {name!r}; the model's outputs are {list(signature.output_names())}"
            )
        params = _parameters(item, "output")
        binary = params.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise InvalidArgument(f"output {name!r}: 'binary_data' must be a boolean")
        source = shm_source(params, name)
        if source is not None:
            if not shm:
                raise InvalidArgument(f"output {name!r}: this endpoint takes no shared memory")
            in_shm[name] = source
        outputs.append((name, binary))
    return outputs, in_shm
