"""Framed messages between the server process and its front-end processes (a unix socket).

A frame is ``<json length u32><binary length u32>``, a JSON object padded with spaces to a
multiple of 8 bytes, then the binary part: arrays back to back, each padded to 8 bytes, whose
byte offsets the JSON names. The receiver reads each binary part straight into one buffer of its
size (:class:`FrameProtocol` is an ``asyncio.BufferedProtocol``: no intermediate copies), and
arrays are numpy views of it.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

HEADER = struct.Struct("<II")
_ALIGN = 8
_ZEROS = bytes(_ALIGN)

FrameHandler = Callable[[dict[str, Any], bytearray], None]


def frame(meta: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> list[Any]:
    """The buffers of one frame; ``meta["arrays"]`` is set to each array's byte offset."""
    offsets, parts, pos = [], [], 0
    for array in arrays:
        view = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        offsets.append(pos)
        parts.append(view)
        pos += view.nbytes
        pad = -view.nbytes % _ALIGN
        if pad:
            parts.append(_ZEROS[:pad])
            pos += pad
    if arrays:
        meta["arrays"] = offsets
    head = json.dumps(meta, separators=(",", ":")).encode()
    head += b" " * (-len(head) % _ALIGN)
    return [HEADER.pack(len(head), pos), head, *parts]


def array(data: bytearray, offset: int, dtype: str, count: int) -> np.ndarray:
    """``count`` elements of ``dtype`` at byte ``offset`` of a frame's binary part (a view);
    ``ValueError`` when the part is too short."""
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset)


class FrameProtocol(asyncio.BufferedProtocol):
    """Reads frames from a stream transport and hands each to ``on_frame(meta, binary)``."""

    def __init__(self, on_frame: FrameHandler, on_lost: Callable[[], None] | None = None) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._head = bytearray(HEADER.size)
        self._buf = self._head
        self._pos = 0
        self._meta: dict[str, Any] | None = None
        self._bin_len = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._on_lost is not None:
            self._on_lost()

    def send(self, meta: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> bool:
        """Queue one frame; False when the connection is gone."""
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.writelines(frame(meta, arrays))
        return True

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buf)[self._pos :]

    def buffer_updated(self, nbytes: int) -> None:
        self._pos += nbytes
        while self._pos == len(self._buf):
            self._advance()

    def _advance(self) -> None:
        if self._buf is self._head:  # header done: read the JSON
            json_len, self._bin_len = HEADER.unpack(self._head)
            self._buf, self._pos = bytearray(json_len), 0
            if json_len == 0:
                raise ValueError("frame without a JSON part")
        elif self._meta is None:  # JSON done: read the binary part, if any
            self._meta = json.loads(self._buf)
            if self._bin_len:
                self._buf, self._pos = bytearray(self._bin_len), 0
            else:
                self._deliver(bytearray())
        else:
            self._deliver(self._buf)

    def _deliver(self, data: bytearray) -> None:
        meta, self._meta = self._meta, None
        self._buf, self._pos = self._head, 0
        assert meta is not None
        self._on_frame(meta, data)
