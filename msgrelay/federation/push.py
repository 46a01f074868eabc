"""Push notifications (docs/protocol.md section 8): a content-free POST after a message is stored.

The observer returns at once: the sender already has its `200` by the time anything here
touches the network. The POST carries only `{"user_id", "pending"}`. Endpoints go through
the address guard of `netguard` (resolve once, refuse loopback, private, link-local,
unspecified, multicast and reserved addresses unless `push.allow_private`, connect to the
checked address). Notifications for one user never overlap: while one is in flight, later
messages only mark it to be sent once more with the new count.
"""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ..store.interface import IStore, UserRecord
from .backoff import Backoff
from .netguard import AddressRefused, read_body

log = Logger(namespace="msgrelay.push")


def endpoint_host(url: str) -> str:
    """What the log may show of an endpoint: its host (paths often hold secrets)."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


class PushNotifier(Service):
    """`core.message_observers` entry that notifies users' push endpoints, best effort."""

    name = "push"

    def __init__(self, store: IStore, clock: Any, http: Any, retries: int = 3, timeout: float = 10,
                 backoff: Optional[Backoff] = None, max_concurrent: int = 50):
        self.store = store
        self.clock = clock
        self.http = http
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff or Backoff(1, 60)
        self._slots = DeferredSemaphore(max_concurrent)
        self._busy: set[str] = set()
        self._again: set[str] = set()
        self._inflight: set[Deferred] = set()
        self.sent = 0  # notifications an endpoint accepted (for tests and metrics)

    def __call__(self, user: UserRecord, message_id: str) -> None:
        if not user.push_endpoint:
            return
        if user.user_id in self._busy:
            self._again.add(user.user_id)
            return
        self._busy.add(user.user_id)
        d = Deferred.fromCoroutine(self._notify(user))
        self._inflight.add(d)
        d.addErrback(lambda f: log.failure("push notification failed unexpectedly", f))
        d.addBoth(lambda _: self._inflight.discard(d))

    def stopService(self) -> Any:
        """Cancel notifications in flight: they are best effort, and shutdown should be quick."""
        super().stopService()
        for d in list(self._inflight):
            d.cancel()

    async def _notify(self, user: UserRecord) -> None:
        try:
            while True:
                self._again.discard(user.user_id)
                await self._send(user)
                if user.user_id not in self._again:
                    return
        finally:
            self._busy.discard(user.user_id)
            self._again.discard(user.user_id)

    async def pending(self, user_id: str) -> int:
        """Pending messages, counted by the store without reading any (a fetch of limit 0)."""
        messages, remaining = await self.store.fetch(user_id, int(self.clock.seconds()), 0)
        return len(messages) + remaining

    async def _send(self, user: UserRecord) -> None:
        assert user.push_endpoint is not None
        host = endpoint_host(user.push_endpoint)
        body = {"user_id": user.user_id, "pending": await self.pending(user.user_id)}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await deferLater(self.clock, self.backoff.delay(attempt), lambda: None)
            try:
                code = await self._post(user.push_endpoint, body)
            except AddressRefused as e:
                log.warn("push to {host} refused: {problem}", host=host, problem=str(e))
                return
            except Exception as e:
                problem = type(e).__name__ + (f": {e}" if str(e) else "")
                continue
            if 200 <= code < 300:
                self.sent += 1
                return
            problem = f"HTTP {code}"
            if 400 <= code < 500 and code not in (408, 429):
                break  # the endpoint will not take it; retrying changes nothing
        log.warn("push to {host} for {user_id} failed: {problem}", host=host, user_id=user.user_id,
                 problem=problem[:300])

    async def _post(self, url: str, body: dict[str, Any]) -> int:
        await self._slots.acquire()
        try:
            d = Deferred.fromCoroutine(self._exchange(url, body))
            d.addTimeout(self.timeout, self.clock)  # the whole exchange, body included
            return await d
        finally:
            self._slots.release()

    async def _exchange(self, url: str, body: dict[str, Any]) -> int:
        response = await self.http.post(url, json=body, allow_redirects=False, unbuffered=True, reactor=self.clock)
        await read_body(response, 16 * 1024)
        return response.code
