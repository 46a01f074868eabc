"""Queues over an outbox that several relay processes share (PostgreSQL: pgoutbox.py).

Any process may have accepted a destination's packets, so a queue claims the destination
before a sending pass, adopting the queue and backoff as stored, renews the claim before
each attempt and releases it at the end. Only one process sends to a destination at a
time, in order; the others stand by. A process kicks the queues of the packets it accepts
at once; packets other processes accepted, and queues a dead process held, are found by
`wake_pending` on a modest poll (`federation.poll_interval`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from .outbox import OutboxUnavailable
from .outbox_interface import Claim
from .queue import DestinationQueue, QueueState

if TYPE_CHECKING:
    from .queues import Queues

log = Logger(namespace="msgrelay.federation")


class SharedQueue(DestinationQueue):
    """A destination queue that sends only while it holds the destination's claim."""

    knows_whole_queue = False  # other processes add to it: a kick claims, and the claim loads it

    async def _send(self) -> None:
        outbox = self.owner.outbox
        while self.owner.sending:
            try:
                claim = await self.owner.run(outbox.claim, self.name, self.owner.clock.seconds())
            except OutboxUnavailable as e:
                await self._wait(str(e), QueueState.BACKING_OFF, None)
                return
            self._adopt(claim)
            if not claim.granted:
                self._stand_by(claim)
                return
            try:
                await self._deliver_all()
            finally:
                again = await self._release()
            if not again or self.state is not QueueState.IDLE:
                return
            # another process queued packets while we held the claim: claim again

    async def _release(self) -> bool:
        """Give up the claim; True if packets that may be sent now are queued."""
        if not self.owner.sending:
            return False  # stopping: closing the outbox gives up every claim at once
        try:
            again: bool = await self.owner.run(self.owner.outbox.release, self.name, self.owner.clock.seconds())
        except OutboxUnavailable as e:  # the lease runs out by itself
            log.error("federation: {problem}", problem=str(e))
            return False
        return again

    def _adopt(self, claim: Claim) -> None:
        """The queue and backoff as stored: other processes may have added, sent or failed."""
        self.entries = list(claim.entries)
        self.ids = {e.id for e in self.entries}
        self.backoff = claim.backoff
        now = self.owner.clock.seconds()
        when = claim.backoff.next_attempt
        self.backoff_seconds = max(0.0, when - now) if when is not None and when > now else 0.0

    def _stand_by(self, claim: Claim) -> None:
        """Denied: wait for the shared next attempt, or leave the queue to its holder."""
        now = self.owner.clock.seconds()
        if claim.backoff.next_attempt is not None and claim.backoff.next_attempt > now and self.entries:
            self.state = QueueState.BACKING_OFF
            self._schedule()
        else:
            self.state = QueueState.IDLE
            if claim.holder is not None:
                log.debug("federation: {destination} is being sent by {holder}", destination=self.name,
                          holder=claim.holder)

    async def _hold(self) -> bool:
        try:
            held = await self.owner.run(self.owner.outbox.renew, self.name, self.owner.clock.seconds())
        except OutboxUnavailable as e:
            log.error("federation: {problem}", problem=str(e))
            held = False
        if not held:
            log.warn("federation: lost the claim on {destination}; another process sends to it now",
                     destination=self.name)
            self.state = QueueState.IDLE
        return held


def wake_pending(queues: "Queues", pending: dict[str, bool]) -> None:
    """After a poll: kick every queue that may be sent now, and forget what this process
    still remembers of queues that others have emptied."""
    if not queues.sending:
        return
    for destination, due in pending.items():
        if due:
            queue = queues.get(destination)
            if not queue.draining:
                queue.cancel_timer()
                queue.kick()
    for queue in queues.values():
        if queue.entries and queue.name not in pending and not queue.draining and not queue.adding:
            queue.entries, queue.ids = [], set()
            queue.cancel_timer()
            queue.kick()  # an empty queue reports itself emptied
