"""``ModelInferRequest`` with its raw tensor bytes kept out of protobuf.

protobuf's Python runtime copies every ``raw_input_contents`` entry when it parses or builds a
message, and its encoder is slow for messages of megabytes (a dlrm-rmc2 query of 256 items is
8 MB of ids). The protobuf wire format lets a message be cut into its fields and put together
from them in any order, so:

- :func:`split_infer_request` walks the top-level fields of a serialized request, keeps the
  ``raw_input_contents`` (field 7) as zero-copy views of the received bytes, and parses the
  rest (names, shapes, parameters: a few hundred bytes) with protobuf;
- :func:`join_infer_request` serializes a request without its raw contents and appends each
  one as a field-7 record: one copy of the tensor bytes in all.

Both produce and accept exactly the bytes protobuf would, so any KServe/Triton client or server
interoperates unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from tritonclient.grpc import service_pb2

from recserve.server.errors import InvalidArgument

RAW_INPUT_CONTENTS = 7
_RAW_KEY = RAW_INPUT_CONTENTS << 3 | 2
_RAW_TAG = bytes([_RAW_KEY])
_SHM_KEY = b"shared_memory_region"


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise InvalidArgument("malformed ModelInferRequest: truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class SplitRequest(NamedTuple):
    """A ``ModelInferRequest`` cut by :func:`split_infer_request`."""

    request: service_pb2.ModelInferRequest
    """Everything but the raw contents."""
    raw: list[memoryview]
    """The raw contents, views of the received bytes."""
    may_use_shared_memory: bool
    """False when no field outside the raw contents mentions ``shared_memory_region``: then
    no tensor is placed in shared memory, and nobody need look at each one's parameters."""


def split_infer_request(data: bytes | memoryview) -> SplitRequest:
    """The request without its raw contents, and the raw contents as views of ``data``.

    One pass over the top-level fields. Keys and lengths under 128 (nearly all of them) are
    read inline: a function call per varint was half of the time for a request of 55 tensors.
    """
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    n = len(view)
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    pos = 0
    while pos < n:
        start = pos
        key = view[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(view, pos)
        wire_type = key & 7
        if wire_type == 2:
            if pos >= n:
                raise InvalidArgument("malformed ModelInferRequest: truncated field")
            length = view[pos]
            if length < 0x80:
                pos += 1
            else:
                length, pos = _varint(view, pos)
            end = pos + length
            if end > n:
                raise InvalidArgument("malformed ModelInferRequest: truncated field")
            if key == _RAW_KEY:
                raw.append(view[pos:end])
            else:
                rest.append(view[start:end])
            pos = end
            continue
        if wire_type == 0:
            _, pos = _varint(view, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise InvalidArgument(f"malformed ModelInferRequest: wire type {wire_type}")
        rest.append(view[start:pos])
    if pos > n:
        raise InvalidArgument("malformed ModelInferRequest: truncated field")
    header = b"".join(rest)
    try:
        request = service_pb2.ModelInferRequest.FromString(header)
    except Exception as e:  # protobuf's DecodeError
        raise InvalidArgument(f"malformed ModelInferRequest: {e}") from None
    return SplitRequest(request, raw, _SHM_KEY in header)


def join_infer_request(
    request: service_pb2.ModelInferRequest, raw: Sequence[bytes | memoryview]
) -> bytes:
    """``request`` (whose own raw contents must be empty) with ``raw`` as its raw contents,
    serialized."""
    if request.raw_input_contents:
        raise ValueError("pass the raw contents separately")
    parts: list[bytes | memoryview] = [request.SerializeToString()]
    for blob in raw:
        parts += [_RAW_TAG, _encode_varint(memoryview(blob).nbytes), blob]
    return b"".join(parts)
