"""Busy polling: readiness found while polling, after the poll window, and timeouts kept."""

from __future__ import annotations

import asyncio
import os
import selectors
import socket
import threading
import time

import pytest

from recserve.polling import PollingSelector, default_busy_poll_us, light_load, select_readable


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


@pytest.fixture
def polls(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """The non-blocking selects (polls) the selectors make from here on."""
    base = selectors.DefaultSelector.select
    seen: list[float | None] = []

    def counting(self, timeout=None):  # type: ignore[no-untyped-def]
        if timeout == 0:
            seen.append(timeout)
        return base(self, timeout)

    monkeypatch.setattr(selectors.DefaultSelector, "select", counting)
    return seen


@pytest.mark.parametrize("rule", ["busy flag", "light load"])
def test_polling_selector_polls_only_while_busy(polls: list[float | None], rule: str) -> None:
    """It polls through its window while ``busy()``, and makes one plain wait when not: with a
    plain flag, and with the light-load rule (one answer outstanding, then three)."""
    state = {"busy": True, "outstanding": 1}
    if rule == "busy flag":
        busy = lambda: bool(state["busy"])  # noqa: E731
    else:
        busy = lambda: light_load(state["outstanding"], 1)  # noqa: E731
    a, b = socket.socketpair()
    selector = PollingSelector(0.02, busy=busy)
    try:
        selector.register(a, 1)
        assert selector.select(0.04) == []
        assert len(polls) > 5  # polled through its window, then waited
        polls.clear()
        state.update(busy=False, outstanding=3)
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


@pytest.mark.parametrize(
    ("outstanding", "limit", "expected"),
    [(0, 1, False), (1, 1, True), (2, 1, False), (0, 0, False), (5, 0, True), (3, 4, True)],
)
def test_light_load_polls_with_one_to_limit_answers_outstanding(
    outstanding: int, limit: int, expected: bool
) -> None:
    assert light_load(outstanding, limit) is expected


@pytest.mark.parametrize(("cores", "expected"), [(2, 0), (7, 0), (8, 1000), (16, 1000), (None, 0)])
def test_busy_polling_is_on_by_default_only_on_machines_with_cores_to_spare(
    monkeypatch: pytest.MonkeyPatch, cores: int | None, expected: int
) -> None:
    from recserve.engine.config import EngineConfig
    from recserve.server.settings import ServingConfig

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert default_busy_poll_us() == expected
    assert ServingConfig().busy_poll_us == expected
    assert EngineConfig().busy_poll_us == 0  # in-process engines: off unless asked for
    with pytest.raises(ValueError, match="busy_poll_max_outstanding"):
        EngineConfig(busy_poll_max_outstanding=-1)
    with pytest.raises(ValueError, match="busy_poll_max_outstanding"):
        ServingConfig(busy_poll_max_outstanding=-1)
