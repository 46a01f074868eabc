"""One named, sized thread pool per kind of blocking work.

Blocking work never runs on the reactor thread, and never on the reactor's default pool:
each kind has a pool of its own, so a backlog of one kind (a slow disk for the outbox, a
slow database, an expensive decryption) cannot hold up another. Sizes are the `pools.*`
settings; the service tree starts the pools before anything uses them and stops them
last; the metrics show each pool's size, busy threads and queued work.

- store: every IStore call (maildir file I/O and fsync, PostgreSQL queries);
- outbox: the federation outbox's disk work;
- crypto: CPU work that grows with input size (RSA decryption, sealing big answers);

Name lookups need no pool: they use an asynchronous resolver on the event loop
(federation/resolver.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from .settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class PoolLoad:
    """What the metrics show of one pool."""

    size: int  # the most threads it runs
    busy: int  # threads running work now
    queued: int  # work waiting for a thread


def load_of(pool: ThreadPool) -> PoolLoad:
    return PoolLoad(pool.max, len(pool.working), pool.q.qsize())


@dataclass(frozen=True)
class Pools:
    """The relay's thread pools, by kind of work (see the module docstring)."""

    store: ThreadPool
    outbox: ThreadPool
    crypto: ThreadPool

    @classmethod
    def from_settings(cls, settings: Settings) -> "Pools":
        sizes = settings.pools
        return cls(**{f.name: ThreadPool(0, getattr(sizes, f.name), name=f"msgrelay-{f.name}") for f in fields(cls)})

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
