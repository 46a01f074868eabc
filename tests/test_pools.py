"""`WorkPool`, the relay's thread pools (msgrelay/pools.py): results and failures come back
through Deferreds, work waits for `start`, threads grow to `max` and no further, the load
figures follow the work, and `stop` lets queued work finish."""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
from twisted.internet import reactor

from msgrelay.pools import Pools, WorkPool, load_of, pool_size, run_in
from msgrelay.settings import SettingError, resolve


def _wait(predicate, what: str, seconds: float = 30.0) -> None:
    event = threading.Event()
    for _ in range(int(seconds * 100)):
        if predicate():
            return
        event.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.ensureDeferred
async def test_results_and_failures_reach_the_reactor_thread():
    pool = WorkPool(0, 2, name="t-results")
    pool.start()
    try:
        assert await run_in(reactor, pool, lambda a, b: (a + b, threading.current_thread().name), 2, 3) == \
            (5, "PoolThread-t-results-0")

        def fails() -> None:
            raise ValueError("from the pool")

        with pytest.raises(ValueError, match="from the pool"):
            await run_in(reactor, pool, fails)
    finally:
        pool.stop()
    assert not pool.started and pool.threads == []


def test_work_waits_for_start_threads_grow_to_max_and_stop_finishes_queued_work():
    pool = WorkPool(0, 2, name="t-grow")
    release = threading.Event()
    results: list[tuple[bool, object]] = []
    for i in range(5):
        pool.callInThreadWithCallback(lambda ok, value: results.append((ok, value)),
                                      lambda n=i: (release.wait(30), n)[1])
    assert pool.threads == [] and pool.q.qsize() == 5  # nothing runs before start
    pool.start()
    _wait(lambda: load_of(pool).busy == 2, "two busy threads")
    load = load_of(pool)
    assert (load.size, load.busy, load.queued) == (2, 2, 3)
    assert len(pool.threads) == 2  # never more than max
    release.set()
    pool.stop()  # queued work runs to the end before the threads go
    assert sorted(results) == [(True, n) for n in range(5)]
    assert all(not thread.is_alive() for thread in threading.enumerate() if "t-grow" in thread.name)
    pool.callInThreadWithCallback(lambda ok, value: results.append((ok, value)), lambda: "late")
    assert len(results) == 5  # a stopped pool takes no more work


def test_an_idle_thread_takes_the_next_work_rather_than_a_new_thread():
    pool = WorkPool(0, 4, name="t-idle")
    pool.start()
    try:
        for _ in range(20):
            done = threading.Event()
            pool.callInThreadWithCallback(lambda ok, value, d=done: d.set(), lambda: None)
            assert done.wait(30)
            _wait(lambda: load_of(pool).busy == 0, "the thread to be idle again")
        assert len(pool.threads) == 1
    finally:
        pool.stop()


def test_crypto_zero_leaves_the_reactor_a_cpu_and_other_sizes_are_as_configured():
    assert [pool_size("crypto", 0, cpus) for cpus in (1, 2, 3, 8)] == [1, 1, 2, 7]
    assert pool_size("crypto", 3, 8) == 3 and pool_size("store", 32, 2) == 32
    names = {"server.name": "relay.test"}
    pools = Pools.from_settings(resolve({}, names), cpus=4)
    assert (pools.crypto.max, pools.store.max, pools.outbox.max) == (3, 32, 4)
    assert Pools.from_settings(resolve({"pools.crypto": 5}, names), cpus=2).crypto.max == 5
    with pytest.raises(SettingError, match="pools.crypto"):
        resolve({"pools.crypto": -1}, names)


def test_each_call_s_wait_for_a_thread_and_its_run_are_added_up_on_the_pool_s_clock():
    now = [100.0]

    def work(seconds: float) -> None:
        now[0] += seconds  # the call "runs" this long on the pool's clock

    pool = WorkPool(0, 1, name="t-times", clock=lambda: now[0])
    for seconds in (2.0, 3.0):
        pool.callInThreadWithCallback(None, work, seconds)
    now[0] += 5.0  # queued while the pool is stopped: both wait
    assert load_of(pool).done == 0
    pool.start()
    pool.stop()  # the queued calls run, one after the other on the one thread
    load = load_of(pool)
    # The first waited 5 s and ran 2; the second waited for the first too (7 s) and ran 3.
    assert (load.done, load.waited, load.ran) == (2, 12.0, 5.0)


def test_a_failed_call_counts_too_and_other_thread_pools_show_no_times():
    pool = WorkPool(0, 1, name="t-failed")
    pool.start()
    try:
        done = threading.Event()

        def fails() -> None:
            raise ValueError("counted")

        pool.callInThreadWithCallback(lambda ok, value: done.set(), fails)
        assert done.wait(30)
        _wait(lambda: load_of(pool).done == 1, "the failed call to be counted")
        assert load_of(pool).ran >= 0 and load_of(pool).waited >= 0
    finally:
        pool.stop()
    from twisted.python.threadpool import ThreadPool
    plain = load_of(ThreadPool(0, 3))
    assert (plain.size, plain.done, plain.waited, plain.ran) == (3, 0, 0.0, 0.0)
