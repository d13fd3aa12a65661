"""What every benchmark result carries: device, date, commit; where it is written."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recserve.kernels.tuning import device_slug

__all__ = ["device_label", "device_slug", "git_commit", "machine_speed", "write_result"]


def device_label(device: torch.device | str | None = None) -> str:
    """Human name of the device results are measured on (GPU name, else ``cpu``)."""
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return "cpu"


def git_commit() -> str:
    """The commit of the working tree (``+dirty`` when it has changes), ``$RECSERVE_COMMIT``
    where the tree has no git metadata (a copy on another machine), or ``unknown``."""
    if os.environ.get("RECSERVE_COMMIT"):
        return os.environ["RECSERVE_COMMIT"]
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine_speed(copy_mb: int = 64, rounds: int = 5) -> dict[str, float]:
    """A quick reading of how fast this host runs right now, for telling a slow run from a
    slow change: one core's copy bandwidth (best of ``rounds`` copies of ``copy_mb`` MB) and
    the interpreter's time per loop step (best of ``rounds``). Closed-loop figures on a shared
    host can move by a third between runs; results record this before and after so that a
    run measured on a slowed host shows it. Takes about 0.2 s."""
    src = np.ones(copy_mb << 17, dtype=np.float64)  # copy_mb MB
    dst = np.empty_like(src)
    copy_s = loop_s = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        np.copyto(dst, src)
        copy_s = min(copy_s, time.perf_counter() - t)
        t = time.perf_counter()
        x = 0
        for i in range(200_000):
            x += i
        loop_s = min(loop_s, time.perf_counter() - t)
    return {
        "copy_gbps_one_core": round(src.nbytes / copy_s / 1e9, 2),
        "python_ns_per_step": round(loop_s / 200_000 * 1e9, 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def write_result(
    out_dir: str | Path,
    name: str,
    summary: dict[str, Any],
    body: dict[str, Any],
    device: str | None = None,
) -> Path:
    """Write ``<out_dir>/<device-slug>/<name>.json`` with ``summary`` first, then the rest."""
    label = device or device_label()
    summary = {
        **summary,
        "device": label,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "commit": git_commit(),
    }
    folder = Path(out_dir) / device_slug(label)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"summary": summary, **body}, indent=2, default=_jsonable))
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
