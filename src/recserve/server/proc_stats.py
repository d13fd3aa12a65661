"""CPU time and memory of the server's processes, read from ``/proc`` (Linux), by role.

``recserve bench server`` reports where its CPU went without a profiler: each recserve
process names itself (:mod:`recserve.procname`), and its role (front end, engine process,
GPU runner, CPU worker) comes from that name.
"""

from __future__ import annotations

import os
from pathlib import Path

from recserve.procname import process_name


def rss(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        return 0
    raise RuntimeError(f"no VmRSS for process {pid}")


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from every one of its threads' child lists)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads); 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ROLE_OF_NAME = {"recserve-fe": "frontends", "recserve-engine": "engine",
                "recserve-gpu": "gpu_runner", "recserve-cpu": "cpu_workers"}  # fmt: skip
"""Process-name prefixes (:mod:`recserve.procname`) and the role each is reported under."""


def cpu_by_process(root: int, skip: int | None = None) -> dict[int, tuple[str, float]]:
    """``pid -> (role, CPU seconds)`` for ``root`` (role ``root``) and every recserve process
    below it (front ends, engine processes, GPU runners, CPU workers), not below ``skip``."""
    out = {root: ("root", cpu_seconds(root))}
    stack = list(children(root))
    while stack:
        pid = stack.pop()
        if pid == skip:
            continue
        stack += children(pid)
        name = process_name(pid)
        role = next((r for prefix, r in ROLE_OF_NAME.items() if name.startswith(prefix)), None)
        if role is not None:
            out[pid] = (role, cpu_seconds(pid))
    return out


def cpu_roles(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    seconds: float,
    queries: int,
) -> dict[str, dict[str, float]]:
    """Per role between two :func:`cpu_by_process` readings: CPU seconds, cores busy on
    average (``busy``), the busiest single process's share of a core (``busiest``), and CPU
    microseconds per answered query."""
    roles: dict[str, list[float]] = {}
    for pid, (role, cpu) in after.items():
        roles.setdefault(role, []).append(cpu - before.get(pid, (role, 0.0))[1])
    return {role: role_cpu(parts, seconds, queries) for role, parts in roles.items()}


def role_cpu(parts: list[float], seconds: float, queries: int) -> dict[str, float]:
    """One role's CPU from its processes' CPU seconds over ``seconds`` and ``queries``."""
    return {
        "cpu_s": sum(parts),
        "processes": len(parts),
        "busy": sum(parts) / seconds,
        "busiest": max(parts, default=0.0) / seconds,
        "us_per_query": sum(parts) / max(queries, 1) * 1e6,
    }
