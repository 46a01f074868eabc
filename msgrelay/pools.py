"""One named, sized thread pool per kind of blocking work.

Blocking work never runs on the reactor thread, and never on the reactor's default pool:
each kind has a pool of its own, so a backlog of one kind (a slow disk for the outbox, a
slow database, an expensive decryption) cannot hold up another. Sizes are the `pools.*`
settings; the service tree starts the pools before anything uses them and stops them
last; the metrics show each pool's size, busy threads and queued work, and how long its
work waited for a thread and ran: whether the disk, the database or the CPU holds up the
requests is read off them (docs/operations.md, "Metrics").

- store: every IStore call (maildir file I/O and fsync, PostgreSQL queries);
- outbox: the federation outbox's disk work;
- crypto: CPU work that grows with input size (RSA decryption, sealing big answers);

Name lookups need no pool: they use an asynchronous resolver on the event loop
(federation/resolver.py).

The pools are `WorkPool`s: Twisted thread pools whose hand-off is one queue put. A request
hands work to a pool two to four times, on the reactor thread, and Twisted's own hand-off
(a coordinator, a worker team and a condition-variable queue) cost about 20 us each, which
showed as a tenth of the reactor thread in a profile.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import context
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .settings import Settings

T = TypeVar("T")
log = Logger()

#: A queued call: logging context, result callback, function, positional and keyword arguments,
#: and when it was queued (the pool's clock).
_Work = tuple[Any, Optional[Callable[[bool, Any], object]], Callable[..., Any], tuple, dict, float]


class WorkPool(ThreadPool):
    """A ThreadPool (same use: `deferToThreadPool`, start, stop, `max`, `threads`) handing
    work over through one `SimpleQueue`.

    Threads start as work arrives (up to `max`) and stay. Work queued before `start` waits
    for it; `stop` lets queued work finish, then joins the threads. Results reach
    `onResult` in the worker thread, as with ThreadPool. Each call's time waiting for a
    thread and running is added up (`load_of`), on `clock` (monotonic seconds).
    """

    def __init__(self, minthreads: int = 0, maxthreads: int = 20, name: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(minthreads, maxthreads, name)
        self._work: "queue.SimpleQueue[Optional[_Work]]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads free for work not yet claimed by a call
        self._busy = 0
        self._clock = clock
        self.done = 0  # calls finished (their result handed on)
        self.waited = 0.0  # seconds those calls waited for a thread, all together
        self.ran = 0.0  # seconds they ran (the function, not the result callback)

    @property
    def working(self) -> list[None]:
        return [None] * self._busy

    @property
    def q(self) -> "queue.SimpleQueue[Optional[_Work]]":
        return self._work

    def start(self) -> None:
        self.joined, self.started = False, True
        with self._lock:
            while len(self.threads) < min(self.max, max(self.min, self._work.qsize())):
                self._spawn()

    def stop(self) -> None:
        self.joined, self.started = True, False
        for _ in self.threads:
            self._work.put(None)
        for thread in self.threads:
            thread.join()
        del self.threads[:]
        self._idle = 0

    def callInThreadWithCallback(self, onResult: Optional[Callable[[bool, Any], object]],
                                 func: Callable[..., Any], *args: Any, **kw: Any) -> None:
        if self.joined:
            return
        self._work.put((context.theContextTracker.currentContext().contexts[-1], onResult, func, args, kw,
                        self._clock()))
        if self.started:
            with self._lock:
                if self._idle:
                    self._idle -= 1
                elif len(self.threads) < self.max:
                    self._spawn()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._serve, name=f"PoolThread-{self.name or id(self)}-{len(self.threads)}")
        self.threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        while True:
            work = self._work.get()
            if work is None:
                return
            ctx, on_result, func, args, kw, queued = work
            started = self._clock()
            with self._lock:
                self._busy += 1
                self.waited += started - queued
            try:
                result, ok = context.call(ctx, func, *args, **kw), True
            except BaseException:
                result, ok = Failure(), False
            ran = self._clock() - started
            # Counted before the result is handed on, so whoever sees the result (a request's
            # answer, then a metrics scrape) sees the call counted.
            with self._lock:
                self._busy -= 1
                self._idle += 1
                self.done += 1
                self.ran += ran
            try:
                if on_result is not None:
                    on_result(ok, result)
                elif not ok:
                    log.failure("work in pool {pool} failed", result, pool=self.name)
            except BaseException:
                log.failure("the result callback of pool {pool} failed", pool=self.name)
            del work, result, on_result


@dataclass(frozen=True)
class PoolLoad:
    """What the metrics show of one pool."""

    size: int  # the most threads it runs
    busy: int  # threads running work now
    queued: int  # work waiting for a thread
    done: int = 0  # calls finished since start (WorkPool only)
    waited: float = 0.0  # seconds they waited for a thread, all together
    ran: float = 0.0  # seconds they ran, all together


def load_of(pool: ThreadPool) -> PoolLoad:
    """What the metrics show of `pool` (a WorkPool or any ThreadPool; the times only of a
    WorkPool)."""
    if isinstance(pool, WorkPool):
        with pool._lock:
            done, waited, ran = pool.done, pool.waited, pool.ran
        return PoolLoad(pool.max, len(pool.working), pool.q.qsize(), done, waited, ran)
    return PoolLoad(pool.max, len(pool.working), pool.q.qsize())


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and systemd's
    CPUAffinity= narrow), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pool_size(name: str, configured: int, cpus: Optional[int] = None) -> int:
    """The threads pool `name` runs: as configured, except `pools.crypto = 0`, which leaves
    the reactor thread a CPU of its own. Decryptions release the GIL and run in parallel, but
    one more of them than there are spare CPUs takes the CPU from the event loop that every
    request waits on: on two CPUs one crypto thread accepted 7-15% more packets than two
    (bench/README.md)."""
    if name == "crypto" and configured == 0:
        return max(1, (usable_cpus() if cpus is None else cpus) - 1)
    return configured


@dataclass(frozen=True)
class Pools:
    """The relay's thread pools, by kind of work (see the module docstring)."""

    store: ThreadPool
    outbox: ThreadPool
    crypto: ThreadPool

    @classmethod
    def from_settings(cls, settings: Settings, cpus: Optional[int] = None) -> "Pools":
        sizes = settings.pools
        return cls(**{f.name: WorkPool(0, pool_size(f.name, getattr(sizes, f.name), cpus), name=f"msgrelay-{f.name}")
                      for f in fields(cls)})

    def by_name(self) -> dict[str, ThreadPool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def loads(self) -> dict[str, PoolLoad]:
        return {name: load_of(pool) for name, pool in self.by_name().items()}


def run_in(reactor: Any, pool: ThreadPool, function: Callable[..., T], *args: Any) -> "Deferred[T]":
    """`function(*args)` in `pool`; the result is delivered on the reactor thread."""
    return deferToThreadPool(reactor, pool, function, *args)


class PoolsService(Service):
    """Starts and stops the pools; `builder.PartsService` stops it only after every part
    that queues work on the pools has stopped."""

    name = "pools"

    def __init__(self, pools: Pools):
        self.pools = pools

    def startService(self) -> None:
        super().startService()
        for pool in self.pools.by_name().values():
            if not pool.started:
                pool.start()

    def stopService(self) -> Any:
        super().stopService()
        for pool in self.pools.by_name().values():
            if pool.started:
                pool.stop()
        return None
