"""The federation service: owns the outbox, its lock and threads, the queues and the deliverer.

Lifecycle only: take the outbox lock, start the outbox threads, load the queues a previous
process left, sweep old idempotency records now and then, and, on an outbox other processes
share, poll it for their work (shared.py); at stop, cancel what is in flight and let go of
everything. Accepting packets is forwarder.py, sending them queue.py and
deliverer.py.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from .backoff import Backoff
from .deliverer import Deliverer
from .forwarder import Forwarder
from .gauges import SharedGauges
from .netguard import GuardedEndpointFactory
from .outbox import BackoffState, Entry, OutboxLock, OutboxUnavailable
from .outbox_interface import Outbox
from .peers import FederationPolicy
from .queues import Queues
from .shared import wake_pending

log = Logger(namespace="msgrelay.federation")

#: Seconds between sweeps of expired idempotency records (one directory, not the queues).
DEDUP_SWEEP_SECONDS = 60.0


class FederationService(Service):
    def __init__(self, outbox: Outbox, deliverer: Deliverer, backoff: Backoff, policy: FederationPolicy,
                 clock: Any, max_queue: int, *, endpoints: Optional[GuardedEndpointFactory] = None,
                 pool: Any = None, run: Optional[Callable[..., Deferred]] = None, only: Optional[str] = None,
                 poll_interval: float = 5.0):
        self.setName("federation")
        self.outbox = outbox
        self.deliverer = deliverer
        self.clock = clock
        self.endpoints = endpoints  # whose trusted hosts follow the peer table
        self.pool = pool  # the HTTP connection pool, closed at stop
        self.only = only  # msgrelay-admin on a stopped relay: load just this destination
        self._threads: Optional[ThreadPool] = None if run else ThreadPool(1, 4, "msgrelay-outbox")
        self.queues = Queues(outbox, run or self._in_thread, deliverer, backoff, clock, policy)
        self.forwarder = Forwarder(self.queues, max_queue)
        self._lock: Optional[OutboxLock] = None
        self._sweeper: Optional[LoopingCall] = None
        self.poll_interval = poll_interval
        self._poller: Optional[LoopingCall] = None
        self.ready: Optional[Deferred] = None  # fires once the outbox is loaded
        # The /metrics queue gauges of a shared outbox come from the database (gauges.py).
        self.shared_gauges = SharedGauges(outbox.summary, self.queues.run, clock) if outbox.shared else None
        if endpoints is not None:
            endpoints.set_trusted(policy.trusted_hosts())

    def _in_thread(self, function: Callable[..., Any], *args: Any) -> Deferred:
        """Outbox I/O on our own small pool, so slow work elsewhere never holds it up."""
        assert self._threads is not None
        return deferToThreadPool(self.clock, self._threads, function, *args)

    @property
    def policy(self) -> FederationPolicy:
        return self.queues.policy

    def acquire_lock(self) -> None:
        """Take the outbox lock (OutboxBusy if another running relay delivers from it)."""
        if self._lock is None:
            self._lock = self.outbox.lock()

    def startService(self) -> None:
        self.acquire_lock()
        super().startService()
        if self._threads is not None:
            self._threads.start()
        self.queues.start()  # accepting now; sending once the outbox is loaded
        self.ready = self.queues.run(self._load)
        self.ready.addCallback(self.queues.load)
        self.ready.addErrback(lambda f: log.failure("cannot load the federation outbox", f))
        if self.only is None:
            self._sweeper = LoopingCall(self._sweep)
            self._sweeper.clock = self.clock
            self._sweeper.start(DEDUP_SWEEP_SECONDS, now=False)
        if self.outbox.shared and self.only is None:
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self.clock
            self._poller.start(self.poll_interval, now=False)

    def _load(self) -> dict[str, tuple[list[Entry], BackoffState]]:
        names = [self.only] if self.only is not None else self.outbox.destinations()
        return {d: (self.outbox.entries(d), self.outbox.load_backoff(d)) for d in names}

    def _sweep(self) -> Deferred:
        d = self.queues.run(self.outbox.sweep_dedup, int(self.clock.seconds()))
        d.addErrback(lambda f: log.failure("federation: sweeping idempotency records failed", f))
        return d

    def _poll(self) -> Deferred:
        """Work other processes queued, or left when they died (shared outboxes only)."""
        if not self.queues.sending:
            return succeed(None)
        d = self.queues.run(self.outbox.pending, self.clock.seconds())
        d.addCallback(lambda pending: wake_pending(self.queues, pending))
        d.addErrback(self._poll_failed)
        return d

    @staticmethod
    def _poll_failed(failure: Any) -> None:
        if failure.check(OutboxUnavailable):  # the database is down: one line per poll, no traceback
            log.warn("federation: cannot poll the shared outbox: {problem}", problem=failure.getErrorMessage())
        else:
            log.failure("federation: polling the shared outbox failed", failure)

    def stopService(self) -> Any:
        super().stopService()
        for timer in (self._sweeper, self._poller):
            if timer is not None and timer.running:
                timer.stop()
        self.queues.stop()
        self.deliverer.stop()
        waits = [self.pool.closeCachedConnections()] if self.pool is not None else []
        # A shared outbox gives up this process's claims (in a thread: it is a database call).
        closed = self.queues.run(self.outbox.close) if self.outbox.shared else succeed(None)
        closed.addErrback(lambda f: log.failure("federation: closing the outbox failed", f))
        closed.addBoth(self._let_go)
        return gatherResults([closed, *waits]) if waits else closed

    def _let_go(self, _: Any) -> None:
        if self._threads is not None and self._threads.started:
            self._threads.stop()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- what operators and metrics ask ----------------------------------------------

    def set_policy(self, policy: FederationPolicy) -> None:
        """A reloaded mode and peer table (SIGHUP)."""
        if self.endpoints is not None:
            self.endpoints.set_trusted(policy.trusted_hosts())
        self.queues.set_policy(policy)

    def retry_now(self, destination: str) -> bool:
        return self.queues.retry_now(destination)

    def refresh_gauges(self) -> Optional[Deferred]:
        """Before a scrape: a Deferred to wait for if the shared queues must be read again."""
        return self.shared_gauges.refresh() if self.shared_gauges is not None else None

    def queue_gauges(self) -> list[dict[str, Any]]:
        """What the /metrics queue gauges show: this process's queues, or with a shared
        outbox the last snapshot of every process's queues (gauges.py)."""
        if self.shared_gauges is not None:
            return self.shared_gauges.rows
        return self.queue_status()

    def queue_status(self) -> list[dict[str, Any]]:
        """Per destination this process holds: destination, queued, oldest_age_seconds,
        backoff_seconds, failures, next_attempt (POSIX seconds, None when no attempt is
        scheduled), pinned_ok."""
        return self.queues.status()

    def status_document(self) -> dict[str, Any]:
        """What `msgrelay-admin queue list` shows of a running relay."""
        return {"pid": os.getpid(), "mode": self.policy.mode, "destinations": self.queues.details()}
