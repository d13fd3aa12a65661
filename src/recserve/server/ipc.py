"""Framed messages between the server process and its front-end processes (a unix socket).

A frame is ``<json length u32><binary length u32>``, a JSON object padded with spaces to a
multiple of 8 bytes, then the binary part: arrays back to back, each padded to 8 bytes, whose
byte offsets the JSON names. The receiver (:class:`FrameProtocol`, an
``asyncio.BufferedProtocol``) reads small frames many at a time through one read buffer and
large binary parts straight into a buffer of their size; arrays are numpy views of the part.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import struct
import threading
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
    """Reads frames from a stream transport and hands each to ``on_frame(meta, binary)``.

    Reads go into one read buffer, so a single ``recv`` takes in every small frame that has
    arrived (a request's frame, its statistics and the next request's, under load) rather than
    one read and one event-loop turn per header, JSON and binary part. A binary part of at
    least ``direct_bytes`` is read straight into a buffer of its own size instead."""

    def __init__(
        self,
        on_frame: FrameHandler,
        on_lost: Callable[[], None] | None = None,
        buffer_bytes: int = 1 << 16,
        direct_bytes: int = 1 << 15,
    ) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buf = bytearray(buffer_bytes)
        self._start = self._end = 0
        """Unparsed bytes: ``_buf[_start:_end]``."""
        self._direct = direct_bytes
        self._meta: dict[str, Any] | None = None
        self._part: bytearray | None = None
        """The large binary part being read in place, ``_pos`` bytes of it so far."""
        self._pos = 0
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
        if self._part is not None:
            return memoryview(self._part)[self._pos :]
        if len(self._buf) - self._end < 4096:
            self._make_room()
        return memoryview(self._buf)[self._end :]

    def _make_room(self) -> None:
        """Move the unparsed bytes to the front; a new, larger buffer when they fill it (the
        old one may still be exported to the transport, so it is never resized)."""
        n = self._end - self._start
        if n + 4096 > len(self._buf):
            grown = bytearray(max(2 * len(self._buf), n + 4096))
            grown[:n] = self._buf[self._start : self._end]
            self._buf = grown
        elif self._start:
            self._buf[:n] = self._buf[self._start : self._end]
        self._start, self._end = 0, n

    def buffer_updated(self, nbytes: int) -> None:
        if self._part is not None:
            self._pos += nbytes
            if self._pos == len(self._part):
                meta, part = self._meta, self._part
                self._meta, self._part, self._pos = None, None, 0
                assert meta is not None
                self._on_frame(meta, part)
            return
        self._end += nbytes
        self._parse()

    def _parse(self) -> None:
        size = HEADER.size
        while (avail := self._end - self._start) >= size:
            buf, start = self._buf, self._start
            json_len, bin_len = HEADER.unpack_from(buf, start)
            if json_len == 0:
                raise ValueError("frame without a JSON part")
            head = size + json_len
            if avail < head:
                break
            if avail >= head + bin_len:  # the whole frame is here
                meta = json.loads(buf[start + size : start + head])
                data = buf[start + head : start + head + bin_len]  # a copy of its own
                self._start = start + head + bin_len
                self._on_frame(meta, data)
                continue
            if bin_len >= self._direct:  # read the rest of a large part in place
                part = bytearray(bin_len)
                have = avail - head
                part[:have] = buf[start + head : self._end]
                self._meta = json.loads(buf[start + size : start + head])
                self._part, self._pos = part, have
                self._start = self._end
            break
        if self._start == self._end:
            self._start = self._end = 0


class Arena:
    """A shared-memory file a front end writes request arrays into and the server process maps,
    so a request's megabytes never travel through the socket (the frame names where they are).

    First-fit over the live blocks, lowest address first, so only as much of the file is ever
    touched as the requests in flight at once need. Blocks are taken and given back under a
    lock (large requests are decoded into it on worker threads)."""

    def __init__(self, path: str, size: int, create: bool = True) -> None:
        if create:  # whole pages: the GPU runner page-locks whole pages only
            size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
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
        self._lock = threading.Lock()

    @property
    def address(self) -> int:
        """Where the file is mapped in this process."""
        probe = np.frombuffer(self._map, np.uint8, 1)
        try:
            return int(probe.ctypes.data)
        finally:
            del probe

    def alloc(self, nbytes: int) -> tuple[int, int] | None:
        """A free block of at least ``nbytes`` (``(start, end)``), or None when none is free."""
        nbytes = max(_ALIGN, -(-nbytes // 64) * 64)
        with self._lock:
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
        with self._lock:
            self._live.remove(block)

    @property
    def live_blocks(self) -> int:
        return len(self._live)

    def place(self, sizes: Sequence[int]) -> tuple[tuple[int, int], list[int]] | None:
        """One block for arrays of ``sizes`` bytes (each 8-byte aligned): the block and each
        array's offset in it, or None when it does not fit now."""
        offsets, pos = [], 0
        for n in sizes:
            offsets.append(pos)
            pos += n + (-n % _ALIGN)
        block = self.alloc(pos)
        return None if block is None else (block, offsets)

    def array(self, block: tuple[int, int], offset: int, dtype: str, count: int) -> np.ndarray:
        """A writable view of ``count`` items of ``dtype`` at ``offset`` in ``block``."""
        return np.frombuffer(self._map, dtype, count, block[0] + offset)

    def write(self, arrays: Sequence[np.ndarray]) -> tuple[tuple[int, int], list[int]] | None:
        """Copy ``arrays`` into one block (each 8-byte aligned); the block and the arrays'
        offsets in it, or None when it does not fit now."""
        placed = self.place([a.nbytes for a in arrays])
        if placed is None:
            return None
        block, offsets = placed
        for a, off in zip(arrays, offsets, strict=True):
            dst = self.array(block, off, "u1", a.nbytes)
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
