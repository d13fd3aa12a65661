"""RecEngine with real worker processes and the runner on the CPU (a tiny model)."""

from __future__ import annotations

import dataclasses
import gc
import os
import select
import signal
import threading
import time
from concurrent.futures import Future

import pytest
import torch
from engine_fakes import FailOnSize, Slow

from recserve.engine import EngineConfig, RecEngine, SchedConfig
from recserve.engine.interface import EngineClosed, InferenceEngine, Overloaded
from recserve.loadgen.synthetic import QueryFactory
from recserve.models.registry import build_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model("dlrm-rmc2", preset="tiny", seed=3)


@pytest.fixture(scope="module")
def engine(model):
    eng = RecEngine(
        model, EngineConfig(SchedConfig(sub_batch_size=16), cpu_workers=2, device="cpu")
    )
    yield eng
    eng.close()


def reference(model, batches):
    with torch.inference_mode():
        return [model(b) for b in batches]


@pytest.mark.parametrize(
    "sched",
    [
        SchedConfig(sub_batch_size=16),
        SchedConfig(sub_batch_size=None),
        SchedConfig(sub_batch_size=7, gpu_threshold=100),
        SchedConfig(sub_batch_size=32, gpu_threshold=0, gpu_max_batch=2048, gpu_max_delay=0.01),
    ],
    ids=["split", "whole", "split+runner", "coalesced"],
)
def test_every_item_is_answered_once_in_order(engine, model, sched) -> None:
    assert isinstance(engine, InferenceEngine)
    factory = QueryFactory(model.config, "zipf:1.05", seed=11)
    batches = [factory.make(n) for n in (1, 15, 16, 17, 100, 333)]
    engine.set_schedule(sched)
    futures = [engine.submit(b) for b in batches]
    for fut, ref in zip(futures, reference(model, batches), strict=True):
        torch.testing.assert_close(fut.result(timeout=30), ref, rtol=1e-5, atol=1e-6)
    stats = engine.stats()
    assert stats["in_system"] == 0 and stats["failed"] == 0


def test_submissions_from_many_threads(engine, model) -> None:
    engine.set_schedule(SchedConfig(sub_batch_size=8, gpu_threshold=50))
    factory = QueryFactory(model.config, seed=12)
    batches = [factory.make(n) for n in range(1, 81)]
    refs = reference(model, batches)
    futures: list[Future[torch.Tensor] | None] = [None] * len(batches)

    def send(start: int) -> None:
        for i in range(start, len(batches), 4):
            futures[i] = engine.submit(batches[i])

    threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fut, ref in zip(futures, refs, strict=True):
        assert fut is not None
        torch.testing.assert_close(fut.result(timeout=30), ref, rtol=1e-5, atol=1e-6)


def test_a_failing_sub_batch_fails_only_its_query(model) -> None:
    broken = FailOnSize(model, size=5)
    with RecEngine(
        broken, EngineConfig(SchedConfig(sub_batch_size=10), cpu_workers=2, device="none")
    ) as eng:
        factory = QueryFactory(model.config, seed=13)
        bad, good = factory.make(25), factory.make(20)  # 25 -> 10, 10, 5: the last part fails
        f_bad, f_good = eng.submit(bad), eng.submit(good)
        with pytest.raises(RuntimeError, match="refusing 5 items"):
            f_bad.result(timeout=30)
        torch.testing.assert_close(f_good.result(timeout=30), reference(model, [good])[0])
        assert eng.stats()["failed"] == 1


def test_overload_is_refused_at_once_and_nothing_is_lost(model) -> None:
    slow = Slow(model, delay=0.2)
    config = EngineConfig(
        SchedConfig(sub_batch_size=None), cpu_workers=1, device="none", queue_capacity=3
    )
    with RecEngine(slow, config) as eng:
        batch = QueryFactory(model.config, seed=14).make(4)
        accepted, refused = [], 0
        for _ in range(10):
            try:
                accepted.append(eng.submit(batch))
            except Overloaded as err:
                assert "queue full" in str(err)
                refused += 1
        assert (len(accepted), refused) == (3, 7)
        for fut in accepted:
            assert fut.result(timeout=30).shape == (4, 1)
        stats = eng.stats()
        assert (stats["accepted"], stats["rejected"], stats["completed"]) == (3, 7, 3)
        eng.submit(batch).result(timeout=30)  # room again once answered


@pytest.mark.parametrize("drain", [True, False])
def test_close_with_requests_in_flight_answers_every_one(model, drain: bool) -> None:
    slow = Slow(model, delay=0.05)
    config = EngineConfig(
        SchedConfig(sub_batch_size=4, gpu_threshold=30), cpu_workers=2, device="cpu"
    )
    eng = RecEngine(slow, config)
    factory = QueryFactory(model.config, seed=15)
    futures = [eng.submit(factory.make(n)) for n in (8, 12, 40, 3, 9, 31, 5)]
    eng.close(drain=drain)
    assert all(f.done() for f in futures)
    results = [f.exception() is None for f in futures]
    if drain:
        assert all(results)
    else:
        assert not all(results)
        for f in futures:
            if f.exception() is not None:
                assert isinstance(f.exception(), EngineClosed)
    with pytest.raises(EngineClosed):
        eng.submit(factory.make(1))
    assert eng.cpu_pool is not None
    assert all(not p.is_alive() for p in eng.cpu_pool._procs)


def test_weights_are_shared_by_the_workers(engine) -> None:
    pool = engine.cpu_pool
    pool.touch_weights()
    memory = pool.memory()
    assert len(memory) == 2
    for m in memory:
        assert m["shared"] > 0 and m["pss"] < m["rss"]


def test_oversized_requests_are_refused(engine, model) -> None:
    with pytest.raises(ValueError, match="must be 1 to 1024"):
        engine.submit(QueryFactory(model.config, seed=1).make(1025))


@pytest.mark.parametrize("depth", [1, 3])
def test_queue_depth_per_worker(model, depth: int) -> None:
    """Each worker holds up to ``depth`` sub-batches; a burst larger than that is still answered
    in full and in order, and the pool's free capacity comes back when it drains."""
    config = EngineConfig(
        SchedConfig(sub_batch_size=4), cpu_workers=2, device="none", cpu_queue_depth=depth
    )
    factory = QueryFactory(model.config, "uniform", seed=12)
    batches = [factory.make(n) for n in (9, 1, 30, 4, 17, 2, 25)]
    with RecEngine(model, config) as eng:
        pool = eng.cpu_pool
        assert pool is not None and pool.idle_workers() == 2 * depth
        futures = [eng.submit(b) for b in batches]
        for fut, ref in zip(futures, reference(model, batches), strict=True):
            torch.testing.assert_close(fut.result(timeout=30), ref, rtol=1e-5, atol=1e-6)
        assert eng.stats()["in_system"] == 0
    with pytest.raises(ValueError, match="cpu_queue_depth"):
        EngineConfig(cpu_queue_depth=0)


def test_a_dead_worker_fails_what_it_held_and_the_rest_is_served(model) -> None:
    slow = Slow(model, delay=0.3)
    config = EngineConfig(
        SchedConfig(sub_batch_size=None), cpu_workers=2, device="none", cpu_queue_depth=2
    )
    factory = QueryFactory(model.config, seed=15)
    with RecEngine(slow, config) as eng:
        pool = eng.cpu_pool
        assert pool is not None
        futures = [eng.submit(factory.make(3)) for _ in range(4)]  # two per worker
        time.sleep(0.1)
        os.kill(pool.pids[0], signal.SIGKILL)
        outcomes = []
        for fut in futures:
            err = fut.exception(timeout=30)
            outcomes.append(type(err).__name__ if err is not None else "ok")
        assert outcomes.count("ok") == 2 and outcomes.count("WorkerDied") == 2
        assert eng.submit(factory.make(2)).result(timeout=30).shape == (2, 1)  # still serving


def test_shared_model_file_holds_only_tensors(model, tmp_path) -> None:
    """A recserve model reaches the workers as config + state dict (restricted unpickler)."""
    from recserve.engine.shared import load_shared_model, save_shared_model, unlink_shared_model

    path = save_shared_model(model, tmp_path)
    state = torch.load(path, weights_only=True)  # would raise on anything but tensors
    assert set(state) == set(model.state_dict())
    loaded = load_shared_model(path)
    batch = QueryFactory(model.config, seed=16).make(9)
    with torch.inference_mode():
        assert torch.equal(loaded(batch), model(batch))
    unlink_shared_model(path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("runner", ["process", "thread"])
def test_runner_process_and_threads_answer_alike(model, runner: str) -> None:
    """Coalesced batches through the runner (its own process, or threads of the engine's)
    answer what the model answers, and a failing batch fails only its own queries."""
    broken = FailOnSize(model, size=5)
    sched = SchedConfig(sub_batch_size=None, gpu_threshold=0, gpu_max_batch=1)
    config = EngineConfig(sched, cpu_workers=0, device="cpu", gpu_runner=runner)
    factory = QueryFactory(model.config, "zipf:1.05", seed=17)
    batches = [factory.make(n) for n in (3, 5, 64, 1, 5, 200)]
    with RecEngine(broken, config) as eng:
        if runner == "process":
            assert eng.gpu_runner is not None and eng.gpu_runner.pid != os.getpid()
        futures = [eng.submit(b) for b in batches]
        for fut, batch, ref in zip(futures, batches, reference(model, batches), strict=True):
            if batch.batch_size == 5:  # the process reports the error by its text
                with pytest.raises((RuntimeError, ValueError), match="refusing 5 items"):
                    fut.result(timeout=30)
            else:
                torch.testing.assert_close(fut.result(timeout=30), ref, rtol=1e-5, atol=1e-6)
        assert eng.stats()["failed"] == 2


def test_a_dead_runner_process_fails_what_it_held_and_cpu_work_goes_on(model) -> None:
    slow = Slow(model, delay=0.3)
    sched = SchedConfig(sub_batch_size=None, gpu_threshold=10, gpu_max_batch=1)
    config = EngineConfig(sched, cpu_workers=1, device="cpu", gpu_runner="process")
    factory = QueryFactory(model.config, seed=18)
    with RecEngine(slow, config) as eng:
        runner = eng.gpu_runner
        assert runner is not None
        held = [eng.submit(factory.make(20)) for _ in range(2)]  # both slots of the runner
        time.sleep(0.1)
        os.kill(runner.pid, signal.SIGKILL)
        for fut in held:
            assert type(fut.exception(timeout=30)).__name__ == "RunnerDied"
        later = eng.submit(factory.make(20))  # answered with the error at once, not stranded
        assert type(later.exception(timeout=30)).__name__ == "RunnerDied"
        assert eng.submit(factory.make(3)).result(timeout=30).shape == (3, 1)  # CPU still serves


def test_runner_config_is_checked() -> None:
    with pytest.raises(ValueError, match="gpu_runner"):
        EngineConfig(gpu_runner="fiber")
    with pytest.raises(ValueError, match="gpu_max_inflight"):
        EngineConfig(gpu_max_inflight=0)


def test_runner_replies_are_read_whole_across_partial_reads() -> None:
    """Reply records (an error text of any length included) come out whole and in order,
    however the socket splits the bytes."""
    from recserve.engine.gpu_process import pack_reply, take_replies

    records = [
        (0, 0, None, 5, 0),
        (2, 3, "GPU runner: ValueError: é" * 300, 12_345, 0),
        (1, 1, None, 2**40, 7),
        (0, 2, "x", 0, 3),
    ]
    stream = b"".join(pack_reply(slot, err, route, h, w) for slot, route, err, h, w in records)
    for step in (1, 7, 16, 100, len(stream)):
        buf, got = bytearray(), []
        for start in range(0, len(stream), step):
            buf += stream[start : start + step]
            got += take_replies(buf)
        assert got == records and not buf


def test_stop_is_not_lost_between_the_loop_check_and_its_clear(model) -> None:
    """``close`` sets the stop flag, then wakes the loop. If both land just before the loop
    clears its wake-ups, the loop must still see the flag (it used to sleep forever)."""
    config = EngineConfig(cpu_workers=0, device="cpu", gpu_runner="thread")
    eng = RecEngine(model, config)
    real_clear, armed = eng._waker.clear, [False]

    def racing_clear() -> None:
        if armed[0]:  # close's two steps, right before the loop clears
            armed[0] = False
            eng._stop = True
            eng._waker.wake()
        real_clear()

    try:
        eng._waker.clear = racing_clear  # type: ignore[method-assign]
        # A round trip through the loop: from here on its next clear is the patched one.
        eng.set_schedule(SchedConfig(sub_batch_size=None, gpu_threshold=0))
        armed[0] = True
        eng._waker.wake()
        eng._thread.join(timeout=10)
        assert not eng._thread.is_alive()
    finally:
        eng._stop = True
        eng._waker.wake()
        eng._thread.join(timeout=10)
        eng._shutdown_executors()


def test_waker_writes_once_until_cleared_and_keeps_a_late_wake_up() -> None:
    from recserve.engine.engine import _Waker

    def pending(w: _Waker) -> bool:
        return bool(select.select([w.fd], [], [], 0)[0])

    w = _Waker()
    try:
        for _ in range(3):
            w.wake()
        assert os.read(w.fd, 100) == b"x"  # three wake-ups, one write
        w.wake()  # armed: no write, the loop has not cleared yet
        assert not pending(w)
        w.clear()
        w.wake()  # cleared: written again
        assert pending(w)
        w.clear()
        assert not pending(w)

    finally:
        w.close()


def test_calibration_measures_the_loop_per_dispatch(engine, model) -> None:
    """The simulator's service model: executor seconds per unit of work, and the engine loop's
    own CPU seconds per dispatch (what the CPU workers and the GPU runner share)."""
    from recserve.engine.calibrate import calibrate

    before = engine.stats()["loop_cpu_s"]
    cal = calibrate(engine, QueryFactory(model.config, seed=9), (4, 32), (16,), waves=3)
    assert engine.stats()["loop_cpu_s"] > before
    service = cal.service
    assert service.gpu is not None and cal.queries == 3 * 2 * 2 + 3 * 4
    # CPU seconds of the loop per dispatch: some, and far less than a second (the executors'
    # own seconds come from a few completion gaps here, too noisy to compare with)
    assert 0 < service.host_cpu < 0.05 and 0 < service.host_gpu < 0.05


@pytest.mark.parametrize("freeze", [True, False])
def test_engine_freezes_the_collector_while_it_runs(model, freeze: bool) -> None:
    gc.unfreeze()
    config = EngineConfig(SchedConfig(sub_batch_size=None), cpu_workers=1, device="cpu")
    config = dataclasses.replace(config, gc_freeze=freeze)
    with RecEngine(model, config) as eng:
        batch = QueryFactory(model.config, "uniform", seed=1).make(8)
        eng.submit(batch).result(timeout=60)
        stats = eng.stats()["gc"]
        assert (stats["frozen_objects"] > 0) is freeze
        assert len(stats["collections"]) == 3
    assert gc.get_freeze_count() == 0  # handed back on close: a closed engine can be freed
