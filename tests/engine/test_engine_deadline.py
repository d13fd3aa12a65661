"""The loop does not spin while a GPU batch waits for a busy runner."""

from __future__ import annotations

from recserve.engine.core import EngineCore


class _FullRunner:
    def free_slots(self) -> int:
        return 0


class _Sched:
    def next_deadline(self) -> float:
        return 0.0  # long past: the batch would go now if a slot were free


def test_no_deadline_while_every_gpu_slot_is_busy() -> None:
    core = EngineCore.__new__(EngineCore)
    core.gpu = _FullRunner()  # type: ignore[assignment]
    core.scheduler = _Sched()  # type: ignore[assignment]
    assert core.next_deadline() is None
    core.gpu = None  # no runner: the scheduler's deadline stands
    assert core.next_deadline() == 0.0
