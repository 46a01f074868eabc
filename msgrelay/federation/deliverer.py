"""One delivery attempt of one packet to one peer, and what the peer's answer means.

The deliverer knows nothing of queues, order or backoff: it fetches (or reuses) the peer's
key, seals the packet to it, POSTs it within `timeout`, and says what should happen next as
an `Outcome`. The queue (queue.py) decides what to do with that.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ..net.http import describe_failure
from ..wire.envelope import AES_GCM, seal
from .backoff import parse_retry_after
from .netguard import read_body
from .peerkeys import PeerKeys, PinMismatch
from .peers import Peer

FORWARDED_BY = "MsgRelay-Forwarded-By"


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # the peer has it (2xx): forget the packet
    RETRY_AFTER = "retry-after"  # try again later; `delay` is a minimum from the peer, if it gave one
    DROP = "drop"  # it will never be accepted (permanent 4xx, expired): forget it
    REFETCH_KEY = "refetch-key"  # the peer cannot decrypt (errno 103): its key was dropped; try again now
    KEY_MISMATCH = "key-mismatch"  # the peer's key is not the pinned one: hold the queue


@dataclass(frozen=True)
class Attempt:
    outcome: Outcome
    reason: str = ""
    delay: Optional[float] = None  # RETRY_AFTER only: the peer's Retry-After, in seconds


def _peer_error(body: bytes) -> tuple[Optional[int], str]:
    try:
        obj = json.loads(body)
        return obj.get("errno"), str(obj.get("message", ""))[:200]
    except (ValueError, AttributeError):
        return None, ""


def classify(code: int, body: bytes, retry_after: Optional[bytes], now: float) -> Attempt:
    """What an HTTP answer to `POST /api/v1/message` means (docs/federation.md, Delivery)."""
    if 200 <= code < 300:
        return Attempt(Outcome.DELIVERED)
    errno, message = _peer_error(body)
    if code == 400 and errno == 103:
        return Attempt(Outcome.REFETCH_KEY, "it cannot decrypt packets sealed to its published key (errno 103)")
    if 400 <= code < 500 and code not in (408, 429):
        return Attempt(Outcome.DROP, f"refused permanently (HTTP {code} errno {errno}: {message})")
    return Attempt(Outcome.RETRY_AFTER, f"HTTP {code} errno {errno}", parse_retry_after(retry_after, now))


class Deliverer:
    """Makes single attempts; cancels what is in flight when told to stop."""

    def __init__(self, http: Any, keys: PeerKeys, clock: Any, own_name: str, timeout: float):
        self.http = http
        self.keys = keys
        self.clock = clock
        self.own_name = own_name
        self.timeout = timeout
        self._inflight: set[Deferred] = set()
        self.stopped = False

    async def attempt(self, peer: Peer, packet: dict[str, Any], expires: int) -> Attempt:
        """One try at delivering `packet` (as stored in the outbox) before `expires`."""
        try:
            key = await self._timed(self.keys.get(peer))
        except PinMismatch as e:
            return Attempt(Outcome.KEY_MISMATCH, str(e))
        except Exception as e:
            return Attempt(Outcome.RETRY_AFTER, f"cannot get its server key: {describe_failure(e)}")
        remaining = int(expires - self.clock.seconds())
        if remaining < 1:
            return Attempt(Outcome.DROP, "expired before it could be sent")
        packet = {**packet, "ttl": remaining}  # the peer's expiry is never later than ours
        envelope = seal(key.key, json.dumps(packet, separators=(",", ":")).encode("utf-8"), AES_GCM)
        try:
            response, body = await self._timed(self._post(peer, envelope))
        except Exception as e:
            return Attempt(Outcome.RETRY_AFTER, describe_failure(e))
        answer = classify(response.code, body, response.headers.getRawHeaders(b"Retry-After", [None])[0],
                          self.clock.seconds())
        if answer.outcome is Outcome.REFETCH_KEY:
            self.keys.invalidate(peer.name)
        return answer

    async def _post(self, peer: Peer, envelope: dict[str, str]) -> tuple[Any, bytes]:
        response = await self.http.post(
            peer.endpoint("/api/v1/message"),
            data=json.dumps(envelope).encode("utf-8"),
            headers={"Content-Type": "application/json; charset=utf-8", FORWARDED_BY: self.own_name},
            allow_redirects=False, unbuffered=True, reactor=self.clock,
        )
        return response, await read_body(response)

    def _timed(self, coroutine: Any) -> Deferred:
        """A cancellable step bounded by the request timeout."""
        d = Deferred.fromCoroutine(coroutine)
        timer = self.clock.callLater(self.timeout, d.cancel)
        self._inflight.add(d)
        d.addBoth(self._untrack, d, timer)
        return d

    def _untrack(self, result: Any, d: Deferred, timer: Any) -> Any:
        self._inflight.discard(d)
        if timer.active():
            timer.cancel()
        elif isinstance(result, Failure) and not self.stopped:
            return Failure(TimeoutError(f"no answer within {self.timeout:g}s"))
        return result

    def stop(self) -> None:
        """Cancel every request in flight (the service is stopping)."""
        self.stopped = True
        for d in list(self._inflight):
            d.cancel()
