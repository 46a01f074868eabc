"""The garbage collector's pauses and the frozen start-up heap (msgrelay/heap.py). The live
relay's side (a real `twistd msgrelay` freezes its start-up heap and serves the figures) is in
test_metrics.py."""

from __future__ import annotations

import gc
from typing import Iterator

import pytest
from twisted.internet.testing import MemoryReactor

from msgrelay.heap import CollectorPauses, StartUpHeap, pauses, settle


class Ticks:
    def __init__(self, *times: float):
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def test_pauses_are_counted_and_timed_by_generation():
    timed = CollectorPauses(Ticks(10.0, 10.002, 20.0, 20.040, 30.0, 30.010))
    timed("start", {"generation": 0})
    timed("stop", {"generation": 0, "collected": 3})
    timed("start", {"generation": 2})
    timed("stop", {"generation": 2, "collected": 0})
    timed("start", {"generation": 2})
    timed("stop", {"generation": 2, "collected": 0})
    assert timed.collections == [1, 0, 2]
    assert timed.seconds[0] == pytest.approx(0.002) and timed.seconds[2] == pytest.approx(0.050)
    assert timed.longest == [pytest.approx(0.002), 0.0, pytest.approx(0.040)]


def test_a_stop_without_its_start_is_not_counted():
    """Installed while a collection ran: its stop comes alone."""
    timed = CollectorPauses(Ticks())
    timed("stop", {"generation": 2, "collected": 0})
    assert timed.collections == [0, 0, 0]


def test_the_process_timer_sees_real_collections():
    timed = pauses()
    assert pauses() is timed and gc.callbacks.count(timed) == 1  # one per process
    before = list(timed.collections)
    gc.collect(1)
    gc.collect()
    # At least these two: the test's own allocations may start more.
    assert timed.collections[1] >= before[1] + 1 and timed.collections[2] >= before[2] + 1
    assert timed.longest[2] > 0


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """The test process's heap as it was: what a test froze is given back to the collector."""
    yield
    gc.unfreeze()


def test_settle_freezes_what_is_alive_and_collects_the_rest(unfrozen):
    class Cycle:
        pass

    garbage = Cycle()
    garbage.me = garbage  # type: ignore[attr-defined]
    kept = Cycle()
    kept.me = kept  # type: ignore[attr-defined]
    del garbage
    assert settle() > 0  # how many may drop at once: reference counting still frees frozen objects
    assert not [o for o in gc.get_objects() if type(o) is Cycle]  # kept is frozen, garbage gone
    gc.unfreeze()
    assert [o for o in gc.get_objects() if type(o) is Cycle] == [kept]  # the garbage cycle was collected


def test_the_start_up_heap_settles_once_the_reactor_runs(unfrozen):
    reactor = MemoryReactor()
    service = StartUpHeap(reactor)
    service.startService()
    assert service.settled is None and len(reactor.whenRunningHooks) == 1
    function, args, kwargs = reactor.whenRunningHooks[0]
    function(*args, **kwargs)
    assert service.settled is not None and service.settled > 0 and gc.get_freeze_count() > 0


def test_a_relay_started_inside_a_running_program_leaves_its_heap_alone():
    reactor = MemoryReactor()
    reactor.running = True
    StartUpHeap(reactor).startService()
    assert reactor.whenRunningHooks == []
