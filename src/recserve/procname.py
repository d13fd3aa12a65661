"""Names for recserve's processes, as ``ps``, ``top`` and ``/proc/<pid>/comm`` show them.

A server is a tree of Python processes (front ends, engine processes, GPU runners, CPU
workers) that all read ``python`` otherwise. Each names itself at start, so an operator can
tell them apart and ``recserve bench server`` can report CPU time per role.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from pathlib import Path

_PR_SET_NAME = 15
ROLES = ("recserve-fe", "recserve-engine", "recserve-gpu", "recserve-cpu")
"""Name prefixes: front end, engine process, GPU runner, CPU worker."""


def set_process_name(name: str) -> None:
    """Name this process (Linux keeps the first 15 bytes); a no-op where it cannot."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def process_name(pid: int) -> str:
    """The name of process ``pid`` ('' when it is gone or unreadable)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
