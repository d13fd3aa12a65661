"""The collector's pause monitor, and freezing the objects alive after start-up."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from recserve import gcpause


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_monitor_counts_and_times_each_generation() -> None:
    mon = gcpause.PauseMonitor().install()
    try:
        before = mon.snapshot()
        gc.collect(0)
        gc.collect(2)
        after = mon.snapshot()
    finally:
        mon.uninstall()
    assert after["collections"][0] == before["collections"][0] + 1
    assert after["collections"][2] == before["collections"][2] + 1
    assert after["max_ms"][2] > 0 and after["total_ms"][2] >= after["max_ms"][2]
    gc.collect(2)
    assert mon.snapshot()["collections"][2] == after["collections"][2]  # uninstalled


def test_frozen_objects_are_skipped_until_unfrozen(thawed: None) -> None:
    node = Node()
    ref = weakref.ref(node)
    frozen = gcpause.freeze()
    assert frozen == gc.get_freeze_count() > 0
    assert not any(o is node for o in gc.get_objects(generation=2))  # not scanned any more
    del node
    gc.collect()
    assert ref() is not None  # frozen while alive: kept even as garbage
    gcpause.unfreeze()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None


def test_process_monitor_is_installed_once() -> None:
    assert gcpause.monitor() is gcpause.monitor()
    assert gc.callbacks.count(gcpause.monitor()._callback) == 1


def test_a_slow_collection_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    mon = gcpause.PauseMonitor(slow_ms=0.0).install()
    try:
        with caplog.at_level("WARNING", logger="recserve.gcpause"):
            gc.collect(2)
    finally:
        mon.uninstall()
    assert any("garbage collection of generation 2 took" in r.message for r in caplog.records)


def test_the_freeze_collection_is_not_counted_as_a_pause(thawed: None) -> None:
    mon = gcpause.PauseMonitor().install()
    try:
        gcpause.freeze()
    finally:
        mon.uninstall()
    assert mon.snapshot()["collections"] == [0, 0, 0]
