"""The federation sender (PROTOCOL.md section 7): durable queues delivered to peer relays.

`forward()` writes the packet to the outbox before the relay answers `200`. Each destination
has its own queue, delivered strictly in order, one request at a time, with its own backoff:
a dead or slow peer only ever delays its own queue. The queue state lives in memory and is
rebuilt from the outbox at start, so a restart resumes where the last process stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..wire.envelope import AES_GCM, seal
from ..wire.errors import ProtocolError
from ..wire.packet import Packet
from .netguard import read_body
from .outbox import Entry, Outbox, OutboxBusy, OutboxLock, OutboxUnavailable
from .peerkeys import PeerKeys, PinMismatch
from .peers import FederationPolicy, Peer
from .queues import DestinationQueue, backoff_delay, parse_retry_after

log = Logger(namespace="msgrelay.federation")

DELIVERED, DROPPED, RETRY = "delivered", "dropped", "retry"
FORWARDED_BY = "MsgRelay-Forwarded-By"


@dataclass(frozen=True)
class SenderConfig:
    backoff_min: float = 1
    backoff_max: float = 3600
    timeout: float = 30
    key_refresh: int = 3600
    max_queue: int = 100000

    @classmethod
    def from_settings(cls, settings: Any) -> "SenderConfig":
        f = settings.federation
        return cls(f.backoff_min, f.backoff_max, f.timeout, f.key_refresh, f.max_queue)


def dedup_key(destination: str, packet: Packet) -> str:
    """Same recipient, token and packet id: the same packet (PROTOCOL.md section 6)."""
    text = "\n".join((destination, packet.address.user_id, packet.token, packet.id))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _describe(error: BaseException) -> str:
    """One line for the log; twisted.web's wrapped failures are unwrapped to their causes."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)[:300]
    text = str(error).strip()
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__


def _peer_error(body: bytes) -> tuple[Optional[int], str]:
    try:
        obj = json.loads(body)
        return obj.get("errno"), str(obj.get("message", ""))[:200]
    except (ValueError, AttributeError):
        return None, ""


class FederationSender(Service):
    """Forwarder for `RelayCore` and the delivery loop of every destination queue."""

    name = "federation"
    tick_seconds = 1.0  # how often operator retry requests and the status file are looked at
    sweep_ticks = 60  # expired packets and idempotency records are swept this often

    def __init__(self, policy: FederationPolicy, outbox: Outbox, own_name: str, clock: Any, http: Any,
                 config: SenderConfig, pool: Any = None,
                 run: Optional[Callable[..., Deferred]] = None, rng: Optional[random.Random] = None,
                 threads: Optional[ThreadPool] = None):
        self.policy = policy
        self.outbox = outbox
        self.own_name = own_name
        self.clock = clock
        self.http = http
        self.config = config
        self.pool = pool
        self.rng = rng or random.Random()
        self.keys = PeerKeys(http, clock, config.key_refresh, config.timeout)
        self.queues: dict[str, DestinationQueue] = {name: DestinationQueue(name) for name in policy.peers}
        # Outbox disk work: the relay's outbox pool (started and stopped by the service tree),
        # else a small pool of our own (tools and tests building a sender alone).
        self._own_threads = threads is None and run is None
        self._threads: Optional[ThreadPool] = threads if threads is not None else (
            ThreadPool(1, 4, "msgrelay-outbox") if run is None else None)
        self._run: Callable[..., Deferred] = run or self._in_thread
        self._inflight: set[Deferred] = set()
        self._lock: Optional[OutboxLock] = None
        self._ticker: Optional[LoopingCall] = None
        self._ticks = 0
        self._last_status: Optional[dict[str, Any]] = None
        self.ready: Optional[Deferred] = None  # fires once the outbox is loaded
        self.one_shot = False  # msgrelay-admin: one pass, no timers
        self.trusted_hosts: set[tuple[str, int]] = set()  # shared with the HTTP client (see factory)

    def _in_thread(self, function: Callable[..., Any], *args: Any) -> Deferred:
        """Outbox I/O on our own small pool, so slow DNS lookups elsewhere never hold it up."""
        assert self._threads is not None
        return deferToThreadPool(self.clock, self._threads, function, *args)

    def acquire_lock(self) -> None:
        """Take the outbox lock (OutboxBusy if another running relay delivers from it)."""
        if self._lock is None:
            self._lock = self.outbox.lock()

    # -- service --------------------------------------------------------------

    def startService(self) -> None:
        self.acquire_lock()
        super().startService()
        if self._threads is not None and self._own_threads:
            self._threads.start()
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self.clock
        self._ticker.start(self.tick_seconds, now=False).addErrback(
            lambda f: log.failure("federation housekeeping stopped", f))
        self.ready = self._run(self._load_at_start)
        self.ready.addCallback(self._loaded)
        self.ready.addErrback(lambda f: log.failure("cannot load the federation outbox", f))

    def stopService(self) -> Any:
        super().stopService()
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        for queue in self.queues.values():
            queue.cancel_timer()
        for d in list(self._inflight):
            d.cancel()
        closed = self.pool.closeCachedConnections() if self.pool is not None else None
        if self._threads is not None and self._own_threads:
            self._threads.stop()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        return closed

    def _load_at_start(self) -> dict[str, list[Entry]]:
        self.outbox.take_retry_requests()  # everything is attempted at start anyway
        return self.outbox.load_all()

    def _loaded(self, found: dict[str, list[Entry]]) -> None:
        total = 0
        for destination, entries in found.items():
            queue = self._queue(destination)
            for entry in entries:
                queue.add(entry)
            total += len(entries)
        if total:
            log.info("federation: resuming {count} queued packets for {destinations} destinations",
                     count=total, destinations=sum(1 for e in found.values() if e))
        for queue in self.queues.values():
            self._kick(queue)
        self._write_status()

    def _write_status(self) -> Deferred:
        """Rewrite `.status.json` if anything changed since the last write."""
        document = self.status_document()
        if document == self._last_status:
            return succeed(None)
        self._last_status = document
        return self._run(self.outbox.write_status, document)

    def _queue(self, destination: str) -> DestinationQueue:
        destination = destination.lower()
        if destination not in self.queues:
            self.queues[destination] = DestinationQueue(destination)
        return self.queues[destination]

    # -- accepting ------------------------------------------------------------

    async def forward(self, packet: Packet, received: int, expires: int,
                      forwarded_by: Optional[str]) -> tuple[str, int]:
        """Queue durably; (message id, expires). 122 refused, 160 queue full, 180 disk."""
        destination = packet.address.server_name
        assert destination is not None
        self.policy.check(destination)
        if not self.running:
            raise ProtocolError(180, "the relay is shutting down; send again in a moment")
        queue = self._queue(destination)
        if len(queue.entries) >= self.config.max_queue:
            raise ProtocolError(160, f"the outgoing queue for {destination} is full; try again later")
        try:
            entry, duplicate = await self._run(self.outbox.add, destination, packet.to_json(), received, expires,
                                               dedup_key(destination, packet))
        except OutboxUnavailable as e:
            log.error("federation: {problem}", problem=str(e))
            raise ProtocolError(180, "the outgoing queue cannot be written now")
        if not duplicate:
            queue.add(entry)
            log.info("federation: queued {message_id} for {destination} ({queued} queued)",
                     message_id=entry.id, destination=destination, queued=len(queue.entries))
            self._kick(queue)
        return entry.id, entry.expires

    # -- delivering -----------------------------------------------------------

    def _kick(self, queue: DestinationQueue) -> None:
        if not self.running or queue.running or queue.waiting() or not queue.entries:
            return
        queue.running = True
        d = Deferred.fromCoroutine(self._drain(queue))
        d.addErrback(self._drain_failed, queue)

    def _drain_failed(self, failure: Any, queue: DestinationQueue) -> None:
        log.failure("federation: delivery to {destination} failed unexpectedly", failure, destination=queue.name)
        queue.running = False
        self._retry_later(queue, None)

    async def _drain(self, queue: DestinationQueue) -> None:
        """Deliver the head of the queue until it is empty or a failure asks to wait."""
        try:
            while self.running and queue.entries:
                peer, why = self.policy.peer_for_delivery(queue.name)
                if peer is None:
                    queue.state, queue.last_error = "blocked", why
                    log.warn("federation: {queued} packets for {destination} wait: {why}",
                             queued=len(queue.entries), destination=queue.name, why=why)
                    self._retry_later(queue, None)
                    return
                entry = queue.entries[0]
                if entry.expires <= self.clock.seconds():
                    log.warn("federation: {message_id} for {destination} expired in the queue; dropped",
                             message_id=entry.id, destination=queue.name)
                    queue.dropped += 1
                    await self._forget(queue, entry)
                    continue
                queue.state = "delivering"
                outcome, retry_after = await self._attempt(queue, peer, entry)
                if not self.running:
                    return
                if outcome == RETRY:
                    self._retry_later(queue, retry_after)
                    return
                await self._forget(queue, entry)
                queue.failures, queue.backoff, queue.last_error = 0, 0.0, None
            queue.state = "idle"
        finally:
            queue.running = False

    def _timed(self, coroutine: Any) -> Deferred:
        """A cancellable step with the request timeout, cancelled too when the service stops."""
        d = Deferred.fromCoroutine(coroutine)
        timer = self.clock.callLater(self.config.timeout, d.cancel)
        self._inflight.add(d)
        d.addBoth(self._untrack, d, timer)
        return d

    def _untrack(self, result: Any, d: Deferred, timer: Any) -> Any:
        self._inflight.discard(d)
        if timer.active():
            timer.cancel()
        elif isinstance(result, Failure) and self.running:
            return Failure(TimeoutError(f"no answer within {self.config.timeout}s"))
        return result

    async def _attempt(self, queue: DestinationQueue, peer: Peer, entry: Entry) -> tuple[str, Optional[float]]:
        refreshed = False
        while True:
            try:
                key = await self._timed(self.keys.get(peer))
            except PinMismatch as e:
                queue.pinned_ok, queue.state, queue.last_error = False, "pin-mismatch", str(e)
                log.critical("federation: NOT delivering to {destination}: {problem}. Check federation.peers "
                             "with the peer's operator.", destination=peer.name, problem=str(e))
                return RETRY, None
            except Exception as e:
                return self._failed(queue, f"cannot get its server key: {_describe(e)}"), None
            queue.pinned_ok = True
            try:
                packet = await self._run(self.outbox.read, entry)
            except KeyError:
                log.warn("federation: {message_id} vanished from the outbox", message_id=entry.id)
                return DROPPED, None
            remaining = int(entry.expires - self.clock.seconds())
            if remaining < 1:
                return DROPPED, None
            packet["ttl"] = remaining  # the peer's expiry is never later than ours
            envelope = seal(key.key, json.dumps(packet, separators=(",", ":")).encode("utf-8"), AES_GCM)
            try:
                response, body = await self._timed(self._post(peer, envelope))
            except Exception as e:
                return self._failed(queue, _describe(e)), None
            code = response.code
            if 200 <= code < 300:
                queue.delivered += 1
                log.info("federation: delivered {message_id} to {destination}", message_id=entry.id,
                         destination=peer.name)
                return DELIVERED, None
            errno, message = _peer_error(body)
            if code == 400 and errno == 103:
                self.keys.invalidate(peer.name)
                if not refreshed:
                    log.info("federation: {destination} could not decrypt; fetching its key again",
                             destination=peer.name)
                    refreshed = True
                    continue
                return self._failed(queue, "it cannot decrypt packets sealed to its published key (errno 103)"), None
            if 400 <= code < 500 and code != 429:
                queue.dropped += 1
                log.error("federation: {destination} refused {message_id} permanently (HTTP {code} errno "
                          "{errno}: {message}); dropped", destination=peer.name, message_id=entry.id,
                          code=code, errno=errno, message=message)
                return DROPPED, None
            retry_after = parse_retry_after(response.headers.getRawHeaders(b"Retry-After", [None])[0],
                                            self.clock.seconds())
            return self._failed(queue, f"HTTP {code} errno {errno}"), retry_after

    async def _post(self, peer: Peer, envelope: dict[str, str]) -> tuple[Any, bytes]:
        response = await self.http.post(
            peer.endpoint("/api/v1/message"),
            data=json.dumps(envelope).encode("utf-8"),
            headers={"Content-Type": "application/json; charset=utf-8", FORWARDED_BY: self.own_name},
            allow_redirects=False, unbuffered=True, reactor=self.clock,
        )
        return response, await read_body(response)

    def _failed(self, queue: DestinationQueue, problem: str) -> str:
        queue.last_error = problem
        if self.running:
            log.warn("federation: delivery to {destination} failed: {problem}", destination=queue.name,
                     problem=problem)
        return RETRY

    def _retry_later(self, queue: DestinationQueue, retry_after: Optional[float]) -> None:
        queue.failures += 1
        delay = backoff_delay(queue.failures, self.config.backoff_min, self.config.backoff_max, self.rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        queue.backoff = delay
        if queue.state == "delivering":
            queue.state = "backoff"
        if self.one_shot or not self.running:
            return
        queue.cancel_timer()
        queue.next_attempt = self.clock.seconds() + delay
        queue.timer = self.clock.callLater(delay, self._wake, queue)
        log.info("federation: next attempt for {destination} in {delay:.1f}s ({queued} queued)",
                 destination=queue.name, delay=delay, queued=len(queue.entries))

    def _wake(self, queue: DestinationQueue) -> None:
        queue.timer, queue.next_attempt = None, None
        self._kick(queue)

    async def _forget(self, queue: DestinationQueue, entry: Entry) -> None:
        try:
            await self._run(self.outbox.remove, entry)
        except OutboxUnavailable as e:
            log.error("federation: {problem}; it may be sent again after a restart (the peer drops duplicates)",
                      problem=str(e))
        queue.discard(entry)

    # -- operators ------------------------------------------------------------

    def set_policy(self, policy: FederationPolicy) -> None:
        """Adopt a reloaded mode and peer table. A peer whose URL or pin changed has its cached
        key dropped and its queue tried at once, as has every queue the old table blocked."""
        old, self.policy = self.policy, policy
        changed = {name for name in set(old.peers) | set(policy.peers) if old.peers.get(name) != policy.peers.get(name)}
        for name in changed:
            self.keys.invalidate(name)
        log.info("federation: policy reloaded (mode {mode}, {count} peers, {changed} changed)",
                 mode=policy.mode, count=len(policy.peers), changed=len(changed))
        for queue in self.queues.values():
            if queue.entries and (queue.name in changed or queue.state == "blocked"):
                queue.cancel_timer()
                queue.failures, queue.backoff = 0, 0.0
                self._kick(queue)

    def retry_now(self, destination: str) -> bool:
        """Forget the backoff of `destination` and attempt at once; False if nothing is queued."""
        queue = self.queues.get(destination.lower())
        if queue is None or not queue.entries:
            return False
        log.info("federation: retrying {destination} now, as an operator asked", destination=queue.name)
        queue.cancel_timer()
        queue.failures, queue.backoff = 0, 0.0
        self._kick(queue)
        return True

    def queue_status(self) -> list[dict[str, Any]]:
        """Per destination: destination, queued, oldest_age_seconds, backoff_seconds,
        next_attempt (POSIX seconds, None when no attempt is scheduled), pinned_ok."""
        now = self.clock.seconds()
        return [self.queues[name].status(now) for name in sorted(self.queues)]

    def status_document(self) -> dict[str, Any]:
        """What `.status.json` holds for `msgrelay-admin queue list`."""
        return {"pid": os.getpid(), "server_name": self.own_name, "mode": self.policy.mode,
                "destinations": {name: q.details() for name, q in sorted(self.queues.items())}}

    async def _housekeeping(self) -> None:
        self._ticks += 1
        for destination in await self._run(self.outbox.take_retry_requests):
            self.retry_now(destination)
        if self._ticks % self.sweep_ticks == 0:
            await self._sweep()
        await self._write_status()

    def _tick(self) -> Deferred:
        d = Deferred.fromCoroutine(self._housekeeping())
        d.addErrback(lambda f: log.failure("federation housekeeping failed", f))
        return d

    async def _sweep(self) -> None:
        """Drop packets that expired while their queue waited, and old idempotency records."""
        now = self.clock.seconds()
        for queue in list(self.queues.values()):
            busy = queue.entries[0] if queue.running and queue.entries else None
            expired = [e for e in queue.entries if e.expires <= now and e is not busy]
            for entry in expired:
                queue.dropped += 1
                await self._forget(queue, entry)
            if expired:
                log.warn("federation: dropped {count} packets for {destination} that expired in the queue",
                         count=len(expired), destination=queue.name)
        await self._run(self.outbox.sweep_dedup, int(now))

    async def deliver_now(self, destination: str) -> dict[str, Any]:
        """One pass over one queue with no timers, for `msgrelay-admin` on a stopped relay."""
        self.acquire_lock()
        self.one_shot = True
        self.running = True
        if self._threads is not None and self._own_threads:
            self._threads.start()
        try:
            queue = self._queue(destination)
            for entry in await self._run(self.outbox.entries, destination.lower()):
                queue.add(entry)
            queue.running = True
            await self._drain(queue)
            return queue.details()
        finally:
            self.running = False
            if self.pool is not None:
                await self.pool.closeCachedConnections()
            if self._threads is not None and self._own_threads:
                self._threads.stop()
            if self._lock is not None:
                self._lock.release()
                self._lock = None


__all__ = ["FederationSender", "SenderConfig", "OutboxBusy"]
