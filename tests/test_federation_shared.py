"""Two federation services on one PostgreSQL outbox (two relay processes), driven by one
`task.Clock` with `StubTreq` peers: one sender per destination, in order, shared backoff,
takeover when a holder dies. Real PostgreSQL; the twistd version is test_federation_pg_e2e.py."""

from __future__ import annotations

import random
from typing import Callable, Iterator

import pytest
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred, maybeDeferred

from msgrelay.federation.backoff import Backoff
from msgrelay.federation.deliverer import Deliverer
from msgrelay.federation.peerkeys import PeerKeys
from msgrelay.federation.peers import FederationPolicy, parse_peer_table
from msgrelay.federation.pgoutbox import PostgresOutbox
from msgrelay.federation.queue import QueueState
from msgrelay.federation.service import FederationService
from test_federation_fakes import FakePeer, logs, peer_key  # noqa: F401 (fixture)
from test_federation_units import T0, HostRouter, fired, packet
from test_store_postgres import DSN, pg_schema  # noqa: F401 (fixture)

LEASE = 30.0
POLL = 5.0


class Relay:
    """One relay process's federation service on the shared schema."""

    def __init__(self, name: str, schema: str, clock: task.Clock, peer: FakePeer):
        self.outbox = PostgresOutbox.open(DSN, LEASE, schema=schema, owner=name)
        http = StubTreq(HostRouter({"b.test": peer}))
        deliverer = Deliverer(http, PeerKeys(http, clock, 3600, 10), clock, "a.test", 10)
        policy = FederationPolicy("allowlist", parse_peer_table(["b.test=https://b.test"]), "a.test")
        self.service = FederationService(self.outbox, deliverer, Backoff(8, 8, random.Random(1)), policy, clock,
                                         1000, run=maybeDeferred, poll_interval=POLL)
        self.service.startService()
        self.clock = clock

    def send(self, n: int) -> tuple[str, int]:
        now = int(self.clock.seconds())
        return fired(Deferred.fromCoroutine(self.service.forwarder.forward(packet("b.test", n), now, now + 3600,
                                                                          None)))

    def queued(self) -> int:
        return sum(s["queued"] for s in self.service.queue_status())


@pytest.fixture
def relays(pg_schema) -> Iterator[Callable[[FakePeer], tuple[Relay, Relay, task.Clock]]]:  # noqa: F811
    made: list[Relay] = []

    def make(peer: FakePeer) -> tuple[Relay, Relay, task.Clock]:
        clock = task.Clock()
        clock.advance(T0)
        made.extend([Relay("one", pg_schema, clock, peer), Relay("two", pg_schema, clock, peer)])
        return made[-2], made[-1], clock

    yield make
    for relay in made:
        if relay.service.running:
            relay.service.stopService()
        relay.outbox.core.close()


def ids(peer: FakePeer) -> list[str]:
    return [p["id"] for p in peer.packets()]


def test_packets_of_both_processes_go_out_once_in_order_after_a_shared_backoff(relays):
    peer = FakePeer("b.test", peer_key(0))
    peer.script = [(503, {"errno": 180}, {})]
    one, two, clock = relays(peer)
    first = one.send(0)  # sent at once: 503, and the backoff (8 s) is saved for both
    assert peer.posts == 1 and one.service.queues["b.test"].state is QueueState.BACKING_OFF
    two.send(1)
    one.send(2)
    assert two.send(0) == first  # a duplicate through the other process: the first id
    queue_two = two.service.queues["b.test"]
    assert queue_two.state is QueueState.BACKING_OFF and queue_two.failures == 1  # adopted, not retried
    assert peer.posts == 1
    clock.advance(8)  # both timers fire; one process claims and sends everything
    assert ids(peer) == ["p0", "p1", "p2"] and peer.posts == 4
    clock.advance(POLL)  # the other learns from its poll that the queue is empty
    assert one.queued() == two.queued() == 0
    (row,) = one.outbox.summary(clock.seconds())  # a listed peer's queue stays, empty and reset
    assert (row.queued, row.backoff.attempts, row.holder) == (0, 0, None)
    clock.advance(60)
    assert ids(peer) == ["p0", "p1", "p2"]


def test_packets_a_dead_process_held_are_sent_by_the_other_after_its_lease(relays):
    peer = FakePeer("b.test", peer_key(0))
    one, two, clock = relays(peer)
    peer.hang = True  # "one" is in the middle of an attempt when it dies
    one.send(0)
    one.send(1)
    assert peer.posts == 1
    one.service.queues.stop()  # dies: no release, no more renewals (its lease stands)
    one.service.deliverer.stop()
    peer.hang = False
    assert two.service.retry_now("b.test")  # an operator asks two, which never saw these packets
    assert peer.posts == 1 and two.service.queues["b.test"].state is QueueState.IDLE  # one holds the claim
    clock.advance(LEASE - POLL)
    assert peer.posts == 1
    clock.advance(POLL)  # the lease ran out; two's poll finds the queue and claims it
    assert ids(peer) == ["p0", "p1"]
    assert two.outbox.pending(clock.seconds()) == {}


def test_a_database_outage_is_refused_with_180_and_logged_in_one_line_per_poll(relays, logs):
    from msgrelay.wire.errors import ProtocolError

    peer = FakePeer("b.test", peer_key(0))
    one, _, clock = relays(peer)
    one.outbox.core.close()  # the database goes away under the running relay
    with pytest.raises(ProtocolError) as info:
        one.send(0)
    assert info.value.errno == 180
    clock.advance(POLL)
    lines = [line for line in logs() if "cannot poll the shared outbox" in line]
    assert len(lines) == 1 and "not open" in lines[0]
    assert not any("Traceback" in line for line in logs())


def test_max_queue_counts_the_packets_of_every_process(relays):
    from msgrelay.wire.errors import ProtocolError

    peer = FakePeer("b.test", peer_key(0))
    peer.script = [(503, {"errno": 180}, {})]
    one, two, _ = relays(peer)
    one.service.forwarder.max_queue = two.service.forwarder.max_queue = 2
    one.send(0)
    two.send(1)
    with pytest.raises(ProtocolError) as info:
        one.send(2)
    assert info.value.errno == 160
