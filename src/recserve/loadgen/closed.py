"""A closed loop that keeps a number of queries in flight from one thread.

Saturation is measured with closed loops: each answer lets the next query go. With one
blocking caller thread per query in flight, every answer wakes a thread, and in the engine's
own process those threads take the interpreter lock from the engine. Here the answers come
back through one queue to one thread, which sends the next query at once: the load costs
the engine's process one wake-up per answer, however many queries are in flight.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

Q = TypeVar("Q")


def closed_loop_inflight(
    submit: Callable[[Q], Future[Any]],
    queries: Sequence[Q],
    inflight: int,
    seconds: float,
) -> dict[str, Any]:
    """Send ``queries`` in turn, keeping ``inflight`` of them outstanding, for ``seconds``;
    then wait for the last answers. A query that ``submit`` refuses (it raises) or that fails
    counts as an error and is replaced by the next one. QPS counts answered queries over the
    whole time, the wait for the last answers included. After a refusal the loop waits for an
    answer before it sends again, and with nothing in flight it stops."""
    if inflight < 1 or not queries:
        raise ValueError("closed loop: needs at least one query in flight and one query")
    answers: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
    answered = errors = 0
    sent = outstanding = 0
    start = time.perf_counter()
    stop = start + seconds

    def send() -> bool:
        nonlocal sent, outstanding, errors
        query = queries[sent % len(queries)]
        sent += 1
        try:
            future = submit(query)
        except Exception:
            errors += 1
            return False
        outstanding += 1
        future.add_done_callback(answers.put)
        return True

    def refill() -> None:
        # after a refusal, wait for an answer before trying again
        while outstanding < inflight and time.perf_counter() < stop and send():
            pass

    refill()
    while outstanding:
        future = answers.get()
        outstanding -= 1
        if future.exception() is None:
            answered += 1
        else:
            errors += 1
        refill()
    elapsed = time.perf_counter() - start
    return {
        "qps": answered / elapsed,
        "queries": answered,
        "errors": errors,
        "seconds": elapsed,
        "inflight": inflight,
    }
