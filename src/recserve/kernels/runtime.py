"""Where Triton kernels can run, and the one place the kernels read the environment."""

from __future__ import annotations

import os

import torch


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether Triton kernels can run on tensors of ``device`` (CUDA, or CPU when interpreted)."""
    dev = torch.device(device)
    return dev.type == "cuda" or (dev.type == "cpu" and interpreter_enabled())


def device_name(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return "cpu"
