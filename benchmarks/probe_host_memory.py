"""How should host tables be mapped so that GPU kernels read random rows fastest? (issue 4)

In-place host reads were found to run at ~55 M rows/s whatever the row size, and the gather of
sorted unique rows to cost about as much for 1.3 M rows as for 2.6 M (a sweep of the whole
table): the limit looks like address translation of host pages on the GPU, not PCIe. This
probe maps the same bytes several ways and times the gather kernel on each, in a child process
per method (a method that fails cannot take the others down):

- ``register``: anonymous memory with transparent huge pages (``madvise``), ``cudaHostRegister``;
- ``register-4k``: the same with huge pages refused;
- ``hostalloc``: ``cudaHostAlloc`` (the driver allocates and pins);
- ``vmm``: ``cuMemCreate`` of host memory at the recommended granularity (2 MiB), mapped with
  ``cuMemMap`` (GPU page size = that granularity), device and CPU access granted;
- ``vmm-raw``: the same with device access only (run when ``vmm`` fails).

Per method: 256-byte rows over ``--gib`` GiB; gather of 1.3 M rows in random order (what the
in-place kernel sees), sorted rows at low density (327 K) and high density (2.6 M), and a 1 GiB
host-to-device copy. One JSON line per method; ``best_method`` (the fastest that the CPU can also
read) is written to ``--out``.

    PYTHONPATH=src python benchmarks/probe_host_memory.py --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ("register", "register-4k", "hostalloc", "vmm", "vmm-raw")
ROW = 256


def _vmm_alloc(nbytes: int) -> tuple[int, int]:
    """Host memory through CUDA's virtual memory API: ``(address, mapped bytes)``."""
    from cuda.bindings import driver as cu

    def ok(result: Any, what: str) -> Any:
        err, *rest = result
        if int(err) != 0:
            raise RuntimeError(f"{what}: {err!r}")
        return rest[0] if rest else None

    ok(cu.cuInit(0), "cuInit")
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST
    prop.location.id = 0
    flag = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
    gran = int(ok(cu.cuMemGetAllocationGranularity(prop, flag), "granularity"))
    size = -(-nbytes // gran) * gran
    handle = ok(cu.cuMemCreate(size, prop, 0), "cuMemCreate")
    va = ok(cu.cuMemAddressReserve(size, max(gran, 2 << 20), 0, 0), "cuMemAddressReserve")
    ok(cu.cuMemMap(va, size, 0, handle, 0), "cuMemMap")
    dev = cu.CUmemAccessDesc()
    dev.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    dev.location.id = 0
    dev.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    ok(cu.cuMemSetAccess(va, size, [dev], 1), "cuMemSetAccess(device)")
    host = cu.CUmemAccessDesc()
    host.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST
    host.location.id = 0
    host.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    err = cu.cuMemSetAccess(va, size, [host], 1)[0]
    print(json.dumps({"vmm_granularity": gran, "host_access_set": int(err) == 0}), flush=True)
    return int(va), size


def child(method: str, gib: float) -> dict[str, Any]:
    import ctypes

    import torch
    from cuda.bindings import runtime as rt

    from recserve.kernels.gather import gather_rows
    from recserve.kernels.host import SENTINEL64
    from recserve.storage.host import DevicePointer, HostArena

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    nbytes = int(gib * (1 << 30)) // ROW * ROW
    out: dict[str, Any] = {"method": method, "bytes": nbytes}
    start = time.perf_counter()
    arena = None
    if method == "vmm-raw":
        address, _ = _vmm_alloc(nbytes)
    else:
        arena = HostArena(nbytes, method=method)
        address = arena.device_address
    out["alloc_s"] = time.perf_counter() - start
    with contextlib.suppress(OSError, StopIteration):
        out["anon_huge_kb"] = int(
            next(
                line.split()[1]
                for line in Path("/proc/self/smaps_rollup").read_text().splitlines()
                if line.startswith("AnonHugePages")
            )
        )
    chunk = 1 << 30
    block = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    for s in range(0, nbytes, chunk):
        n = min(chunk, nbytes - s)
        block.view(torch.float32).uniform_(-1, 1)
        err = rt.cudaMemcpy(address + s, block.data_ptr(), n, rt.cudaMemcpyKind.cudaMemcpyDefault)
        if int(err[0]) != 0:
            raise RuntimeError(f"fill: {err!r}")
    torch.cuda.synchronize()
    out["filled_s"] = time.perf_counter() - start

    rows = nbytes // ROW
    src = DevicePointer(address, torch.int32)
    bounds = torch.tensor([0, rows], device="cuda")
    meta = torch.tensor([[0, ROW // 4, ROW // 4]], device="cuda")
    dst = torch.empty(2_600_000 * ROW // 4, dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda")
    g.manual_seed(0)

    def time_gather(ids: torch.Tensor) -> float:
        def once() -> None:
            gather_rows(ids, bounds, meta, src, dst, ROW // 4, ROW // 4, SENTINEL64, rows=16)

        once()
        torch.cuda.synchronize()
        samples = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            once()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b) * 1e3)
        return statistics.median(samples)

    for name, n, ordered in (("random_1.3M", 1_300_000, False), ("sorted_327K", 327_000, True),
                             ("sorted_1.3M", 1_300_000, True), ("sorted_2.6M", 2_600_000, True)):  # fmt: skip
        ids = torch.randint(0, rows, (n,), generator=g, device="cuda")
        if ordered:
            ids = torch.unique(ids)
        us = time_gather(ids)
        out[name] = {"us": us, "gbps": ids.numel() * ROW / us / 1e3, "mrows_s": ids.numel() / us}
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = 1 << 30
    rt.cudaMemcpy(block.data_ptr(), address, n, rt.cudaMemcpyKind.cudaMemcpyDefault)
    a.record()
    for _ in range(3):
        rt.cudaMemcpyAsync(block.data_ptr(), address, n, rt.cudaMemcpyKind.cudaMemcpyDefault, 0)
    b.record()
    b.synchronize()
    out["h2d_gbps"] = 3 * n / (a.elapsed_time(b) * 1e3) / 1e3
    print(json.dumps(out), flush=True)
    # Last, since it may crash the process: can the CPU read it?
    value = ctypes.c_uint32.from_address(address).value
    out["cpu_access"] = True
    print(json.dumps({"method": method, "cpu_access": True, "first_word": value}), flush=True)
    if arena is not None:
        arena.release()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--gib", type=float, default=16.0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--child", default="")
    args = p.parse_args()
    if args.child:
        child(args.child, args.gib)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    methods = args.methods.split(",")
    for method in methods:
        if method == "vmm-raw" and any(
            r["method"] == "vmm" and r.get("cpu_access") for r in results
        ):
            continue  # only needed when the CPU may not read VMM host memory
        cmd = [sys.executable, __file__, "--child", method, "--gib", str(args.gib)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        merged: dict[str, Any] = {"method": method, "returncode": proc.returncode}
        for line in lines:
            merged.update(line)
        merged.setdefault("cpu_access", False)
        if proc.returncode != 0:
            merged["stderr"] = proc.stderr[-1500:]
        results.append(merged)
        print(json.dumps(merged), flush=True)
    (args.out / "probe_host_memory.json").write_text(json.dumps(results, indent=2))
    usable = [r for r in results if r.get("cpu_access") and "random_1.3M" in r]
    if usable:
        best = min(usable, key=lambda r: r["random_1.3M"]["us"] + 4 * r["sorted_327K"]["us"])
        (args.out / "best_method").write_text(best["method"])
        print("best", best["method"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
