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
from typing import Any

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

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class InferRequest:
    """A decoded inference request: the batch, and how the caller wants its outputs."""

    batch: Batch
    request_id: str | None = None
    outputs: list[tuple[str, bool]] = field(default_factory=list)
    """Requested outputs as ``(name, binary)``."""


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
) -> InferRequest:
    """Decode and validate an HTTP infer body into a :class:`InferRequest` (the common layout's
    arrays written where ``out`` says, when given)."""
    size = len(body) if header_length is None else header_length
    request = load_json_object(memoryview(body)[:size])
    binary = memoryview(body)[size:]
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("request must have a non-empty 'inputs' list")
    batch = _fast_batch(inputs, binary, signature, out)
    if batch is None:
        batch = _general_batch(inputs, binary, signature)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidArgument("'id' must be a string")
    outputs = _requested_outputs(request, signature)
    return InferRequest(batch, request_id, outputs)


def _fast_batch(
    inputs: list[Any], binary: memoryview, signature: ModelSignature, out: Staging | None
) -> Batch | None:
    """The common case, every input binary: its batch, or None for the general path."""
    names, datatypes, shapes, buffers = [], [], [], []
    pos = 0
    for item in inputs:
        if type(item) is not dict or "data" in item:
            return None
        params = item.get("parameters")
        nbytes = params.get("binary_data_size") if type(params) is dict else None
        shape = item.get("shape")
        if type(nbytes) is not int or nbytes < 0 or type(shape) is not list:
            return None
        names.append(item.get("name"))
        datatypes.append(item.get("datatype"))
        shapes.append(shape)
        buffers.append(binary[pos : pos + nbytes])
        pos += nbytes
    if pos != len(binary):
        return None
    return signature.fast_batch(names, datatypes, shapes, buffers, out)


def _general_batch(inputs: list[Any], binary: memoryview, signature: ModelSignature) -> Batch:
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
        if nbytes is not None:
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
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, its JSON header length."""
    outputs, blobs = [], []
    for name, binary in request.outputs:
        meta: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(scores.shape)}
        if binary:
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
    request: dict[str, Any], signature: ModelSignature
) -> list[tuple[str, bool]]:
    params = request.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be an object")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidArgument("parameter 'binary_data_output' must be a boolean")
    requested = request.get("outputs")
    if requested is None:
        return [(name, default_binary) for name in signature.output_names()]
    if not isinstance(requested, list):
        raise InvalidArgument("'outputs' must be a list")
    outputs = []
    for item in requested:
        if not isinstance(item, dict):
            raise InvalidArgument("each entry of 'outputs' must be an object")
        name = item.get("name")
        if name not in signature.output_names():
            raise InvalidArgument(
                f"unknown output {name!r}; the model's outputs are {list(signature.output_names())}"
            )
        binary = _parameters(item, "output").get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise InvalidArgument(f"output {name!r}: 'binary_data' must be a boolean")
        outputs.append((name, binary))
    return outputs
