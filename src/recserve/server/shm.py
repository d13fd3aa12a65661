"""KServe / Triton system shared memory: tensors read from and written to the caller's
POSIX shared-memory regions instead of travelling in the request and response.

A client creates a region (``shm_open``; ``tritonclient.utils.shared_memory`` does it),
registers it under a name (``/v2/systemsharedmemory/region/{name}/register`` or gRPC
``SystemSharedMemoryRegister``), then names it in an input's or output's parameters
(``shared_memory_region``, ``shared_memory_byte_size``, ``shared_memory_offset``). An 8 MB
dlrm-rmc2 query then crosses no socket at all.

Registrations are small files in one folder per server. The server process writes them (the
control calls reach it); every front-end process reads them, so a region registered through
any endpoint is seen by all of them without messages between processes. A reader checks the
file on each lookup (one ``stat``), so an unregistered or re-registered name is noticed at
once, and it keeps the region mapped between requests.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from recserve.server.errors import InvalidArgument

SHM_ROOT = "/dev/shm"
"""Where POSIX shared-memory objects live on Linux (``shm_open("/key")`` is this folder's
file ``key``)."""


@dataclass(frozen=True)
class Region:
    """A registered region: ``byte_size`` bytes at ``offset`` of shared-memory object ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int


class SystemSharedMemory:
    """The registry of one server (see the module's doc). ``folder`` None creates one (the
    server process, which removes it on :meth:`close`); front ends open the server's."""

    def __init__(self, folder: str | None = None, root: str = SHM_ROOT) -> None:
        self.owner = folder is None
        self.folder = folder or tempfile.mkdtemp(prefix="recserve-shm-")
        self.root = root
        self._maps: dict[str, tuple[tuple[int, int], Region, mmap.mmap]] = {}
        self._lock = threading.Lock()

    # -- control (the server process) ------------------------------------------------------

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        """Register ``name``; ``InvalidArgument`` for a name in use, a missing object, or a
        range outside it."""
        region = Region(
            _name(name), _key(key), _count(offset, "offset"), _count(byte_size, "byte_size")
        )
        size = self._object_size(region.key)
        if region.offset + region.byte_size > size:
            raise InvalidArgument(
                f"shared memory region {name!r}: offset {region.offset} + byte_size "
                f"{region.byte_size} is past the end of {region.key!r} ({size} bytes)"
            )
        path = self._path(region.name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise InvalidArgument(
                f"shared memory region {name!r} is already registered; unregister it first"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(region), f)
        return region

    def unregister(self, name: str | None = None) -> None:
        """Unregister ``name`` (every region when None); an unknown name is not an error."""
        paths = [self._path(_name(name))] if name is not None else self._files()
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def status(self, name: str | None = None) -> list[Region]:
        """The registered regions (``name`` alone: ``InvalidArgument`` when it is unknown)."""
        if name is not None:
            region = self._load(self._path(_name(name)))
            if region is None:
                raise InvalidArgument(f"no shared memory region {name!r} is registered")
            return [region]
        regions = [self._load(p) for p in self._files()]
        return sorted((r for r in regions if r is not None), key=lambda r: r.name)

    # -- data (any process) ----------------------------------------------------------------

    def view(self, name: str, offset: int, nbytes: int, what: str) -> memoryview:
        """``nbytes`` at ``offset`` of region ``name``, for tensor ``what`` (named in errors)."""
        region, mapping = self._mapped(name, what)
        start = self._bounds(region, offset, nbytes, what)
        return memoryview(mapping)[start : start + nbytes]

    def write(self, name: str, offset: int, data: bytes, capacity: int, what: str) -> None:
        """Write ``data`` at ``offset`` of region ``name`` (the caller gave ``capacity``
        bytes there for tensor ``what``)."""
        if len(data) > capacity:
            raise InvalidArgument(
                f"output {what!r} needs {len(data)} bytes; shared_memory_byte_size is {capacity}"
            )
        region, mapping = self._mapped(name, what)
        start = self._bounds(region, offset, len(data), what)
        mapping[start : start + len(data)] = data

    def close(self) -> None:
        with self._lock:
            maps, self._maps = self._maps, {}
        for _, _, mapping in maps.values():
            with contextlib.suppress(BufferError):  # views still held: unmapped with them
                mapping.close()
        if self.owner:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------

    def _mapped(self, name: Any, what: str) -> tuple[Region, mmap.mmap]:
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"tensor {what!r}: shared_memory_region must be a name")
        path = self._path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise InvalidArgument(
                f"tensor {what!r}: no shared memory region {name!r} is registered"
            ) from None
        stamp = (st.st_ino, st.st_mtime_ns)
        with self._lock:
            cached = self._maps.get(name)
            if cached is not None and cached[0] == stamp:
                return cached[1], cached[2]
        region = self._load(path)
        if region is None:
            raise InvalidArgument(
                f"tensor {what!r}: no shared memory region {name!r} is registered"
            )
        mapping = self._map(region.key)
        with self._lock:
            self._maps[name] = (stamp, region, mapping)
        return region, mapping

    @staticmethod
    def _bounds(region: Region, offset: Any, nbytes: int, what: str) -> int:
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise InvalidArgument(f"tensor {what!r}: shared_memory_offset must be an integer >= 0")
        if offset + nbytes > region.byte_size:
            raise InvalidArgument(
                f"tensor {what!r}: {nbytes} bytes at offset {offset} are past the end of shared "
                f"memory region {region.name!r} ({region.byte_size} bytes)"
            )
        return region.offset + offset

    def _object(self, key: str) -> str:
        return os.path.join(self.root, key.lstrip("/"))

    def _object_size(self, key: str) -> int:
        try:
            return os.stat(self._object(key)).st_size
        except FileNotFoundError:
            raise InvalidArgument(f"no shared memory object {key!r} exists") from None

    def _map(self, key: str) -> mmap.mmap:
        path = self._object(key)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise InvalidArgument(f"shared memory object {key!r} no longer exists") from None
        try:
            return mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name.encode().hex() + ".json")

    def _files(self) -> list[str]:
        return [str(p) for p in Path(self.folder).glob("*.json")]

    @staticmethod
    def _load(path: str) -> Region | None:
        try:
            with open(path) as f:
                return Region(**json.load(f))
        except (FileNotFoundError, ValueError, TypeError):
            return None


def _name(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > 256:
        raise InvalidArgument("a shared memory region's name must be 1 to 256 characters")
    return name


def _key(key: Any) -> str:
    if not isinstance(key, str) or not key.startswith("/") or "/" in key[1:] or len(key) > 255:
        raise InvalidArgument(
            f"shared memory key must be a POSIX shared-memory name such as '/input', got {key!r}"
        )
    if key in ("/", "/.", "/.."):
        raise InvalidArgument(f"shared memory key {key!r} is not a name")
    return key


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"shared memory {what} must be an integer >= 0, got {value!r}")
    return value
