"""A relay built by `build_relay` and driven in memory: StubTreq over its Klein resource.

No socket, no port, no listener: what these tests check is the relay's endpoints, not the
transport. Time is a `task.Clock` (signed requests are dated from it, expiry is driven by
advancing it); work done in the relay's thread pools (store, outbox) comes back through the
real reactor, as in production. Transport behaviour (body limits, CORS and Timestamp
headers of the site, slow clients, TLS) keeps its real-socket tests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from apiclient import Answer, ApiClient
from relayproc import seed_server_key


class ThreadedClock(task.Clock):
    """A Clock for time; the real reactor delivers what the relay's thread pools return."""

    def __init__(self, start: float):
        super().__init__()
        self.advance(start)

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        reactor.callFromThread(f, *args, **kwargs)


class InMemoryHTTP:
    """treq-shaped calls against a resource through StubTreq, pumped until answered."""

    #: Polling bound: this many turns of the real reactor (1 ms each) for one answer.
    TURNS = 20000

    def __init__(self, resource: Any):
        from treq.testing import StubTreq

        self.stub = StubTreq(resource)

    async def _pumped(self, d: Deferred) -> Any:
        """Flush the in-memory connection until `d` has its result (`d.called` is not enough:
        a called Deferred may still wait on an inner one that needs more flushing)."""
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        for _ in range(self.TURNS):
            self.stub.flush()
            if outcome:
                break
            await task.deferLater(reactor, 0.001, lambda: None)
        else:
            raise AssertionError("the in-memory relay did not answer")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]

    async def __call__(self, method: str, url: str, data: Optional[bytes] = None,
                      headers: Optional[dict] = None) -> Answer:
        response = await self._pumped(self.stub.request(method, url, data=data, headers=headers))
        content = await self._pumped(self.stub.content(response))
        try:
            body = json.loads(content) if content else None
        except ValueError:
            body = content
        return Answer(response.code, body, response.headers)


class MemoryRelay:
    """One relay from build_relay; `client` speaks to it in memory, `clock` is its time."""

    url = "http://relay.test"

    def __init__(self, state_dir: Path, values: dict[str, Any]):
        from msgrelay.builder import build_relay
        from msgrelay.settings import resolve

        seed_server_key(state_dir, "relay.test")
        self.settings = resolve(values, {"server.state_dir": str(state_dir), "server.name": "relay.test"})
        self.clock = ThreadedClock(time.time())
        self.relay = build_relay(self.settings, self.clock)
        self.core = self.relay.core
        self.http = InMemoryHTTP(self.relay.resource)
        self.client: Optional[ApiClient] = None

    async def start(self) -> "MemoryRelay":
        self.relay.service.startService()  # thread pools, federation, push
        self.client = await ApiClient.connect(self.url, clock=self.clock, http=self.http)
        return self

    def stop(self) -> Deferred:
        return maybeDeferred(self.relay.service.stopService)
