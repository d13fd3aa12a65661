"""The closed loop that keeps queries in flight from one thread."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from recserve.loadgen.closed import closed_loop_inflight


class Server:
    """Answers on a pool of threads after ``delay_s``; records how many were in flight."""

    def __init__(self, delay_s: float = 0.002, fail_every: int = 0, refuse_every: int = 0):
        self.pool = ThreadPoolExecutor(8)
        self.delay_s, self.fail_every, self.refuse_every = delay_s, fail_every, refuse_every
        self.lock = threading.Lock()
        self.calls = self.inflight = self.max_inflight = 0
        self.seen: list[int] = []

    def submit(self, query: int) -> Future[int]:
        with self.lock:
            self.calls += 1
            call = self.calls
        if self.refuse_every and call % self.refuse_every == 0:
            raise RuntimeError("queue full")
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            self.seen.append(query)
        return self.pool.submit(self._answer, query, call)

    def _answer(self, query: int, call: int) -> int:
        time.sleep(self.delay_s)
        with self.lock:
            self.inflight -= 1
        if self.fail_every and call % self.fail_every == 0:
            raise ValueError("bad query")
        return query


def test_keeps_exactly_the_asked_number_in_flight_and_cycles_the_queries() -> None:
    server = Server()
    out = closed_loop_inflight(server.submit, [10, 11, 12], inflight=4, seconds=0.2)
    assert server.max_inflight == 4 and server.inflight == 0  # every answer awaited
    assert out["errors"] == 0 and out["queries"] == server.calls > 20
    assert server.seen[:6] == [10, 11, 12, 10, 11, 12]
    assert out["qps"] == pytest.approx(out["queries"] / out["seconds"])
    # about inflight / delay answers a second; the pool has room for all of them
    assert out["qps"] < 4 / 0.002


def test_failed_and_refused_queries_are_errors_and_do_not_spin() -> None:
    server = Server(fail_every=3, refuse_every=5)
    out = closed_loop_inflight(server.submit, [1], inflight=2, seconds=0.2)
    assert out["errors"] >= server.calls // 5 > 0
    assert out["queries"] + out["errors"] == server.calls  # each call answered or counted


def test_after_a_refusal_the_loop_waits_for_an_answer() -> None:
    """An engine with room for one query, asked to hold four: each answer frees the room, the
    next send is taken and the one after it refused. Nothing retries in a busy loop."""
    server = Server()
    real = server.submit

    def one_at_a_time(query: int) -> Future[int]:
        with server.lock:
            full = server.inflight >= 1
        if full:
            server.calls += 1
            raise RuntimeError("queue full")
        return real(query)

    out = closed_loop_inflight(one_at_a_time, [1], inflight=4, seconds=0.2)
    assert server.max_inflight == 1 and out["queries"] > 10
    assert out["errors"] <= out["queries"] + 1  # at most one refusal per answer


def test_an_engine_that_refuses_everything_ends_the_loop() -> None:
    def refuse(query: int) -> Future[int]:
        raise RuntimeError("closed")

    start = time.perf_counter()
    out = closed_loop_inflight(refuse, [1], inflight=8, seconds=5.0)
    assert time.perf_counter() - start < 1.0
    assert out["queries"] == 0 and out["errors"] == 1


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="in flight"):
        closed_loop_inflight(Server().submit, [1], inflight=0, seconds=0.1)
    with pytest.raises(ValueError, match="one query"):
        closed_loop_inflight(Server().submit, [], inflight=1, seconds=0.1)
