"""The scheduler alone: splitting, FIFO order, routing by T, GPU coalescing and its delay."""

from __future__ import annotations

import pytest

from recserve.engine.config import SchedConfig
from recserve.engine.request import Query
from recserve.engine.scheduler import Scheduler


def q(i: int, n: int, t: float = 0.0) -> Query:
    return Query(i, n, t)


def spans(subs) -> list[tuple[int, int, int]]:
    return [(s.query.id, s.start, s.stop) for s in subs]


def test_queries_are_split_into_b_sized_sub_batches_in_order() -> None:
    s = Scheduler(SchedConfig(sub_batch_size=32))
    s.add(q(0, 100))
    s.add(q(1, 40))
    first = s.schedule(0.0, idle_workers=3, gpu_slots=0)
    assert spans(first.cpu) == [(0, 0, 32), (0, 32, 64), (0, 64, 96)]
    rest = s.schedule(0.0, idle_workers=8, gpu_slots=0)
    assert spans(rest.cpu) == [(0, 96, 100), (1, 0, 32), (1, 32, 40)]
    assert s.num_waiting == 0 and not s.schedule(0.0, 8, 0)


def test_no_split_runs_each_query_whole() -> None:
    s = Scheduler(SchedConfig(sub_batch_size=None))
    for i, n in enumerate((700, 3)):
        s.add(q(i, n))
    assert spans(s.schedule(0.0, 4, 0).cpu) == [(0, 0, 700), (1, 0, 3)]


def test_threshold_routes_large_queries_whole_to_the_gpu() -> None:
    s = Scheduler(SchedConfig(sub_batch_size=64, gpu_threshold=200), has_gpu=True)
    s.add(q(0, 199))
    s.add(q(1, 200))
    out = s.schedule(0.0, idle_workers=8, gpu_slots=1)
    assert spans(out.cpu) == [(0, 0, 64), (0, 64, 128), (0, 128, 192), (0, 192, 199)]
    assert [[x.id for x in b] for b in out.gpu] == [[1]]


def test_threshold_zero_sends_everything_to_the_gpu_and_none_keeps_it_on_the_cpu() -> None:
    s = Scheduler(SchedConfig(gpu_threshold=0), has_gpu=True)
    s.add(q(0, 1))
    assert s.schedule(0.0, 4, 1).gpu
    s = Scheduler(SchedConfig(gpu_threshold=None), has_gpu=True)
    s.add(q(0, 1000))
    assert s.schedule(0.0, 4, 1).cpu


def test_gpu_only_engine_routes_everything_to_the_gpu() -> None:
    s = Scheduler(SchedConfig(gpu_threshold=None), has_cpu=False, has_gpu=True)
    s.add(q(0, 5))
    assert [b[0].id for b in s.schedule(0.0, 0, 1).gpu] == [0]


def test_coalescing_fills_up_to_the_cap_and_an_oversized_query_runs_alone() -> None:
    s = Scheduler(SchedConfig(gpu_threshold=0, gpu_max_batch=500), has_gpu=True)
    for i, n in enumerate((200, 250, 100, 900, 10)):
        s.add(q(i, n))
    out = s.schedule(0.0, 0, gpu_slots=3)
    assert [[x.id for x in b] for b in out.gpu] == [[0, 1], [2], [3]]


def test_cap_of_one_disables_coalescing() -> None:
    s = Scheduler(SchedConfig(gpu_threshold=0, gpu_max_batch=1), has_gpu=True)
    for i in range(3):
        s.add(q(i, 50))
    assert [[x.id for x in b] for b in s.schedule(0.0, 0, 3).gpu] == [[0], [1], [2]]


def test_gpu_batches_wait_for_company_until_the_delay_runs_out() -> None:
    s = Scheduler(
        SchedConfig(gpu_threshold=0, gpu_max_batch=1000, gpu_max_delay=0.002), has_gpu=True
    )
    s.add(q(0, 100, t=1.000))
    assert not s.schedule(1.001, 0, 1) and s.next_deadline() == pytest.approx(1.002)
    s.add(q(1, 100, t=1.0015))
    out = s.schedule(1.002, 0, 1)
    assert [[x.id for x in b] for b in out.gpu] == [[0, 1]]
    assert s.next_deadline() is None


def test_a_full_batch_goes_without_waiting() -> None:
    s = Scheduler(SchedConfig(gpu_threshold=0, gpu_max_batch=300, gpu_max_delay=1.0), has_gpu=True)
    s.add(q(0, 200))
    s.add(q(1, 200))
    assert [[x.id for x in b] for b in s.schedule(0.0, 0, 1).gpu] == [[0]]


def test_new_schedule_applies_to_queries_that_arrive_afterwards() -> None:
    s = Scheduler(SchedConfig(sub_batch_size=10))
    s.add(q(0, 20))
    s.set_config(SchedConfig(sub_batch_size=None))
    s.add(q(1, 20))
    assert spans(s.schedule(0.0, 9, 0).cpu) == [(0, 0, 20), (1, 0, 20)]


def test_a_failed_query_is_not_dispatched_further() -> None:
    s = Scheduler(SchedConfig(sub_batch_size=10))
    first = q(0, 30)
    s.add(first)
    s.add(q(1, 10))
    assert spans(s.schedule(0.0, 1, 0).cpu) == [(0, 0, 10)]
    first.finished = 0.5  # failed by its first part
    assert spans(s.schedule(0.0, 5, 0).cpu) == [(1, 0, 10)]


def test_scheduler_needs_an_executor() -> None:
    with pytest.raises(ValueError):
        Scheduler(SchedConfig(), has_cpu=False, has_gpu=False)
