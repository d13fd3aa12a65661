"""Busy polling: readiness found while polling, after the poll window, and timeouts kept."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time

import pytest

from recserve.polling import PollingSelector, select_readable


@pytest.mark.parametrize("spin_s", [0.0, 0.02])
def test_select_readable_finds_data_sent_during_and_after_the_poll(spin_s: float) -> None:
    a, b = socket.socketpair()
    try:
        b.send(b"x")
        assert select_readable([a], None, spin_s) == [a]  # already there
        a.recv(1)
        for delay in (0.005, 0.05):  # within the poll window, and after it (blocking wait)
            timer = threading.Timer(delay, b.send, args=(b"y",))
            timer.start()
            start = time.perf_counter()
            assert select_readable([a], 5.0, spin_s) == [a]
            assert time.perf_counter() - start < 2.0
            a.recv(1)
            timer.join()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("spin_s", [0.0, 0.01, 0.5])
def test_select_readable_keeps_the_timeout(spin_s: float) -> None:
    a, b = socket.socketpair()
    try:
        start = time.perf_counter()
        assert select_readable([a], 0.05, spin_s) == []
        elapsed = time.perf_counter() - start
        assert 0.045 <= elapsed < 1.0  # a poll window longer than the timeout stops at it
        assert select_readable([a], 0, spin_s) == []
    finally:
        a.close()
        b.close()


def test_polling_selector_drives_an_event_loop() -> None:
    selector = PollingSelector(0.01)

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        try:
            loop.call_later(0.03, b.send, b"ping")
            return await loop.sock_recv(a, 4)
        finally:
            a.close()
            b.close()

    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
        assert runner.run(main()) == b"ping"


def test_polling_selector_polls_only_while_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    base = selectors.DefaultSelector.select
    polls: list[float | None] = []

    def counting(self, timeout=None):  # type: ignore[no-untyped-def]
        if timeout == 0:
            polls.append(timeout)
        return base(self, timeout)

    monkeypatch.setattr(selectors.DefaultSelector, "select", counting)
    a, b = socket.socketpair()
    selector = PollingSelector(0.02, busy=lambda: True)
    try:
        selector.register(a, 1)
        assert selector.select(0.04) == []
        assert len(polls) > 5  # polled through its window, then waited
        polls.clear()
        selector.busy = lambda: False
        assert selector.select(0.04) == []
        assert polls == []  # not busy: one plain wait
    finally:
        selector.close()
        a.close()
        b.close()


def test_polling_selector_returns_ready_events_and_respects_timeouts() -> None:
    selector = PollingSelector(0.05)
    a, b = socket.socketpair()
    try:
        selector.register(a, 1)
        start = time.perf_counter()
        assert selector.select(0.02) == []
        assert 0.015 <= time.perf_counter() - start < 1.0
        b.send(b"x")
        ready = selector.select(1.0)
        assert [key.fileobj for key, _ in ready] == [a]
        selector.busy = lambda: False  # not busy: no polling, same answers
        assert [key.fileobj for key, _ in selector.select(1.0)] == [a]
    finally:
        selector.close()
        a.close()
        b.close()
