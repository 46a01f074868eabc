"""Python's cyclic garbage collector: what it stops the relay for, and keeping that short.

A full collection (generation 2) walks every container object in the process, and every
thread waits for it, the reactor's too. Most of those objects are made at start-up (modules,
configuration, routes) and live as long as the process. On the bench machine (December 2026)
a full collection took 33-38 ms, a few times a minute under load: one stall of every request
in flight, enough to set the p99 of a fetch at half load (bench/README.md).

So once the relay runs, `settle` collects what start-up left behind and freezes the rest
(`gc.freeze`): full collections then walk only what was made since, 1.4-11 ms there.
`StartUpHeap` does that when the reactor starts, only in a process whose reactor was not
yet running when the service started (`twistd msgrelay`, each worker): a relay started
inside a running program (the tests) is not the program's start-up.
Frozen objects are never collected by the cyclic collector; reference counting still frees
them. A start-up object that only later becomes part of garbage cycles stays until exit:
a bounded cost, paid once.

`CollectorPauses` times every collection from `gc.callbacks`, for the metrics. It runs
inside the collector, on whichever thread allocated: it takes no lock (a lock held by the
interrupted code would deadlock it) and only adds numbers, which the GIL keeps whole.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger(namespace="msgrelay.heap")

GENERATIONS = (0, 1, 2)


class CollectorPauses:
    """Collections and the time they took, by generation, since `install`."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._started: Optional[float] = None
        self.collections = [0 for _ in GENERATIONS]
        self.seconds = [0.0 for _ in GENERATIONS]
        self.longest = [0.0 for _ in GENERATIONS]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        started, self._started = self._started, None
        generation = info.get("generation", 2)
        if started is None or generation not in GENERATIONS:
            return
        took = self._clock() - started
        self.collections[generation] += 1
        self.seconds[generation] += took
        if took > self.longest[generation]:
            self.longest[generation] = took

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)


_pauses: Optional[CollectorPauses] = None


def pauses() -> CollectorPauses:
    """The process's one timer of collections (the collector is the process's), installed."""
    global _pauses
    if _pauses is None:
        _pauses = CollectorPauses()
        _pauses.install()
    return _pauses


def settle() -> int:
    """Collect start-up garbage, then freeze every object alive now; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return frozen()


def frozen() -> int:
    """Objects frozen out of the collector's generations (`settle`)."""
    return gc.get_freeze_count()


class StartUpHeap(Service):
    """Settles the heap once the reactor runs, when the process starts with this service."""

    def __init__(self, reactor: Any):
        self._reactor = reactor
        self.settled: Optional[int] = None  # objects frozen, once done

    def startService(self) -> None:
        super().startService()
        if not self._reactor.running:
            self._reactor.callWhenRunning(self._settle)

    def _settle(self) -> None:
        started = time.perf_counter()
        self.settled = settle()
        log.info("start-up heap frozen: {count} objects left out of full garbage collections ({ms:.0f} ms)",
                 count=self.settled, ms=(time.perf_counter() - started) * 1000)
