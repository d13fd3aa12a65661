"""Busy polling: wait for a file descriptor by polling it, without sleeping, for a while first.

A query crosses several processes (client, front end, engine, GPU runner) and each hand-off
wakes a thread that was asleep in the kernel. On an otherwise idle machine that costs far more
than a back-to-back round trip shows (on the H200 machine a unix-socket round trip between two
processes takes 12 µs back to back, 51 µs after 0.5 ms idle and 108 µs after 10 ms idle:
``benchmarks/probe_wakeup.py``), and the code that runs just after a wake-up runs slower too.
Polling for the answer a process is waiting for keeps its core awake over that wait, at the
price of that core's time. Like Linux's ``net.core.busy_poll``, that trade pays only when a
core is free, so a process polls only under a light load: while it has at least one and at
most ``busy_poll_max_outstanding`` answers outstanding (:func:`light_load`). Under a heavy
load there is always an answer on its way, polling would take cores the other processes need,
and a process waits in the kernel as before. The server's default window
(:func:`default_busy_poll_us`) is 1 ms on a machine of at least 8 cores, else off; an engine
made in the caller's process polls only when asked to.
"""

from __future__ import annotations

import os
import select
import selectors
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

LOCK_HANDOFF_S = 1e-4
"""Switch interval for processes whose threads must hand the interpreter lock to each other
promptly (:func:`prompt_lock_handoff`)."""


def prompt_lock_handoff(interval_s: float = LOCK_HANDOFF_S) -> float:
    """Make this process's interpreter lock change hands within ``interval_s`` when a thread
    waits for it, and return the interval.

    CPython gives the lock to a waiting thread only when the holder blocks for real or when
    the waiter has waited a whole switch interval (5 ms by default) without the lock changing
    hands. A holder that makes system calls which return at once (a read of data already
    there) releases and retakes the lock each time, which counts as a change of hands, so a
    waiter can wait as long as the holder stays busy. ``benchmarks/probe_gil_handoff.py``
    shows it: with 300 µs of Python between such calls, a thread woken every 2 ms ran 1.5 s
    late at 5 ms, 0.5 s late at 500 µs, and 0.2 ms late at 100 µs. An interval shorter than
    the holder's stretches of Python between calls bounds the wait."""
    sys.setswitchinterval(interval_s)
    return sys.getswitchinterval()


POLL_MIN_CORES = 8
"""The fewest cores on which busy polling is on by default."""
DEFAULT_POLL_US = 1000


def default_busy_poll_us() -> int:
    """The default poll window: :data:`DEFAULT_POLL_US` on a machine of at least
    :data:`POLL_MIN_CORES` cores (a poller then leaves the others free), else 0 (off)."""
    return DEFAULT_POLL_US if (os.cpu_count() or 1) >= POLL_MIN_CORES else 0


def light_load(outstanding: int, limit: int) -> bool:
    """Whether a process with ``outstanding`` answers on their way may poll for them: at least
    one, and at most ``limit`` (0: any number)."""
    return outstanding > 0 and (limit <= 0 or outstanding <= limit)


def poll_then_wait(
    wait: Callable[[float | None], list[T]],
    timeout: float | None,
    spin_s: float,
    busy: Callable[[], bool] = lambda: True,
) -> list[T]:
    """``wait(timeout)``, but first ``wait(0)`` again and again, without sleeping, for up to
    ``spin_s`` seconds (at most ``timeout``) while ``busy()``."""
    if spin_s <= 0 or (timeout is not None and timeout <= 0) or not busy():
        return wait(timeout)
    start = time.perf_counter()
    spin = spin_s if timeout is None else min(spin_s, timeout)
    while True:
        ready = wait(0)
        if ready:
            return ready
        if time.perf_counter() - start >= spin or not busy():
            break
    if timeout is not None:
        timeout = max(0.0, timeout - (time.perf_counter() - start))
    return wait(timeout)


def select_readable(fds: Sequence[Any], timeout: float | None, spin_s: float) -> list[Any]:
    """``select.select(fds, [], [], timeout)[0]``, polling without sleeping for the first
    ``spin_s`` seconds (at most ``timeout``)."""
    return poll_then_wait(lambda t: select.select(fds, [], [], t)[0], timeout, spin_s)


class PollingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The platform's selector, polling without sleeping for up to ``spin_s`` before a wait
    whenever ``busy()`` says the process has work outstanding (for an asyncio event loop:
    ``asyncio.SelectorEventLoop(PollingSelector(...))``)."""

    def __init__(self, spin_s: float, busy: Callable[[], bool] = lambda: True) -> None:
        super().__init__()
        self.spin_s = spin_s
        self.busy = busy

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        return poll_then_wait(super().select, timeout, self.spin_s, self.busy)
