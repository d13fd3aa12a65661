"""Embedding rows in host DRAM that GPU kernels read in place (GDRec's zero-copy tier).

A :class:`HostArena` is one page-locked buffer of exactly the bytes its tables need, registered
with ``cudaHostRegister`` (mapped, portable) so that its host address is valid on the device
(unified virtual addressing). ``tensor.pin_memory()`` is not used: PyTorch's pinned allocator
rounds every block up to a power of two, which would waste up to half of a large table.

:class:`HostTables` lays tables out in an arena: every row starts on a 128-byte boundary and the
row stride is the row's bytes rounded up to 128, so a row is a whole number of 128-byte PCIe /
L2 lines and a warp reading it issues full, aligned requests. Rows are written in place, a
chunk at a time (from a float tensor, a safetensors file or a generator), so loading a model
never holds a second full copy of a table in memory. ``release()`` unregisters and unmaps.

Without CUDA (tests), the arena is ordinary anonymous memory and Triton's interpreter reads it
as a CPU tensor.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import mmap
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recserve.config import TORCH_DTYPES, TableConfig, row_bytes
from recserve.embedding.backend import check_table_weight, quantize_rowwise

ROW_ALIGN = 128
"""Every host row starts on this boundary and its stride is a multiple of it (bytes)."""

_MAP_ALIGN = 2 << 20
"""The arena starts on a 2 MiB boundary so transparent huge pages can back it (fewer TLB and
IOMMU misses for random row reads)."""

_LOAD_CHUNK_BYTES = 64 << 20
"""Rows are converted and written this many bytes at a time (bounds the extra memory)."""


class HostMemoryError(RuntimeError):
    """Registering or releasing host memory failed (or cuda-bindings is missing)."""


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError as exc:  # optional dependency: pip install recserve[cuda]
        raise HostMemoryError(
            "cuda-bindings is not installed (pip install cuda-bindings): needed to register "
            "host tables for device access"
        ) from exc
    return runtime


def _check(result: Any, what: str) -> Any:
    """cuda-bindings returns ``(err, *values)``; raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise HostMemoryError(f"{what} failed: {err!r}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def register_host_memory(ptr: int, nbytes: int) -> int:
    """Page-lock ``[ptr, ptr + nbytes)`` and map it for device access; returns the device
    address (equal to ``ptr`` under unified virtual addressing)."""
    rt = _cudart()
    torch.cuda.init()
    flags = int(getattr(rt, "cudaHostRegisterMapped", 2)) | int(
        getattr(rt, "cudaHostRegisterPortable", 1)
    )
    _check(rt.cudaHostRegister(ptr, nbytes, flags), f"cudaHostRegister({nbytes} bytes)")
    return int(_check(rt.cudaHostGetDevicePointer(ptr, 0), "cudaHostGetDevicePointer"))


def cuda_host_alloc(nbytes: int) -> int:
    """``cudaHostAlloc`` of exactly ``nbytes``, mapped and portable; returns the address (valid
    on the host and, under unified virtual addressing, on the device)."""
    rt = _cudart()
    torch.cuda.init()
    flags = int(getattr(rt, "cudaHostAllocMapped", 2)) | int(
        getattr(rt, "cudaHostAllocPortable", 1)
    )
    return int(_check(rt.cudaHostAlloc(nbytes, flags), f"cudaHostAlloc({nbytes} bytes)"))


def vmm_host_alloc(nbytes: int) -> tuple[int, Callable[[], None]]:
    """Host memory through CUDA's virtual memory API, readable and writable by the device and
    the CPU: ``(address, free)``. Raises :class:`HostMemoryError` where the driver refuses."""
    try:
        from cuda.bindings import driver as cu
    except ImportError as exc:
        raise HostMemoryError("cuda-bindings is not installed") from exc
    torch.cuda.init()
    _check(cu.cuInit(0), "cuInit")
    loc = cu.CUmemLocationType
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = loc.CU_MEM_LOCATION_TYPE_HOST
    prop.location.id = 0
    flag = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
    gran = int(
        _check(cu.cuMemGetAllocationGranularity(prop, flag), "cuMemGetAllocationGranularity")
    )
    size = _round_up(nbytes, gran)
    handle = _check(cu.cuMemCreate(size, prop, 0), "cuMemCreate(host)")
    va = _check(cu.cuMemAddressReserve(size, max(gran, _MAP_ALIGN), 0, 0), "cuMemAddressReserve")
    _check(cu.cuMemMap(va, size, 0, handle, 0), "cuMemMap")
    descs = []
    for kind, ident in ((loc.CU_MEM_LOCATION_TYPE_DEVICE, torch.cuda.current_device()),
                        (loc.CU_MEM_LOCATION_TYPE_HOST, 0)):  # fmt: skip
        d = cu.CUmemAccessDesc()
        d.location.type = kind
        d.location.id = ident
        d.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        descs.append(d)
    _check(cu.cuMemSetAccess(va, size, descs, len(descs)), "cuMemSetAccess(device, host)")

    def free() -> None:
        _check(cu.cuMemUnmap(va, size), "cuMemUnmap")
        _check(cu.cuMemRelease(handle), "cuMemRelease")
        _check(cu.cuMemAddressFree(va, size), "cuMemAddressFree")

    return int(va), free


def unregister_host_memory(ptr: int) -> None:
    _check(_cudart().cudaHostUnregister(ptr), "cudaHostUnregister")


class DevicePointer:
    """What a Triton kernel needs of a pointer argument: an address and an element type.

    Passed in place of a tensor for registered host memory on CUDA (the address is valid on the
    device; a CPU tensor would be copied by Triton's interpreter and refused by nothing else)."""

    def __init__(self, address: int, dtype: torch.dtype) -> None:
        self.address = address
        self.dtype = dtype

    def data_ptr(self) -> int:
        return self.address


ALLOC_METHODS = ("register", "register-4k", "hostalloc", "vmm")
"""How an arena gets page-locked device-visible memory: ``register`` (anonymous memory backed by
transparent huge pages where the kernel grants them, then ``cudaHostRegister``), ``register-4k``
(the same with huge pages refused: a diagnostic), ``hostalloc`` (``cudaHostAlloc``: the driver
allocates and pins) or ``vmm`` (``cuMemCreate`` of host memory mapped with ``cuMemMap`` at the
driver's recommended granularity, 2 MiB, so the GPU maps it with large pages; the CPU must be
granted access, which not every driver allows). All are exact-size (up to a page), unlike
PyTorch's power-of-two pinned allocator."""


class HostArena:
    """``nbytes`` (rounded up to 128) of page-locked host memory, mapped for the device.

    ``register`` None maps it for the device when CUDA is available (``method``, one of
    :data:`ALLOC_METHODS`, says how); False gives ordinary memory (tests). The memory is
    released by :meth:`release` (or when the arena is garbage collected); views handed out
    before must not be used after that.
    """

    def __init__(
        self, nbytes: int, *, register: bool | None = None, method: str = "register"
    ) -> None:
        if nbytes <= 0:
            raise ValueError(f"an arena needs a positive size, got {nbytes}")
        if method not in ALLOC_METHODS:
            raise ValueError(f"method must be one of {list(ALLOC_METHODS)}, got {method!r}")
        self.nbytes = _round_up(nbytes, ROW_ALIGN)
        if register is None:
            register = torch.cuda.is_available()
        self.method = method if register else "anonymous"
        self.device_address = 0
        self.registered = False
        self._map: mmap.mmap | None = None
        if self.method in ("hostalloc", "vmm"):
            if self.method == "hostalloc":
                self.address = cuda_host_alloc(self.nbytes)
                free: Callable[[], None] = functools.partial(_free_host, self.address)
            else:
                self.address, free = vmm_host_alloc(self.nbytes)
            buf = (ctypes.c_uint8 * self.nbytes).from_address(self.address)
            self._bytes: torch.Tensor | None = torch.from_numpy(np.ctypeslib.as_array(buf))
            self.device_address = self.address
            self.registered = True
            self._finalizer = weakref.finalize(self, free)
        else:
            # Private anonymous memory: transparent huge pages can back it (shared cannot).
            flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
            size = self.nbytes + _MAP_ALIGN
            self._map = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
            advice = "MADV_NOHUGEPAGE" if method == "register-4k" else "MADV_HUGEPAGE"
            if hasattr(mmap, advice):
                self._map.madvise(getattr(mmap, advice))
            whole = np.frombuffer(self._map, dtype=np.uint8)
            skip = (-whole.ctypes.data) % _MAP_ALIGN
            self._bytes = torch.from_numpy(whole[skip : skip + self.nbytes])
            del whole
            self.address = int(self._bytes.data_ptr())
            if register:
                # Fault the pages in with all cores first: pinning present pages is much
                # faster than letting the driver fault a large range in on one thread.
                self._bytes.view(torch.int64).zero_()
                self.device_address = register_host_memory(self.address, self.nbytes)
                self.registered = True
            release = functools.partial(_release, self.address if self.registered else 0, self._map)
            self._finalizer = weakref.finalize(self, release)
        self._finalizer.atexit = False  # at exit the OS takes the memory back

    @property
    def alive(self) -> bool:
        return self._bytes is not None

    def tensor(self, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """The whole arena as a flat CPU tensor of ``dtype`` (a view, no copy)."""
        if self._bytes is None:
            raise HostMemoryError("this arena was released")
        return self._bytes.view(dtype)

    def kernel_arg(self, dtype: torch.dtype) -> torch.Tensor | DevicePointer:
        """The arena as a Triton pointer argument of element type ``dtype``: its device address
        when registered, else the CPU tensor (Triton's interpreter)."""
        if self.registered:
            if self._bytes is None:
                raise HostMemoryError("this arena was released")
            return DevicePointer(self.device_address, dtype)
        return self.tensor(dtype)

    def release(self) -> None:
        """Unregister and unmap. Views taken earlier become invalid."""
        self._bytes = None
        self._finalizer()

    def __enter__(self) -> HostArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _free_host(address: int) -> None:
    _check(_cudart().cudaFreeHost(address), "cudaFreeHost")


def _release(address: int, mapping: mmap.mmap) -> None:
    if address:
        unregister_host_memory(address)
    # A view still alive keeps the mapping; it is unmapped when the last view goes.
    with contextlib.suppress(BufferError):
        mapping.close()


@dataclass(frozen=True)
class HostRowLayout:
    """Where one table's rows sit in an arena (all in bytes)."""

    base: int
    """Offset of row 0 (a multiple of 128)."""
    stride: int
    """Bytes from one row to the next (row bytes rounded up to 128)."""
    row_bytes: int
    """Bytes of one row's data (int8: codes, padding to 4, fp32 scale and bias)."""
    copy_bytes: int
    """Bytes that hold data, rounded up to 16 (what a gather copies)."""
    scale_off: int
    """int8 rows: byte offset of the fp32 scale (the bias follows); 0 otherwise."""
    num_rows: int

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.stride


def host_row_layout(
    dim: int, dtype: str, num_rows: int, base: int = 0, align: int = ROW_ALIGN
) -> HostRowLayout:
    """The layout of a table of ``num_rows`` rows of ``dim`` elements starting at ``base``,
    rows ``align`` bytes apart (128 in host memory; HBM tables use 16)."""
    if base % align or align % 16:
        raise ValueError(f"base {base} and align {align} must be multiples of {align} and 16")
    if dtype == "int8":
        scale_off = _round_up(dim, 4)
        data = scale_off + 8
    else:
        scale_off = 0
        data = row_bytes(dim, dtype)
    return HostRowLayout(
        base=base,
        stride=_round_up(data, align),
        row_bytes=data,
        copy_bytes=_round_up(data, 16),
        scale_off=scale_off,
        num_rows=num_rows,
    )


def host_bytes(tables: Sequence[TableConfig]) -> int:
    """Arena bytes that ``tables`` need in the host layout (padding included)."""
    return sum(host_row_layout(t.dim, t.dtype, t.num_rows).nbytes for t in tables)


class HostTables:
    """Tables laid out back to back in one :class:`HostArena` (created here unless given)."""

    def __init__(
        self,
        tables: Sequence[TableConfig],
        arena: HostArena | None = None,
        *,
        register: bool | None = None,
        method: str = "register",
    ) -> None:
        self.tables = tuple(tables)
        if not self.tables:
            raise ValueError("HostTables needs at least one table")
        layouts, pos = [], 0
        for t in self.tables:
            layouts.append(host_row_layout(t.dim, t.dtype, t.num_rows, pos))
            pos += layouts[-1].nbytes
        self.layouts = tuple(layouts)
        self.nbytes = pos
        self.owns_arena = arena is None
        if arena is None:
            arena = HostArena(pos, register=register, method=method)
        elif arena.nbytes < pos:
            raise ValueError(f"the arena holds {arena.nbytes} bytes, these tables need {pos}")
        self.arena = arena

    def row_view(self, table: int) -> torch.Tensor:
        """Table ``table``'s rows as a ``[rows, stride]`` uint8 view of the arena."""
        lay = self.layouts[table]
        flat = self.arena.tensor(torch.uint8)[lay.base : lay.base + lay.nbytes]
        return flat.view(lay.num_rows, lay.stride)

    def codes(self, table: int) -> torch.Tensor:
        """The stored values ``[rows, D]`` in the table's dtype (uint8 codes for int8): a view."""
        t = self.tables[table]
        dtype = TORCH_DTYPES[t.dtype]
        width = t.dim * dtype.itemsize
        return self.row_view(table)[:, :width].view(dtype)

    def scale_bias(self, table: int) -> torch.Tensor | None:
        """int8 tables: ``[rows, 2]`` float32 scale and bias (a view); None otherwise."""
        if self.tables[table].dtype != "int8":
            return None
        so = self.layouts[table].scale_off
        return self.row_view(table)[:, so : so + 8].view(torch.float32)

    @torch.no_grad()
    def write_rows(
        self,
        table: int,
        first_row: int,
        rows: torch.Tensor,
        scale_bias: torch.Tensor | None = None,
    ) -> None:
        """Write stored rows (table dtype; int8: codes and ``scale_bias``) from ``first_row``."""
        n = int(rows.shape[0])
        self.codes(table)[first_row : first_row + n].copy_(rows)
        sb = self.scale_bias(table)
        if sb is not None:
            if scale_bias is None:
                raise ValueError("int8 rows need their scale and bias")
            sb[first_row : first_row + n].copy_(scale_bias)

    @torch.no_grad()
    def write_float_rows(self, table: int, first_row: int, weight: torch.Tensor) -> None:
        """Write float rows ``[n, D]``, converted (quantised for int8) to the table's dtype."""
        t = self.tables[table]
        w = weight.detach()
        if t.dtype == "int8":
            q, sb = quantize_rowwise(w.float().cpu())
            self.write_rows(table, first_row, q, sb)
        else:
            self.write_rows(table, first_row, w.to(TORCH_DTYPES[t.dtype]).cpu())

    def load_table(self, table: int, weight: torch.Tensor) -> None:
        """Set a whole table from float rows ``[rows, D]`` (any device), chunk by chunk."""
        t = self.tables[table]
        check_table_weight(t, weight)
        for start, stop in self.chunks(table):
            self.write_float_rows(table, start, weight[start:stop])

    def fill(
        self, table: int, rows_fn: Callable[[int, int], torch.Tensor], stored: bool = False
    ) -> None:
        """Fill a table chunk by chunk with ``rows_fn(start, stop)`` (float rows, or rows in
        the table's dtype when ``stored``)."""
        for start, stop in self.chunks(table):
            rows = rows_fn(start, stop)
            if stored:
                self.write_rows(table, start, rows)
            else:
                self.write_float_rows(table, start, rows)

    def chunks(self, table: int) -> list[tuple[int, int]]:
        t = self.tables[table]
        step = max(1, _LOAD_CHUNK_BYTES // max(t.dim * 4, 1))
        return [(s, min(s + step, t.num_rows)) for s in range(0, t.num_rows, step)]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """DLRM's initialisation, rows uniform in ±sqrt(1 / rows), drawn chunk by chunk."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        for i, t in enumerate(self.tables):
            bound = math.sqrt(1.0 / t.num_rows)

            def draw(start: int, stop: int, dim: int = t.dim, bound: float = bound) -> torch.Tensor:
                r = torch.rand(stop - start, dim, generator=generator, device=gen_device)
                return r.mul_(2 * bound).sub_(bound)

            self.fill(i, draw)

    def load_safetensors(
        self, path: str | Path, keys: Mapping[int, tuple[str, str | None]]
    ) -> None:
        """Stream tables from a safetensors file, a chunk at a time: ``keys[t]`` names table
        ``t``'s rows (float, or the table's dtype) and, for int8 tables stored as uint8 codes,
        its ``[rows, 2]`` scale/bias tensor (TorchBackend's ``weights.<i>``/``scale_bias_<i>``)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            for i, (key, sb_key) in keys.items():
                t = self.tables[i]
                if key not in names:
                    raise ValueError(f"{path}: no tensor {key!r} for table {t.name!r}")
                sl = f.get_slice(key)
                shape = tuple(sl.get_shape())
                if shape != (t.num_rows, t.dim):
                    raise ValueError(
                        f"{path}: {key!r} is {list(shape)}, expected [{t.num_rows}, {t.dim}]"
                    )
                codes = sl.get_dtype() == "U8"
                if codes and (t.dtype != "int8" or sb_key is None or sb_key not in names):
                    raise ValueError(f"{path}: uint8 table {key!r} needs int8 and {sb_key!r}")
                for start, stop in self.chunks(i):
                    part = sl[start:stop]
                    if codes:
                        assert sb_key is not None
                        self.write_rows(i, start, part, f.get_slice(sb_key)[start:stop])
                    elif t.dtype != "int8" and part.dtype == TORCH_DTYPES[t.dtype]:
                        self.write_rows(i, start, part)
                    else:
                        self.write_float_rows(i, start, part.float())

    def dense_weight(self, table: int) -> torch.Tensor:
        """The table as float32 ``[rows, D]`` on the host (dequantised for int8)."""
        codes = self.codes(table)
        sb = self.scale_bias(table)
        if sb is None:
            return codes.float()
        return codes.float() * sb[:, :1] + sb[:, 1:]

    def release(self) -> None:
        """Release the arena if these tables created it (a lent arena stays with its owner)."""
        if self.owns_arena:
            self.arena.release()


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m
