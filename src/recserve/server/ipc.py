"""Framed messages between the server process and its front-end processes (a unix socket).

A frame is ``<json length u32><binary length u32>``, a JSON object padded with spaces to a
multiple of 8 bytes, then the binary part: arrays back to back, each padded to 8 bytes, whose
byte offsets the JSON names. The receiver reads each binary part straight into one buffer of its
size (:class:`FrameProtocol` is an ``asyncio.BufferedProtocol``: no intermediate copies), and
arrays are numpy views of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
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
    offsets: list[int] = []
    parts: list[Any] = []
    pos = 0
    for array in arrays:
        view = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
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


def array(data: bytearray | memoryview, offset: int, dtype: str, count: int) -> np.ndarray:
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


class Arena:
    """A shared-memory file a front end writes request arrays into and the server process maps,
    so a request's megabytes never travel through the socket (the frame names where they are).

    First-fit over the live blocks, lowest address first, so only as much of the file is ever
    touched as the requests in flight at once need. Single-threaded (one event loop)."""

    def __init__(self, path: str, size: int, create: bool = True) -> None:
        self.path, self.size = path, size
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._live: list[tuple[int, int]] = []

    def alloc(self, nbytes: int) -> tuple[int, int] | None:
        """A free block of at least ``nbytes`` (``(start, end)``), or None when none is free."""
        nbytes = max(_ALIGN, -(-nbytes // 64) * 64)
        start = 0
        for i, (s, e) in enumerate(self._live):
            if s - start >= nbytes:
                block = (start, start + nbytes)
                self._live.insert(i, block)
                return block
            start = e
        if self.size - start < nbytes:
            return None
        block = (start, start + nbytes)
        self._live.append(block)
        return block

    def free(self, block: tuple[int, int]) -> None:
        self._live.remove(block)

    def write(self, arrays: Sequence[np.ndarray]) -> tuple[tuple[int, int], list[int]] | None:
        """Copy ``arrays`` into one block (each 8-byte aligned); the block and the arrays'
        offsets in it, or None when it does not fit now."""
        sizes = [a.nbytes for a in arrays]
        offsets, pos = [], 0
        for n in sizes:
            offsets.append(pos)
            pos += n + (-n % _ALIGN)
        block = self.alloc(pos)
        if block is None:
            return None
        base = block[0]
        for a, off in zip(arrays, offsets, strict=True):
            dst = np.frombuffer(self._map, np.uint8, a.nbytes, base + off)
            dst[:] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        return block, offsets

    def view(self, block: Sequence[int]) -> memoryview:
        start, end = int(block[0]), int(block[1])
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"block {start}:{end} is outside the arena of {self.size} bytes")
        return memoryview(self._map)[start:end]

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # arrays still view it: it goes with them
            self._map.close()
