"""One destination's queue: strict order, one request at a time, its own backoff and timer.

The packets stay on disk (outbox.py); the queue holds their names in arrival order. After a
failure it waits on one `callLater` until its next attempt, or until its earliest packet
expires, whichever comes first; nothing walks the queues on a tick. Its backoff state is
saved in the outbox, so a restarted relay keeps waiting instead of hammering every peer at
once. An emptied queue tells its owner, which may reclaim it.
"""

from __future__ import annotations

import bisect
import enum
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .deliverer import Outcome
from .outbox import BackoffState, Entry, OutboxUnavailable

if TYPE_CHECKING:
    from .queues import Queues

log = Logger(namespace="msgrelay.federation")


class QueueState(enum.Enum):
    IDLE = "idle"  # nothing to send, or about to send
    SENDING = "sending"  # an attempt is in progress
    BACKING_OFF = "backing-off"  # the last attempt failed; waiting for the next one
    HELD_KEY_MISMATCH = "held-key-mismatch"  # the peer's key is not the pinned one
    HELD_POLICY = "held-policy"  # the current federation policy does not allow this destination


class DestinationQueue:
    """What the relay knows about one destination; see the module docstring."""

    #: The entries in memory are the whole queue (no other process adds to it).
    knows_whole_queue = True

    def __init__(self, name: str, owner: "Queues"):
        self.name = name
        self.owner = owner
        self.entries: list[Entry] = []
        self.ids: set[str] = set()
        self.state = QueueState.IDLE
        self.backoff = BackoffState()
        self.backoff_seconds = 0.0
        self.pinned_ok = True
        self.delivered = 0
        self.dropped = 0
        self.adding = 0  # packets being written to the outbox for this queue right now
        self._timer: Any = None  # IDelayedCall: the next attempt or the earliest expiry
        self._draining = False
        self._settled: list[Deferred] = []

    @property
    def failures(self) -> int:
        """Failed attempts in a row (0 after a delivery)."""
        return self.backoff.attempts

    @property
    def last_error(self) -> Optional[str]:
        return self.backoff.last_error

    # -- contents ------------------------------------------------------------------

    def insert(self, entry: Entry) -> bool:
        """Insert in arrival order (writes finishing out of order still queue in order)."""
        if entry.id in self.ids:
            return False
        self.ids.add(entry.id)
        if not self.entries or (entry.seq, entry.nonce) > (self.entries[-1].seq, self.entries[-1].nonce):
            self.entries.append(entry)
        else:
            bisect.insort(self.entries, entry, key=lambda e: (e.seq, e.nonce))
        return True

    def add(self, entry: Entry) -> None:
        """A newly accepted packet: queue it, and send unless the queue waits."""
        if not self.insert(entry):
            return
        if self.state is QueueState.IDLE:
            self.kick()
        elif self._timer is not None and entry.expires < self._timer.getTime():
            self._schedule()

    async def _forget(self, entry: Entry) -> None:
        try:
            await self.owner.run(self.owner.outbox.remove, entry)
        except OutboxUnavailable as e:
            log.error("federation: {problem}; it may be sent again after a restart (the peer drops duplicates)",
                      problem=str(e))
        if entry.id in self.ids:
            self.ids.discard(entry.id)
            self.entries.remove(entry)

    async def _drop_expired(self) -> None:
        now = self.owner.clock.seconds()
        expired = [e for e in self.entries if e.expires <= now]
        for entry in expired:
            self.dropped += 1
            await self._forget(entry)
        if expired:
            log.warn("federation: dropped {count} packets for {destination} that expired in the queue",
                     count=len(expired), destination=self.name)

    # -- sending -------------------------------------------------------------------

    def kick(self) -> None:
        """Start sending unless already sending or waiting for the next attempt."""
        if not self.owner.sending or self._draining or self._timer is not None:
            return
        if not self.entries and self.knows_whole_queue:
            self._emptied()
            return
        self._draining = True
        d = Deferred.fromCoroutine(self._drain())
        d.addErrback(self._drain_failed)

    def _drain_failed(self, failure: Any) -> None:
        log.failure("federation: delivery to {destination} failed unexpectedly", failure, destination=self.name)
        self._draining = False
        Deferred.fromCoroutine(self._wait("unexpected error", QueueState.BACKING_OFF, None))

    @property
    def draining(self) -> bool:
        """A sending pass is running."""
        return self._draining

    async def _send(self) -> None:
        """One sending pass (shared outboxes claim the destination around it: shared.py)."""
        await self._deliver_all()

    async def _hold(self) -> bool:
        """Whether this process may still send the next packet (shared outboxes renew a lease)."""
        return True

    async def _drain(self) -> None:
        try:
            await self._send()
        finally:
            self._draining = False
            settled, self._settled = self._settled, []
            for d in settled:
                d.callback(self)
        if self.owner.sending and not self.entries and self._timer is None:
            self._emptied()

    async def _deliver_all(self) -> None:
        """Deliver the head of the queue until it is empty or an outcome says to wait."""
        refetched: Optional[str] = None  # the entry whose key was fetched again at once
        while self.owner.sending and self.entries:
            entry = self.entries[0]
            if entry.expires <= self.owner.clock.seconds():
                log.warn("federation: {message_id} for {destination} expired in the queue; dropped",
                         message_id=entry.id, destination=self.name)
                self.dropped += 1
                await self._forget(entry)
                continue
            if not await self._hold():
                return
            peer, why = self.owner.policy.peer_for_delivery(self.name)
            if peer is None:
                log.warn("federation: {queued} packets for {destination} wait: {why}",
                         queued=len(self.entries), destination=self.name, why=why)
                await self._wait(why or "not allowed", QueueState.HELD_POLICY, None)
                return
            self.state = QueueState.SENDING
            try:
                packet = await self.owner.run(self.owner.outbox.read, entry)
            except KeyError:
                log.warn("federation: {message_id} vanished from the outbox", message_id=entry.id)
                await self._forget(entry)
                continue
            except OutboxUnavailable as e:
                await self._wait(str(e), QueueState.BACKING_OFF, None)
                return
            result = await self.owner.deliverer.attempt(peer, packet, entry.expires)
            if not self.owner.sending:
                return
            outcome = result.outcome
            if outcome is Outcome.REFETCH_KEY and refetched != entry.id:
                log.info("federation: {destination} could not decrypt; fetching its key again", destination=self.name)
                refetched = entry.id
                continue
            self.pinned_ok = outcome is not Outcome.KEY_MISMATCH
            if outcome is Outcome.DELIVERED:
                self.delivered += 1
                log.info("federation: delivered {message_id} to {destination}", message_id=entry.id,
                         destination=self.name)
                await self._forget(entry)
                await self._reset_backoff()
            elif outcome is Outcome.DROP:
                self.dropped += 1
                log.error("federation: {destination} {problem}; {message_id} dropped", destination=self.name,
                          problem=result.reason, message_id=entry.id)
                await self._forget(entry)
            elif outcome is Outcome.KEY_MISMATCH:
                log.critical("federation: NOT delivering to {destination}: {problem}. Check federation.peers "
                             "with the peer's operator.", destination=self.name, problem=result.reason)
                await self._wait(result.reason, QueueState.HELD_KEY_MISMATCH, None)
                return
            else:  # RETRY_AFTER, or a second REFETCH_KEY for the same packet
                log.warn("federation: delivery to {destination} failed: {problem}", destination=self.name,
                         problem=result.reason)
                await self._wait(result.reason, QueueState.BACKING_OFF, result.delay)
                return
        self.state = QueueState.IDLE

    # -- waiting -------------------------------------------------------------------

    async def _wait(self, problem: str, state: QueueState, at_least: Optional[float]) -> None:
        """Count a failure, save the backoff, and sleep until the next attempt."""
        attempts = self.backoff.attempts + 1
        delay = self.owner.backoff.delay(attempts, at_least)
        self.backoff = BackoffState(attempts, self.owner.clock.seconds() + delay, problem[:300])
        self.backoff_seconds = delay
        self.state = state
        try:
            await self.owner.run(self.owner.outbox.save_backoff, self.name, self.backoff)
        except OutboxUnavailable as e:
            log.error("federation: {problem}", problem=str(e))
        if not self.owner.sending:
            return
        log.info("federation: next attempt for {destination} in {delay:.1f}s ({queued} queued)",
                 destination=self.name, delay=delay, queued=len(self.entries))
        self._schedule()

    async def _reset_backoff(self) -> None:
        if self.backoff == BackoffState():
            return
        self.backoff, self.backoff_seconds = BackoffState(), 0.0
        try:
            await self.owner.run(self.owner.outbox.clear_backoff, self.name)
        except OutboxUnavailable as e:
            log.error("federation: {problem}", problem=str(e))

    def restore(self, saved: BackoffState) -> None:
        """Adopt the backoff a previous process saved: wait out what remains of it."""
        self.backoff = saved
        now = self.owner.clock.seconds()
        if saved.next_attempt is not None and saved.next_attempt > now:
            self.backoff_seconds = saved.next_attempt - now
            self.state = QueueState.BACKING_OFF
            self._schedule()

    def _schedule(self) -> None:
        """One timer: the next attempt, or the earliest expiry if that comes first."""
        self.cancel_timer()
        when = self.backoff.next_attempt or self.owner.clock.seconds()
        if self.entries:
            when = min(when, min(e.expires for e in self.entries))
        delay = max(0.0, when - self.owner.clock.seconds())
        self._timer = self.owner.clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        Deferred.fromCoroutine(self._woken()).addErrback(
            lambda f: log.failure("federation: queue {destination} failed to wake", f, destination=self.name))

    async def _woken(self) -> None:
        await self._drop_expired()
        if not self.owner.sending or self._timer is not None or self._draining:
            return
        if not self.entries:
            self._emptied()
        elif self.backoff.next_attempt is None or self.backoff.next_attempt <= self.owner.clock.seconds():
            self.kick()
        else:
            self._schedule()

    def cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def retry_now(self) -> Deferred:
        """An operator (or a changed policy) says: forget the backoff, try at once.
        Fires when the sending pass this starts has ended."""
        self.cancel_timer()
        self.backoff = BackoffState(0, None, self.backoff.last_error)
        self.backoff_seconds = 0.0
        d = Deferred.fromCoroutine(self._clear_then_kick())
        d.addErrback(lambda f: log.failure("federation: retrying {destination} failed", f, destination=self.name))
        return d

    async def _clear_then_kick(self) -> None:
        try:
            await self.owner.run(self.owner.outbox.clear_backoff, self.name)
        except OutboxUnavailable as e:
            log.error("federation: {problem}", problem=str(e))
        if self.owner.sending and not self._draining:
            self.state = QueueState.IDLE
            self.kick()
        await self.when_settled()

    def when_settled(self) -> Deferred:
        """Fires when the current sending pass ends (at once if none is running)."""
        if not self._draining:
            return succeed(self)
        d: Deferred = Deferred()
        self._settled.append(d)
        return d

    def _emptied(self) -> None:
        self.cancel_timer()
        self.state = QueueState.IDLE
        Deferred.fromCoroutine(self._reset_backoff()).addCallback(lambda _: self.owner.emptied(self))

    # -- reporting -----------------------------------------------------------------

    def oldest_age(self, now: float) -> float:
        return max(0.0, now - min(e.received for e in self.entries)) if self.entries else 0.0

    def next_attempt(self) -> Optional[float]:
        return self.backoff.next_attempt if self.state is not QueueState.IDLE and self._timer is not None else None

    def status(self, now: float) -> dict[str, Any]:
        """The fields `queue_status()` promises (metrics read these)."""
        return {
            "destination": self.name,
            "queued": len(self.entries),
            "oldest_age_seconds": round(self.oldest_age(now), 3),
            "backoff_seconds": round(self.backoff_seconds, 3),
            "failures": self.backoff.attempts,
            "next_attempt": self.next_attempt(),
            "pinned_ok": self.pinned_ok,
        }

    def details(self) -> dict[str, Any]:
        """What `msgrelay-admin queue list` shows of a running relay."""
        next_attempt = self.next_attempt()
        return {
            "queued": len(self.entries),
            "oldest_received": min(e.received for e in self.entries) if self.entries else None,
            "backoff_seconds": round(self.backoff_seconds, 3),
            "next_attempt": round(next_attempt, 3) if next_attempt else None,
            "pinned_ok": self.pinned_ok, "state": self.state.value, "failures": self.backoff.attempts,
            "last_error": self.backoff.last_error, "delivered": self.delivered, "dropped": self.dropped,
        }
