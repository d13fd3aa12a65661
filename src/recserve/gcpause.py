"""The cyclic garbage collector's pauses on the serving path, and how recserve keeps them short.

CPython's cyclic collector stops its process while it scans. The oldest generation holds every
object that survived two younger collections; after start-up that is the imported libraries
(torch, triton, numpy, ...) and the model, some 10^5 objects, and a full collection walks them
all: 78 ms for 184k objects in a benchmark process on the 2-core CPU machine. A serving loop's
short-lived objects trigger one now and then. Under an open loop near capacity, one such pause
queues a few hundred queries, and their latencies fail a tail target long after it ends.

:func:`freeze` (collect once, then :func:`gc.freeze`) moves everything alive at the end of
start-up into a permanent generation the collector no longer scans, so a full collection later
walks only what was made since. recserve's own processes (the GPU runner, the CPU workers, the
server's front ends and engine process) freeze once started; the engine freezes the process
that creates it unless ``EngineConfig.gc_freeze`` is off, and hands them back to the collector
(:func:`unfreeze`) when it closes: an object frozen while alive that then becomes cyclic
garbage is not collected until then (a closed engine's model must not stay behind).
:class:`PauseMonitor` times every collection by generation (``RecEngine.stats()["gc"]``)."""

from __future__ import annotations

import atexit
import gc
import logging
import threading
import time
from typing import Any

__all__ = ["PauseMonitor", "freeze", "monitor", "unfreeze"]

_unfreeze_at_exit = False
_quiet = False
log = logging.getLogger(__name__)


def freeze() -> int:
    """Collect, then move every object still alive into the permanent generation; returns how
    many objects are frozen."""
    global _unfreeze_at_exit, _quiet
    _quiet = True  # this one is start-up's, not a pause while serving
    try:
        gc.collect()
    finally:
        _quiet = False
    gc.freeze()
    if not _unfreeze_at_exit:  # let the interpreter's shutdown free them as usual
        atexit.register(gc.unfreeze)
        _unfreeze_at_exit = True
    return gc.get_freeze_count()


def unfreeze() -> None:
    """Hand every frozen object back to the collector's oldest generation."""
    gc.unfreeze()


class PauseMonitor:
    """Counts and times this process's collections per generation through ``gc.callbacks``."""

    def __init__(self, slow_ms: float | None = None) -> None:
        self.slow_ms = slow_ms
        """Log a warning for every collection longer than this (None: never)."""
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self._began = 0.0
        self._installed = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        took = time.perf_counter() - self._began
        if _quiet:
            return
        g = min(int(info.get("generation", 2)), 2)
        if self.slow_ms is not None and took * 1e3 > self.slow_ms:
            log.warning(
                "garbage collection of generation %d took %.1f ms (%d objects collected)",
                g, took * 1e3, int(info.get("collected", 0)),
            )  # fmt: skip
        self.count[g] += 1
        self.total_s[g] += took
        self.max_s[g] = max(self.max_s[g], took)

    def install(self) -> PauseMonitor:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def snapshot(self) -> dict[str, Any]:
        """Collections so far, per generation: how many, their total and longest pause (ms);
        and how many objects are frozen."""
        return {
            "collections": list(self.count),
            "total_ms": [t * 1e3 for t in self.total_s],
            "max_ms": [t * 1e3 for t in self.max_s],
            "frozen_objects": gc.get_freeze_count(),
        }


_monitor: PauseMonitor | None = None
_lock = threading.Lock()


def monitor(slow_ms: float | None = None) -> PauseMonitor:
    """This process's monitor, installed on first use (``slow_ms``: see
    :class:`PauseMonitor`; the first caller's, or a later one's where that gave none)."""
    global _monitor
    with _lock:
        if _monitor is None:
            _monitor = PauseMonitor(slow_ms).install()
        elif slow_ms is not None and _monitor.slow_ms is None:
            _monitor.slow_ms = slow_ms
        return _monitor
