"""The federation queue gauges of `/metrics` when the outbox is shared in PostgreSQL.

Each relay process only holds the queues it is sending from now, so its own view would show
a different share of the work in every process. With a shared outbox the gauges come from
the database instead: one aggregate query (`Outbox.summary`) on the outbox pool, taken when
a scrape finds the last one older than `MAX_AGE` seconds and waited for by that scrape, so
every process reports the same numbers and a burst of scrapes costs one query.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .outbox_interface import QueueSummary

log = Logger(namespace="msgrelay.federation")

#: Seconds a snapshot of the shared queues is served before a scrape takes a new one.
MAX_AGE = 5.0


def gauge_rows(summaries: Sequence[QueueSummary], now: float) -> list[dict[str, Any]]:
    """`queue_gauges()` rows from the outbox's own summary. `backoff_seconds` is the wait
    left until the next attempt every process obeys (0 when delivering normally)."""
    rows = []
    for s in summaries:
        next_attempt = s.backoff.next_attempt
        waiting = max(0.0, next_attempt - now) if s.backoff.attempts and next_attempt is not None else 0.0
        rows.append({
            "destination": s.destination,
            "queued": s.queued,
            "oldest_age_seconds": round(max(0.0, now - s.oldest_received), 3) if s.oldest_received is not None else 0.0,
            "backoff_seconds": round(waiting, 3),
            "failures": s.backoff.attempts,
        })
    return rows


class SharedGauges:
    """The last snapshot of a shared outbox's queues, refreshed on demand (module docstring)."""

    def __init__(self, summary: Callable[[float], list[QueueSummary]], run: Callable[..., Deferred], clock: Any,
                 max_age: float = MAX_AGE):
        self.summary = summary
        self.run = run
        self.clock = clock
        self.max_age = max_age
        self.rows: list[dict[str, Any]] = []
        self.taken: Optional[float] = None
        self._waiting: Optional[list[Deferred]] = None

    def refresh(self) -> Optional[Deferred]:
        """None if the snapshot is fresh; else a Deferred that fires (never fails) once a new
        one is in `rows`. One query at a time, whoever is waiting for it."""
        now = self.clock.seconds()
        if self._waiting is None and self.taken is not None and now - self.taken < self.max_age:
            return None
        waiter: Deferred = Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
            return waiter
        self._waiting = [waiter]
        d = self.run(self.summary, now)
        d.addCallbacks(lambda summaries: self._taken(summaries, now), self._failed)
        d.addBoth(self._release)
        return waiter

    def _taken(self, summaries: list[QueueSummary], now: float) -> None:
        self.rows = gauge_rows(summaries, now)
        self.taken = now

    def _failed(self, failure: Any) -> None:
        # The database is down: the gauges keep the last snapshot; the next scrape tries again.
        log.warn("federation: cannot read the shared queues for metrics: {problem}",
                 problem=failure.getErrorMessage())

    def _release(self, _: Any) -> None:
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            waiter.callback(None)
